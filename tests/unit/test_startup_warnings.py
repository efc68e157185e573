"""Nothing but pytunnel's own lines on stderr at start: the deprecation warnings that
cryptography raises inside asyncssh's modules are silenced, and no other warning is."""

from __future__ import annotations

import os
import subprocess
import sys


def _stderr_of(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_importing_every_room_that_imports_asyncssh_prints_nothing() -> None:
    code = "import tunnel.session, tunnel.fastpath, tunnel.demo, tunnel.sshconfig, tunnel.cli"
    assert _stderr_of(code) == ""


def test_only_cryptographys_deprecations_inside_asyncssh_are_silenced() -> None:
    code = """
import warnings
import tunnel
from cryptography.utils import CryptographyDeprecationWarning as Deprecated
warnings.warn_explicit("in-asyncssh", Deprecated, "a.py", 1, module="asyncssh.crypto.dsa")
warnings.warn_explicit("other-kind", UserWarning, "b.py", 1, module="asyncssh.connection")
warnings.warn_explicit("elsewhere", Deprecated, "c.py", 1, module="someone.else")
"""
    stderr = _stderr_of(code)
    assert "in-asyncssh" not in stderr
    assert "other-kind" in stderr
    assert "elsewhere" in stderr
