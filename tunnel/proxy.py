"""Listeners and the per-client relay.

Each client is one :class:`asyncio.Protocol`; its first byte says SOCKS or HTTP (the
HTTP side is :mod:`tunnel.http_proxy`). For SOCKS it feeds the sans-I/O codec until a
request is complete, asks the injected :class:`Opener` for a channel, replies only once
the channel is open (or with the reply that says why it is not), then splices at the
protocol level: client ``data_received`` goes straight to ``channel.write`` and the
channel's data straight to ``transport.write``, with no task, await or copy per chunk.

Flow control: when the channel's send buffer passes its high-water mark the opener
calls :meth:`ProxyClient.remote_pause` and we stop reading from the client; when the
client's socket buffer fills up, asyncio calls :meth:`ProxyClient.pause_writing` and we
pause the channel, so at most about one SSH window is buffered per connection.

Half-close: EOF from either side is passed on with ``write_eof`` and the other
direction keeps flowing; the connection ends when the channel closes or the client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hmac
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from . import events
from .channels import Binder, Channel, ChannelSink, IncomingSink, Opener, RemoteListener
from .errors import ChannelOpenFailed, ListenError, RemoteProtocolError, ReplyReason
from .http_proxy import HttpSession
from .names import BadName, normalize_host, printable
from .rules import Rules, bind_peer_allowed, is_loopback
from .socks import (
    NEED_DATA,
    Command,
    Credentials,
    Request,
    ServerConnection,
    SocksVersion,
    State,
)
from .throttle import LoginThrottle
from .udp import UdpAssociation, UdpSettings

log = logging.getLogger(__name__)

# How long a SOCKS BIND waits for its peer to connect (SOCKS4 asks for a time limit).
BIND_TIMEOUT = 120.0
# What a client may send while its BIND waits for the peer, held until the splice.
_BIND_BUFFER = 256 * 1024


class ProxyClient(asyncio.Protocol):
    """One client connection, from its first byte to its close. The first byte decides
    the protocol: 0x04 or 0x05 SOCKS, an ASCII letter HTTP/1.1, anything else a close."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._codec = ServerConnection(require_auth=server.credentials is not None)
        self._transport: asyncio.Transport | None = None
        self._channel: Channel | None = None
        self._open_task: asyncio.Task[None] | None = None
        self._http: HttpSession | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._client_eof = False
        self._closed = False
        self._over_limit = False
        self._remote_paused = False
        self._pending: list[bytes] | None = None
        self._udp: UdpAssociation | None = None
        self._bind: _BindWait | None = None
        # A failure answer held back by the login throttle.
        self._held: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.info = events.ConnectionInfo(id=0, client="", started=0.0)

    # -- client side (asyncio.Protocol) ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast(asyncio.Transport, transport)
        self.info = events.ConnectionInfo(
            id=next(self._server.ids),
            client=_format_address(transport.get_extra_info("peername")),
            started=time.monotonic(),
            listener=_format_address(transport.get_extra_info("sockname")),
        )
        self._over_limit = not self._server.has_room()
        self._server.clients.add(self)
        self.arm_deadline()
        self._server.emit(events.ClientAccepted(self.info))

    def data_received(self, data: bytes) -> None:
        channel = self._channel
        if channel is not None:
            # The hot path: one add and one write per chunk.
            self.info.bytes_up += len(data)
            channel.write(data)
            return
        if self._http is not None:
            self._http.feed(data)
            return
        if self._udp is not None:
            return  # the control connection of a UDP association carries nothing
        if self._open_task is not None:
            # Pipelined after the request: the codec keeps it as trailing data.
            self._codec.receive_data(data)
            if self._bind is not None and self._codec.buffered > _BIND_BUFFER:
                self.transport.pause_reading()
            return
        if self._codec.state is State.START and data[:1].isalpha():
            self._http = HttpSession(self)
            self._http.feed(data)
            return
        if self._held is not None:
            return  # a failed login waits for its answer; what it sends meanwhile is moot
        self._codec.receive_data(data)
        self._socks_events()

    def eof_received(self) -> bool:
        self._client_eof = True
        if self._channel is not None:
            self._channel.write_eof()
            return True
        if self._http is not None:
            self._http.feed(b"")
            return True
        if self._udp is not None:
            return False  # closing the control connection ends the association
        if self._bind is not None:
            # Before its second reply a BIND client has nothing to send: EOF means it
            # gave up (or closed), so the server stops listening for the peer.
            self._bind.close()
            self._bind = None
            return False
        if self._open_task is not None:
            # The whole request (and maybe data) came before EOF: pass it on later.
            return True
        if self._held is not None:
            return False  # it gave up waiting for the answer to a wrong password
        if self._codec.state is State.START and not self._codec.buffered:
            # Not a byte came: a port probe or a preconnect the browser did not need.
            self.reject_client("client closed without sending a request", empty=True)
        else:
            self.reject_client("client closed its side during the handshake")
        return False

    def pause_writing(self) -> None:
        if self._channel is not None:
            self._channel.pause_reading()
        self._writable.clear()

    def resume_writing(self) -> None:
        if self._channel is not None:
            self._channel.resume_reading()
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        self._finish()

    # -- channel side (ChannelSink) ------------------------------------------------

    def remote_data(self, data: bytes) -> None:
        # asyncssh hands over one 32 KiB packet at a time, often several in one pass of
        # the event loop. The first is written at once (no added latency); the rest of
        # the pass is gathered into one write at its end: far fewer system calls.
        self.info.bytes_down += len(data)
        pending = self._pending
        if pending is not None:
            pending.append(data)
            return
        self._pending = []
        self._loop.call_soon(self._flush_pending)
        assert self._transport is not None
        self._transport.write(data)

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending and self._transport is not None and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def remote_eof(self) -> None:
        assert self._transport is not None
        self._flush_pending()
        if not self._transport.is_closing():
            self._transport.write_eof()

    def remote_pause(self) -> None:
        assert self._transport is not None
        self._remote_paused = True
        self._transport.pause_reading()

    def remote_resume(self) -> None:
        assert self._transport is not None
        self._remote_paused = False
        if not self._transport.is_closing():
            self._transport.resume_reading()

    def remote_closed(self, exc: BaseException | None) -> None:
        self._channel = None
        self._flush_pending()
        if self._transport is not None:
            # close() flushes what is still buffered towards the client first.
            self._transport.close()

    # -- shared by SOCKS and HTTP ----------------------------------------------------

    @property
    def credentials(self) -> tuple[bytes, bytes] | None:
        return self._server.credentials

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    async def drained(self) -> None:
        """Wait while the client's socket buffer is full."""
        await self._writable.wait()

    @property
    def idle_timeout(self) -> float:
        """How long a client may send nothing while it owes us part of a request."""
        return self._server.handshake_timeout

    def parsed(self, protocol: str, command: str, host: str, port: int, sent_name: bool) -> None:
        self._cancel_deadline()
        self.info.protocol = protocol
        self.info.host = host
        self.info.port = port
        self._server.emit(events.RequestParsed(self.info, protocol, command, host, port, sent_name))

    async def open_channel(self, host: str, port: int, sink: ChannelSink) -> Channel:
        """Ask the opener for a channel, after the limits and the rules; raise
        ChannelOpenFailed with the reason. The channel arrives paused. The host goes to
        the opener in the normal form the rules checked."""
        host = self.check_policy(host, port)
        origin = self.transport.get_extra_info("peername") or ("", 0)
        started = time.monotonic()
        try:
            channel = await self._server.opener.open_tcp(
                host, port, (str(origin[0]), int(origin[1])), sink
            )
        except ChannelOpenFailed:
            raise
        except Exception as exc:  # a bug or an unexpected failure: answer, never hang
            log.debug("opening %s:%s failed", host, port, exc_info=True)
            raise ChannelOpenFailed(
                ReplyReason.GENERAL_FAILURE, f"internal error: {exc!r}"
            ) from exc
        if self._closed:
            channel.close()
            raise ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, "the client went away")
        self.info.open = True
        self._server.emit(events.ChannelOpened(self.info, time.monotonic() - started))
        return channel

    def failed(self, exc: ChannelOpenFailed) -> None:
        self._server.emit(
            events.ChannelFailed(self.info, int(exc.reason), exc.reason.label, exc.message)
        )

    def start_relay(self, channel: Channel, pipelined: bytes) -> None:
        """Splice from here on: the reply is written, the channel may deliver."""
        self._channel = channel
        self._http = None
        channel.resume_reading()
        if pipelined:
            self.info.bytes_up += len(pipelined)
            channel.write(pipelined)
        if self._client_eof:
            channel.write_eof()
        elif not self._remote_paused:
            # (If the pipelined bytes filled the channel, remote_resume will do it.)
            self.transport.resume_reading()

    # -- SOCKS -------------------------------------------------------------------

    def _socks_events(self) -> None:
        while True:
            try:
                event = self._codec.next_event()
            except RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            out = self._codec.data_to_send()
            if out:
                self.transport.write(out)
            if event is NEED_DATA:
                return
            if isinstance(event, Credentials):
                if not self._server.check_credentials(event.username, event.password):
                    self.reject_client("wrong proxy credentials (SOCKS5)", auth=True, close=False)
                    self._answer_later(self.login_failed(), self._codec.reject_auth())
                    return
                self.transport.write(self._codec.accept_auth())
                continue
            assert isinstance(event, Request)
            self._socks_request(event)
            return

    def _socks_request(self, request: Request) -> None:
        protocol = f"socks{request.version}"
        if request.version is SocksVersion.SOCKS4 and request.sent_name:
            protocol = "socks4a"
        if request.command is Command.BIND:
            protocol = f"socks{request.version}-bind"
        elif request.command is Command.UDP_ASSOCIATE:
            protocol = "socks5-udp"
        try:
            # One form for the rules, the events and the server alike (tunnel.names).
            request = dataclasses.replace(request, host=_normal_host(request.host))
        except ChannelOpenFailed as exc:
            # The name stays out of the event as sent: it may hold control characters.
            host = printable(request.host)
            self.parsed(protocol, request.command.name, host, request.port, request.sent_name)
            self._socks_fail(exc)
            return
        self.parsed(protocol, request.command.name, request.host, request.port, request.sent_name)
        if request.version is SocksVersion.SOCKS4 and self._server.credentials is not None:
            self._socks_fail(
                ChannelOpenFailed(
                    ReplyReason.CONNECTION_NOT_ALLOWED,
                    "SOCKS4 has no password and this proxy requires one: use SOCKS5 or HTTP",
                )
            )
            return
        if request.command is Command.CONNECT:
            # Stop reading until the channel is open: what was pipelined stays bounded.
            self.transport.pause_reading()
            opening = self._socks_open(request)
        elif request.command is Command.BIND and self._server.binder is not None:
            self.transport.pause_reading()
            opening = self._socks_bind(request, self._server.binder)
        elif request.command is Command.UDP_ASSOCIATE and self._server.udp is not None:
            opening = self._socks_udp(request, self._server.udp)
        else:
            where = "on this listener" if self._server.reverse else "here"
            reason = ReplyReason.COMMAND_NOT_SUPPORTED
            message = f"{request.command.name} is not available {where}"
            self._socks_fail(ChannelOpenFailed(reason, message))
            return
        self._open_task = asyncio.get_running_loop().create_task(opening)

    async def _socks_open(self, request: Request) -> None:
        try:
            channel = await self.open_channel(request.host, request.port, self)
        except ChannelOpenFailed as exc:
            self._socks_fail(exc)
            return
        self.transport.write(self._codec.accept())
        # Channels arrive paused so that nothing can overtake the reply; now it is out.
        self.start_relay(channel, self._codec.trailing_data)

    def check_limit(self) -> None:
        if self._over_limit:
            raise ChannelOpenFailed(
                ReplyReason.GENERAL_FAILURE,
                f"too many connections (limit {self._server.max_clients})",
            )

    def check_policy(self, host: str, port: int) -> str:
        """The connection limit and the allow/deny rules; ChannelOpenFailed if refused.
        Returns the host in its normal form, which is what was checked."""
        self.check_limit()
        host = _normal_host(host)
        rule = self._server.rules.denies(host, port)
        if rule is not None:
            raise ChannelOpenFailed(ReplyReason.CONNECTION_NOT_ALLOWED, f"denied by {rule}")
        return host

    # -- SOCKS BIND -------------------------------------------------------------------

    async def _socks_bind(self, request: Request, binder: Binder) -> None:
        """Ask the SSH server to listen; first reply with where, second with the peer
        that connected (only the request's DST.ADDR may)."""
        # A peer on the server itself needs only its loopback, asked for by address
        # (sshd honours 127.0.0.1 and ::1 whatever its GatewayPorts, and the reply must
        # name an address it really listens on); any other peer needs the server to
        # listen on every interface, which its GatewayPorts decides.
        listen_host = ""
        if is_loopback(request.host):
            listen_host = "::1" if ":" in request.host else "127.0.0.1"
        wait = _BindWait(self, request, time.monotonic())
        try:
            # (The host is already in its normal form: _socks_request saw to it.)
            self.check_policy(request.host, request.port)
            listener = await binder.listen_tcp(listen_host, 0, wait.incoming)
        except ChannelOpenFailed as exc:
            self._socks_fail(exc)
            return
        except Exception as exc:  # a bug or an unexpected failure: answer, never hang
            log.debug("BIND failed", exc_info=True)
            self._socks_fail(
                ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, f"internal error: {exc!r}")
            )
            return
        if self._closed:
            listener.close()
            return
        wait.listening(listener)
        self._bind = wait
        self.transport.write(self._codec.accept(_reply_host(listener.host), listener.port))
        # Read again, to notice a client that gives up; what it sends waits in the codec.
        self.transport.resume_reading()

    def bind_connected(self, wait: _BindWait, channel: Channel, peer: tuple[str, int]) -> None:
        self._bind = None
        if self._closed:
            channel.close()
            return
        self.info.open = True
        self._server.emit(events.ChannelOpened(self.info, time.monotonic() - wait.started))
        self.transport.write(self._codec.accept(_reply_host(peer[0]), peer[1]))
        self.start_relay(channel, self._codec.trailing_data)

    def bind_failed(self, exc: ChannelOpenFailed) -> None:
        self._bind = None
        self._socks_fail(exc)

    # -- SOCKS5 UDP ASSOCIATE ---------------------------------------------------------

    async def _socks_udp(self, request: Request, settings: UdpSettings) -> None:
        started = time.monotonic()
        peer = self.transport.get_extra_info("peername") or ("127.0.0.1", 0)
        local = self.transport.get_extra_info("sockname") or ("127.0.0.1", 0)
        association = UdpAssociation(settings, self.info, (str(peer[0]), request.port))
        try:
            self.check_limit()
            host, port = await association.start(str(local[0]))
        except (ChannelOpenFailed, OSError) as exc:
            association.close()
            if isinstance(exc, OSError):
                reason = f"cannot open a UDP relay: {exc.strerror or exc}"
                exc = ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, reason)
            self._socks_fail(exc)
            return
        if self._closed:
            association.close()
            return
        self._udp = association
        self.info.host, self.info.port = host, port
        self.info.open = True
        self._server.emit(events.ChannelOpened(self.info, time.monotonic() - started))
        self.transport.write(self._codec.accept(host, port))

    def _socks_fail(self, exc: ChannelOpenFailed) -> None:
        self.failed(exc)
        self.transport.write(self._codec.reject(exc.reason))
        # RFC 1928 section 6: close soon after a failure reply. close() flushes it first.
        self.transport.close()

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        out = self._codec.data_to_send()
        if out:
            self.transport.write(out)
        if exc.reply:
            self.transport.write(exc.reply)
        self.reject_client(exc.message)

    def login_failed(self) -> float:
        """Count a wrong proxy password from this client's address; how long to hold the
        answer. While it is held, the handshake deadline does not also close the client."""
        peer = self.transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else self.info.client
        hold = self._server.throttle.failed(address, self._server.clock())
        if hold > 0:
            self._cancel_deadline()
        return hold

    def _answer_later(self, hold: float, answer: bytes) -> None:
        """Send a failure answer and close, after ``hold`` seconds (at once for 0).
        Reading goes on meanwhile, only so that a client that hangs up is seen."""
        if hold <= 0:
            self._send_and_close(answer)
            return
        self._held = self._loop.call_later(hold, self._send_and_close, answer)

    def _send_and_close(self, answer: bytes) -> None:
        self._held = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(answer)
            self._transport.close()

    def reject_client(
        self, reason: str, *, auth: bool = False, close: bool = True, empty: bool = False
    ) -> None:
        """Report a client we will not serve; close it unless the caller still answers."""
        self._server.emit(events.ClientRejected(self.info, reason, auth=auth, empty=empty))
        if close and self._transport is not None:
            self._transport.close()

    # -- deadlines and closing --------------------------------------------------------

    def arm_deadline(self) -> None:
        """The handshake bound; for HTTP keep-alive also the idle bound between requests."""
        self._cancel_deadline()
        self._deadline = asyncio.get_running_loop().call_later(
            self._server.handshake_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        if self._channel is None and self._open_task is None:
            self.reject_client(f"no complete request within {self._server.handshake_timeout:g} s")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def close(self) -> None:
        """Close from our side (shutdown, session lost)."""
        if self._transport is not None:
            if self._channel is None:
                self._transport.abort()
            else:
                self._transport.close()
        self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_deadline()
        if self._held is not None:
            self._held.cancel()
            self._held = None
        if self._open_task is not None and not self._open_task.done():
            self._open_task.cancel()
        if self._http is not None:
            self._http.close()
        if self._udp is not None:
            self._udp.close()
        if self._bind is not None:
            self._bind.close()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        self._server.forget(self)
        info = self.info
        if info.open:
            info.open = False
            self._server.emit(
                events.ConnectionClosed(
                    info, info.bytes_up, info.bytes_down, time.monotonic() - info.started
                )
            )


class _BindWait:
    """A SOCKS BIND between its two replies: the server listens, we wait for the one
    peer the request named, within :data:`BIND_TIMEOUT`."""

    def __init__(self, client: ProxyClient, request: Request, started: float) -> None:
        self.client = client
        self.request = request
        self.started = started
        self.listener: RemoteListener | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.peer: tuple[str, int] | None = None

    def listening(self, listener: RemoteListener) -> None:
        self.listener = listener
        self.timer = asyncio.get_running_loop().call_later(BIND_TIMEOUT, self._timed_out)

    def incoming(self, origin: tuple[str, int]) -> IncomingSink | None:
        """The server reports a connection: take the first one from the right peer."""
        if self.peer is not None or self.listener is None:
            return None
        if not bind_peer_allowed(self.request.host, origin[0]):
            log.info(
                "BIND #%s: refused a connection from %s (expected %s)",
                self.client.info.id,
                origin[0],
                self.request.host,
            )
            return None
        self.peer = origin
        return _BoundPeer(self, origin)

    def connected(self, channel: Channel, peer: tuple[str, int]) -> None:
        self.close()
        self.client.bind_connected(self, channel, peer)

    def _timed_out(self) -> None:
        self.timer = None
        self.close()
        self.client.bind_failed(
            ChannelOpenFailed(
                ReplyReason.TTL_EXPIRED,
                f"no connection from {self.request.host} within {BIND_TIMEOUT:g} s",
            )
        )

    def close(self) -> None:
        """Stop listening on the server (one peer per BIND) and stop the clock."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()


class _BoundPeer:
    """The sink of a BIND's peer channel until the client takes it over: the channel
    arrives paused, so nothing reaches these before the second reply is written."""

    def __init__(self, wait: _BindWait, peer: tuple[str, int]) -> None:
        self.wait = wait
        self.peer = peer

    def channel_opened(self, channel: Channel) -> None:
        self.wait.connected(channel, self.peer)

    def remote_data(self, data: bytes) -> None:
        self.wait.client.remote_data(data)

    def remote_eof(self) -> None:
        self.wait.client.remote_eof()

    def remote_pause(self) -> None:
        self.wait.client.remote_pause()

    def remote_resume(self) -> None:
        self.wait.client.remote_resume()

    def remote_closed(self, exc: BaseException | None) -> None:
        self.wait.client.remote_closed(exc)


def _normal_host(host: str) -> str:
    """A destination in its normal form, or the refusal of one that has none. RFC 1928
    has no code for "that is no host name"; 0x04 (host unreachable) is the nearest, and
    what the same name gets when the server's resolver cannot find it."""
    try:
        return normalize_host(host)
    except BadName as exc:
        raise ChannelOpenFailed(ReplyReason.HOST_UNREACHABLE, f"refused: {exc}") from None


def _reply_host(host: str) -> str:
    """An address a SOCKS reply can carry (a name cannot be: zeros then)."""
    try:
        return str(ipaddress.ip_address(host.partition("%")[0]))
    except ValueError:
        return "0.0.0.0"


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address or "")


