"""pytunnel: SSH dynamic port forwarding (SOCKS4/4a/5), like ``ssh -D``."""

from __future__ import annotations

import warnings

from cryptography.utils import CryptographyDeprecationWarning

__version__ = "0.1.0"


def silence_asyncssh_deprecations() -> None:
    """asyncssh's modules name cryptography's DSA classes, which cryptography 51
    deprecates with a warning on every start, printed before anything of ours: ssh
    prints nothing of the kind, and a user can do nothing about it. Only that category,
    and only where asyncssh's code raises it, is silenced. Called here, before any room
    imports asyncssh (and by the test fixtures, which bench scripts use outside pytest)."""
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"asyncssh\.")


silence_asyncssh_deprecations()
