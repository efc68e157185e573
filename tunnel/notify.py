"""Readiness for supervisors: systemd's notify protocol and the ``-f`` parent.

Both are event sinks, so the core knows nothing about them: they act on ``Ready``,
session changes and ``Stopping``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

from . import events
from .names import printable


def notify_address(value: str) -> str | bytes:
    """``NOTIFY_SOCKET`` as a socket address: ``@name`` is Linux's abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class SystemdNotifier:
    """sd_notify(3) without libsystemd: one datagram per state change."""

    def __init__(self, address: str) -> None:
        self.address = notify_address(address)
        # Python's sockets are close-on-exec already; SOCK_CLOEXEC is Linux-only (macOS
        # lacks the constant).
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @classmethod
    def from_environment(cls) -> SystemdNotifier | None:
        address = os.environ.get("NOTIFY_SOCKET")
        # No AF_UNIX (older Windows): no supervisor could be listening there anyway.
        return cls(address) if address and hasattr(socket, "AF_UNIX") else None

    def send(self, message: str) -> None:
        # If the supervisor went away, the tunnel itself is still fine.
        with contextlib.suppress(OSError):
            self.sock.sendto(message.encode(), self.address)

    def __call__(self, event: events.Event) -> None:
        match event:
            case events.Ready(listeners=listeners):
                urls = " ".join(item.url for item in listeners)
                self.send(f"READY=1\nSTATUS=ready: {urls}\nMAINPID={os.getpid()}")
            case events.SessionLost(reason=reason):
                # The server's words: a newline in them would be a line of the protocol.
                self.send(f"STATUS=session lost: {printable(reason)}")
            case events.ReconnectScheduled(delay=delay, attempt=attempt):
                self.send(f"STATUS=reconnecting in {delay:.1f} s (attempt {attempt})")
            case events.SessionUp(server=server):
                self.send(f"STATUS=connected to {server}")
            case events.Stopping(reason=reason):
                self.send(f"STOPPING=1\nSTATUS=stopping: {printable(reason)}")


class OnReady:
    """Calls ``action`` once, at the first ``Ready`` event."""

    def __init__(self, action: Callable[[events.Ready], None]) -> None:
        self.action = action
        self.done = False

    def __call__(self, event: events.Event) -> None:
        if not self.done and isinstance(event, events.Ready):
            self.done = True
            self.action(event)
