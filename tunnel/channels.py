"""The seam between the proxy and the SSH session.

The proxy asks an upstream (:class:`tunnel.upstreams.Upstream`) for a :class:`Channel`
and hands it a :class:`ChannelSink` to report to; the SSH upstream opens it with
asyncssh, :class:`tunnel.upstreams.Direct` and tests with plain sockets. Neither side
imports the other.

Two more seams, which only the SSH session offers: a :class:`Binder` asks the server to
listen (SOCKS BIND, ``-R``) and hands each connection that arrives to an
:class:`IncomingSink`; a :class:`Runner` starts a program on the server (the UDP helper).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable


class ChannelSink(Protocol):
    """What an opened channel reports to: the far side's data, EOF, flow and close."""

    def remote_data(self, data: bytes) -> None: ...
    def remote_eof(self) -> None: ...
    def remote_pause(self) -> None: ...
    def remote_resume(self) -> None: ...
    def remote_closed(self, exc: BaseException | None) -> None: ...


@dataclass(frozen=True)
class LentSocket:
    """A client's socket lent to an upstream that reads it itself (``--master-mode
    handover``): a duplicate of the descriptor, to be closed by the borrower."""

    sock: socket.socket
    # What the proxy has read from the connection so far (the handshake), which the
    # kernel's count of received bytes includes and the relay's count must not.
    consumed: int
    # What the proxy has written but the socket has not taken yet: the borrower writes
    # nothing of its own before this is 0, so nothing overtakes the reply.
    unsent: Callable[[], int]


@runtime_checkable
class LendingSink(ChannelSink, Protocol):
    """A sink that can lend its client's socket, and takes byte counts from a relay it
    does not see."""

    def lend_socket(self) -> LentSocket | None:
        """The socket, if nothing read from it is still waiting to be relayed and the
        proxy will not read it again; None otherwise (then relay as usual)."""

    def counted(self, up: int, down: int) -> None:
        """Bytes relayed by the borrower, added to the connection's counts."""


class ReportsToSink:
    """What every channel-side protocol does alike (an asyncssh session, an asyncio
    protocol): the far side's EOF and flow control go to the sink as they come."""

    __slots__ = ()
    _sink: ChannelSink

    def eof_received(self) -> bool:
        self._sink.remote_eof()
        return True  # half-close: the other direction keeps flowing

    def pause_writing(self) -> None:
        self._sink.remote_pause()

    def resume_writing(self) -> None:
        self._sink.remote_resume()


class SocketPeer(ReportsToSink, asyncio.Protocol):
    """A plain stream socket as the far side (a TCP connection from this machine, the
    socket pair an OpenSSH master relays), reporting to the proxy's sink.

    Like an SSH channel it stays paused until the proxy has written its reply, and
    :class:`PeerChannel` releases it. uvloop starts reading a new transport after
    ``connection_made`` whatever that asked, so what comes before the release (a
    server that speaks first: an SSH or SMTP banner) is kept here, in order with its EOF
    and close, and handed over at the release: never before the reply."""

    def __init__(self, sink: ChannelSink) -> None:
        self._sink = sink
        self._transport: asyncio.Transport | None = None
        # What came before the release, in order; None once released.
        self._early: list[Callable[[], object]] | None = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        early = self._early
        if early is None:
            self._sink.remote_data(data)
            return
        assert self._transport is not None
        self._transport.pause_reading()  # effective from here on, under uvloop too
        early.append(functools.partial(self._sink.remote_data, data))

    def eof_received(self) -> bool:
        self._report(self._sink.remote_eof)
        return True  # half-close: the other direction keeps flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self._report(functools.partial(self._sink.remote_closed, exc))

    def _report(self, report: Callable[[], object]) -> None:
        if self._early is None:
            report()
        else:
            self._early.append(report)

    def release(self) -> None:
        """Hand over what came while paused; from now on everything goes at once."""
        early, self._early = self._early, None
        for report in early or ():
            report()


class PeerChannel:
    """A :class:`SocketPeer`'s transport as the proxy's :class:`Channel`: resuming it
    first hands over what the peer kept while it was paused."""

    def __init__(self, transport: asyncio.Transport, peer: SocketPeer) -> None:
        self._transport = transport
        self._peer = peer
        # The hot path goes straight to the transport.
        self.write = transport.write
        self.write_eof = transport.write_eof
        self.pause_reading = transport.pause_reading
        self.close = transport.close

    def resume_reading(self) -> None:
        self._peer.release()
        if not self._transport.is_closing():
            self._transport.resume_reading()


class Channel(Protocol):
    """The near side of an opened channel. It is handed over with reading paused; the
    proxy resumes it once the SOCKS reply is written."""

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


class IncomingSink(ChannelSink, Protocol):
    """A sink for a connection the server accepted for us; the channel comes with it,
    paused like an opened one."""

    def channel_opened(self, channel: Channel) -> None: ...


# Called with the connecting peer's (address, port) before the channel opens, and never
# before listen_tcp has returned; None refuses the connection.
IncomingHandler = Callable[[tuple[str, int]], IncomingSink | None]


class RemoteListener(Protocol):
    """A port the server listens on for us. ``host`` is the address to tell peers."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    def close(self) -> None: ...


class Binder(Protocol):
    async def listen_tcp(self, host: str, port: int, handler: IncomingHandler) -> RemoteListener:
        """Ask the server to listen on host:port (0: it picks); raise ChannelOpenFailed
        with the reason if it will not."""
        ...


class Runner(Protocol):
    async def run_process(self, command: str, sink: ChannelSink) -> Channel:
        """Start ``command`` on the server; its stdout goes to ``sink.remote_data`` and
        its end to ``sink.remote_closed`` with a :class:`RemoteCommandEnded` that holds
        the exit status and the end of its stderr."""
        ...