LOOPBACK = ("127.0.0.1", "::1")
ANY = ("0.0.0.0", "::")


def bind_addresses(host: str | None) -> tuple[str, ...]:
    """What one ``-D`` binds: None is loopback on both families (as OpenSSH does without
    GatewayPorts), "" every interface, ``localhost`` loopback, anything else as given."""
    if host is None or host == "localhost":
        return LOOPBACK
    if host == "":
        return ANY
    return (host,)


# Running out of descriptors is not an error of the client being accepted: pause
# accepting, say so once, try again shortly. The kernel keeps the others queued.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_PAUSE = 0.5
_ACCEPT_BATCH = 64


class _Acceptor:
    """The accept loop of one listening socket."""

    def __init__(self, server: ProxyServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._resume: asyncio.TimerHandle | None = None
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(exc)
                    return
                # ECONNABORTED and friends: that client is gone; serve the next one.
                log.debug("accept failed: %s", exc)
                continue
            self.server.accepted(conn)

    def _pause(self, exc: OSError) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self._resume = self.loop.call_later(_ACCEPT_PAUSE, self._restart)
        if not self.server.starved:
            self.server.starved = True
            message = (
                f"cannot accept connections: {exc.strerror}; pausing accepts for "
                f"{_ACCEPT_PAUSE:g} s at a time until descriptors are free (ulimit -n)"
            )
            # An event, not a log line: the renderers show it once, where the user looks.
            self.server.emit(events.Notice(message, key="accept-starved"))

    def _restart(self) -> None:
        self._resume = None
        self.loop.add_reader(self.sock.fileno(), self._accept)
        self._accept()

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class ProxyServer:
    """Every listener and every client connection of one tunnel."""

    def __init__(
        self,
        opener: Opener,
        emit: events.Sink,
        *,
        handshake_timeout: float = 30.0,
        max_clients: int = 4096,
        rules: Rules | None = None,
        credentials: tuple[bytes, bytes] | None = None,
        binder: Binder | None = None,
        udp: UdpSettings | None = None,
        ids: Iterator[int] | None = None,
        reverse: bool = False,
        throttle: LoginThrottle | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # binder: SOCKS BIND through the SSH server; udp: UDP ASSOCIATE. Without them
        # those commands get 0x07. ``reverse`` marks the proxy behind -R listeners.
        self.binder = binder
        self.udp = udp
        if udp is not None:
            # DNS channels of UDP associations count toward the connection limit.
            udp.room = self.has_room
        self.reverse = reverse
        self.opener = opener
        self.emit = emit
        self.handshake_timeout = handshake_timeout
        self.max_clients = max_clients
        self.rules = rules or Rules()
        self.credentials = credentials
        # Slows down password guessing, per client address; see tunnel.throttle.
        self.throttle = LoginThrottle() if throttle is None else throttle
        self.clock = clock
        self.clients: set[ProxyClient] = set()
        self.ids = ids or itertools.count(1)
        self.listeners: list[events.Listener] = []
        self.starved = False
        self._bound: list[socket.socket] = []  # bound, not yet listening
        self._acceptors: list[_Acceptor] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()

    async def listen(
        self,
        specs: Iterable[tuple[str | None, int]],
        *,
        check: Callable[[list[tuple[str, int]]], None] | None = None,
    ) -> list[events.Listener]:
        """Bind every ``(host, port)`` and accept at once: :meth:`bind`, then
        :meth:`start_accepting`."""
        self.bind(specs, check=check)
        return self.start_accepting()

    def bind(
        self,
        specs: Iterable[tuple[str | None, int]],
        *,
        check: Callable[[list[tuple[str, int]]], None] | None = None,
    ) -> list[events.Listener]:
        """Bind every ``(host, port)`` without listening, so a port in use is known
        before any SSH prompt while a client connecting now is still refused by the
        kernel. All or nothing: on any failure, close what was bound and raise
        :class:`ListenError`. ``check`` sees every address actually bound before
        anything is served, and may refuse them all by raising. The listeners it
        returns carry the ports chosen for 0."""
        bound: list[socket.socket] = []
        try:
            for host, port in specs:
                bound.extend(_bind_group(bind_addresses(host), port, host))
            if check is not None:
                check([cast(tuple[str, int], sock.getsockname()[:2]) for sock in bound])
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        self._bound.extend(bound)
        return [events.Listener(*sock.getsockname()[:2]) for sock in bound]

    def start_accepting(self) -> list[events.Listener]:
        """Listen on every bound socket and accept from now on; announce each one.
        All or nothing, as :meth:`bind`."""
        bound, self._bound = self._bound, []
        try:
            for sock in bound:
                _listen_on(sock)
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        # Only now that every socket listens: nothing is announced that then closes.
        for sock in bound:
            self._acceptors.append(_Acceptor(self, sock))
            listener = events.Listener(*sock.getsockname()[:2])
            self.listeners.append(listener)
            self.emit(events.ListenerStarted(listener))
        return list(self.listeners)

    def has_room(self) -> bool:
        """Whether the connection limit allows one more: clients and the UDP
        associations' DNS channels together stay below it."""
        links = self.udp.links if self.udp is not None else 0
        return len(self.clients) + links < self.max_clients

    def check_credentials(self, username: bytes, password: bytes) -> bool:
        """Constant time, so how long the answer takes says nothing about the secret."""
        assert self.credentials is not None
        same_user = hmac.compare_digest(username, self.credentials[0])
        same_secret = hmac.compare_digest(password, self.credentials[1])
        return same_user and same_secret

    def accepted(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._connect(loop, conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(lambda: ProxyClient(self), conn)
        except OSError as exc:
            log.debug("could not set up an accepted connection: %s", exc)
            conn.close()

    def stop_accepting(self) -> None:
        # Sockets bound for a start-up that failed never listened: release them too.
        bound, self._bound = self._bound, []
        for sock in bound:
            sock.close()
        acceptors, self._acceptors = self._acceptors, []
        for acceptor in acceptors:
            acceptor.close()

    async def drain(self, seconds: float) -> None:
        """Stop accepting and give open connections up to ``seconds`` to finish."""
        self.stop_accepting()
        if self.clients and seconds > 0:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), seconds)

    def forget(self, client: ProxyClient) -> None:
        self.clients.discard(client)
        if not self.clients:
            self._idle.set()

    def close_clients(self) -> None:
        for client in list(self.clients):
            client.close()

    async def close(self) -> None:
        self.stop_accepting()
        self.close_clients()
        for task in list(self._tasks):
            task.cancel()


def _bind_group(addresses: tuple[str, ...], port: int, spec: str | None) -> list[socket.socket]:
    """Bind one socket per address on one port number. With port 0 the first address
    picks the port and the others must get the same one; a clash there retries."""
    attempts = 20 if port == 0 else 1
    last_error: OSError | None = None
    failed = addresses[0]
    for _ in range(attempts):
        bound: list[socket.socket] = []
        chosen = port
        try:
            for address in addresses:
                failed = address
                sock = _bind_one(address, chosen)
                if sock is None:
                    continue
                bound.append(sock)
                chosen = sock.getsockname()[1]
        except OSError as exc:
            for sock in bound:
                sock.close()
            last_error = exc
            if port == 0 and exc.errno == errno.EADDRINUSE and bound:
                continue
            break
        else:
            if not bound:
                raise ListenError(f"cannot listen on {spec or 'loopback'}: no usable address")
            return bound
    # Name the address that failed (with the port it was asked for), not the whole group.
    where = _describe((failed,), port)
    assert last_error is not None
    reason = last_error.strerror or str(last_error)
    hint = "pick another port with -D, or -D 0 for a free one"
    if last_error.errno in (errno.EACCES, errno.EPERM):
        hint = "ports below 1024 need privileges; pick a port above 1023"
    elif last_error.errno == errno.EADDRNOTAVAIL:
        hint = "that address is not on this machine"
    raise ListenError(f"cannot listen on {where}: {reason}", hint=hint) from last_error


def _describe(addresses: tuple[str, ...], port: int) -> str:
    return " and ".join(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses)


def _bind_one(address: str, port: int) -> socket.socket | None:
    """A bound socket that does not listen yet (connections to it are refused), or None
    when the default loopback of a family is missing (a host without IPv6 still serves
    127.0.0.1, as OpenSSH does)."""
    infos = socket.getaddrinfo(
        address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    family, kind, proto, _, sockaddr = infos[0]
    try:
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        if address in LOOPBACK + ANY and exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return None
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Each family gets its own socket, so [::] must not also take 0.0.0.0.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if address == "::1" and exc.errno == errno.EADDRNOTAVAIL:
            return None
        raise
    return sock


def _listen_on(sock: socket.socket) -> None:
    """Start listening on a socket :func:`_bind_one` bound. With SO_REUSEADDR, Linux lets
    another socket bind the same port while neither listens; whoever listens second
    gets EADDRINUSE here, which is the same "port in use" as at bind time."""
    try:
        sock.listen()
    except OSError as exc:
        host, port = sock.getsockname()[:2]
        raise ListenError(
            f"cannot listen on {_describe((host,), port)}: {exc.strerror or exc}",
            hint="pick another port with -D, or -D 0 for a free one",
        ) from exc
