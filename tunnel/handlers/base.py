"""What a handler sees of the client connection, and what the connection sees of a
handler. The connection (:class:`tunnel.proxy.ProxyClient`) sniffs, keeps the deadline,
does flow control and splices; a handler turns one request into a reply and, if it
succeeds, a channel handed to :meth:`Client.start_relay`."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from .. import events
from ..channels import Channel, ChannelSink
from ..errors import ChannelOpenFailed, ReplyReason
from ..names import BadName, normalize_host
from ..socks import ServerConnection


class Client(ChannelSink, Protocol):
    """The client connection as handlers use it (also the sink of the channel it will
    splice)."""

    info: events.ConnectionInfo
    user: str | None

    @property
    def transport(self) -> asyncio.Transport: ...
    @property
    def closed(self) -> bool: ...
    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...
    def hand_over(self, handler: Handler) -> None: ...
    def parsed(
        self, protocol: str, command: str, host: str, port: int, sent_name: bool
    ) -> None: ...
    def check_limit(self) -> None: ...
    def check_policy(self, host: str, port: int) -> str: ...
    async def open_channel(
        self, host: str, port: int, sink: ChannelSink, *, lend: bool = False
    ) -> Channel: ...
    def opened(self, seconds: float) -> None: ...
    def failed(self, exc: ChannelOpenFailed) -> None: ...
    def start_relay(self, channel: Channel, pipelined: bytes) -> None: ...
    def reject_client(self, reason: str, *, auth: bool = False, close: bool = True) -> None: ...
    def login_failed(self) -> float: ...


class Handler(Protocol):
    """Owns the client connection between its first byte and the relay (or the close):
    the client's bytes and EOF go here, and ``close`` ends whatever it holds."""

    def start(self) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool: ...
    def close(self) -> None: ...


def normal_host(host: str) -> str:
    """A destination in its normal form, or the refusal of one that has none. RFC 1928
    has no code for "that is no host name"; 0x04 (host unreachable) is the nearest, and
    what the same name gets when the server's resolver cannot find it."""
    try:
        return normalize_host(host)
    except BadName as exc:
        raise ChannelOpenFailed(ReplyReason.HOST_UNREACHABLE, f"refused: {exc}") from None


def socks_fail(client: Client, codec: ServerConnection, exc: ChannelOpenFailed) -> None:
    """Report the failure, send its SOCKS reply and close."""
    client.failed(exc)
    client.transport.write(codec.reject(exc.reason))
    # RFC 1928 section 6: close soon after a failure reply. close() flushes it first.
    client.transport.close()
