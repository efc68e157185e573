"""pytunnel: SSH dynamic port forwarding (SOCKS4/4a/5), like ``ssh -D``."""

from __future__ import annotations

__version__ = "0.1.0"
