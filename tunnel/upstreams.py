"""Where a proxied connection goes: the :class:`Request` the proxy side hands over, the
:class:`Upstream` protocol every destination kind implements, and the kinds that need no
SSH: :class:`Reject` (refused by policy) and :class:`Direct` (connected from this
machine, the far end of ``-R``). The SSH upstream lives with the composition root, which
alone knows the session; this room never imports it.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass
from typing import Protocol

from .channels import Channel, ChannelSink, PeerChannel, SocketPeer
from .errors import ChannelOpenFailed, ReplyReason


@dataclass(frozen=True, slots=True)
class Request:
    """One connection the proxy wants opened, with everything a route may choose by."""

    host: str  # normalised destination name or address
    port: int
    origin: tuple[str, int]  # the client's address
    protocol: str  # the event protocol name: "socks5", "socks4a", "http-connect", ...
    user: str | None  # proxy user name (SOCKS5 RFC 1929 / HTTP Basic), None without
    listener: str  # "host:port" of the listener it came in on


class Upstream(Protocol):
    """A kind of destination. ``open`` raises :class:`ChannelOpenFailed` with the reason
    (which decides the reply) and hands the channel over paused."""

    name: str

    async def open(self, request: Request, sink: ChannelSink) -> Channel: ...


class Reject:
    """Refuses every request: SOCKS5 0x02, SOCKS4 91, HTTP 403, with ``reason`` as the
    text of the event."""

    name = "reject"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def failure(self) -> ChannelOpenFailed:
        return ChannelOpenFailed(ReplyReason.CONNECTION_NOT_ALLOWED, self.reason)

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        raise self.failure()


# connect(2)'s errors, as the reply table of DESIGN.md names them.
_ERRNO_REPLIES = {
    errno.ECONNREFUSED: ReplyReason.CONNECTION_REFUSED,
    errno.ENETUNREACH: ReplyReason.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ReplyReason.HOST_UNREACHABLE,
    errno.ETIMEDOUT: ReplyReason.TTL_EXPIRED,
    errno.EACCES: ReplyReason.CONNECTION_NOT_ALLOWED,
    errno.EPERM: ReplyReason.CONNECTION_NOT_ALLOWED,
}


class Direct:
    """Connects from this machine, within ``timeout`` seconds."""

    name = "direct"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        host, port = request.host, request.port
        loop = asyncio.get_running_loop()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            transport, peer = await asyncio.wait_for(
                loop.create_connection(lambda: SocketPeer(sink), host, port), self.timeout
            )
        except TimeoutError:
            raise ChannelOpenFailed(
                ReplyReason.TTL_EXPIRED, f"connecting to {where} timed out"
            ) from None
        except socket.gaierror as exc:
            raise ChannelOpenFailed(
                ReplyReason.HOST_UNREACHABLE, f"cannot resolve {host}: {exc.strerror}"
            ) from exc
        except OSError as exc:
            reason = _ERRNO_REPLIES.get(exc.errno or 0, ReplyReason.GENERAL_FAILURE)
            if exc.errno is None and "refused" in str(exc).lower():
                reason = ReplyReason.CONNECTION_REFUSED  # every address refused
            raise ChannelOpenFailed(reason, exc.strerror or str(exc)) from exc
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return PeerChannel(transport, peer)
