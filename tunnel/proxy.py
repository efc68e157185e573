"""SOCKS listeners and the per-client relay.

Each client is one :class:`asyncio.Protocol`. It feeds the sans-I/O codec until a
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
import errno
import hmac
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import Any, cast

import h11

from . import events
from .channels import Channel, ChannelSink, Opener
from .errors import ChannelOpenFailed, ListenError, RemoteProtocolError, ReplyReason
from .http import (
    PAC_TYPE,
    REALM,
    BadTarget,
    Kind,
    Target,
    check_basic,
    forward_headers,
    pac_file,
    parse_target,
    status_for,
)
from .rules import Rules
from .socks import (
    NEED_DATA,
    Command,
    Credentials,
    Request,
    ServerConnection,
    SocksVersion,
    State,
)

log = logging.getLogger(__name__)


class ProxyClient(asyncio.Protocol):
    """One client connection, from its first byte to its close. The first byte decides
    the protocol: 0x04 or 0x05 SOCKS, an ASCII letter HTTP/1.1, anything else a close."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._codec = ServerConnection(require_auth=server.credentials is not None)
        self._transport: asyncio.Transport | None = None
        self._channel: Channel | None = None
        self._open_task: asyncio.Task[None] | None = None
        self._http: _HttpSession | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._client_eof = False
        self._closed = False
        self._over_limit = False
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
        self._over_limit = len(self._server.clients) >= self._server.max_clients
        self._server.clients.add(self)
        self._arm_deadline()
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
        if self._open_task is not None:
            # Pipelined after the request: the codec keeps it as trailing data.
            self._codec.receive_data(data)
            return
        if self._codec.state is State.START and data[:1].isalpha():
            self._http = _HttpSession(self)
            self._http.feed(data)
            return
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
        if self._open_task is not None:
            # The whole request (and maybe data) came before EOF: pass it on later.
            return True
        self._reject_client("client closed its side during the handshake")
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
        self.info.bytes_down += len(data)
        assert self._transport is not None
        self._transport.write(data)

    def remote_eof(self) -> None:
        assert self._transport is not None
        if not self._transport.is_closing():
            self._transport.write_eof()

    def remote_pause(self) -> None:
        assert self._transport is not None
        self._transport.pause_reading()

    def remote_resume(self) -> None:
        assert self._transport is not None
        if not self._transport.is_closing():
            self._transport.resume_reading()

    def remote_closed(self, exc: BaseException | None) -> None:
        self._channel = None
        if self._transport is not None:
            # close() flushes what is still buffered towards the client first.
            self._transport.close()

    # -- shared by SOCKS and HTTP ----------------------------------------------------

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    async def drained(self) -> None:
        """Wait while the client's socket buffer is full."""
        await self._writable.wait()

    def parsed(self, protocol: str, command: str, host: str, port: int, sent_name: bool) -> None:
        self._cancel_deadline()
        self.info.protocol = protocol
        self.info.host = host
        self.info.port = port
        self._server.emit(events.RequestParsed(self.info, protocol, command, host, port, sent_name))

    async def open_channel(self, host: str, port: int, sink: ChannelSink) -> Channel:
        """Ask the opener for a channel, after the limits and the rules; raise
        ChannelOpenFailed with the reason. The channel arrives paused."""
        if self._over_limit:
            raise ChannelOpenFailed(
                ReplyReason.GENERAL_FAILURE,
                f"too many connections (limit {self._server.max_clients})",
            )
        rule = self._server.rules.denies(host, port)
        if rule is not None:
            raise ChannelOpenFailed(ReplyReason.CONNECTION_NOT_ALLOWED, f"denied by {rule}")
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
        else:
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
                    self.transport.write(self._codec.reject_auth())
                    self._reject_client("wrong proxy credentials (SOCKS5)", auth=True)
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
        self.parsed(protocol, request.command.name, request.host, request.port, request.sent_name)
        if request.command is not Command.CONNECT:
            reason = ReplyReason.COMMAND_NOT_SUPPORTED
            self._socks_fail(ChannelOpenFailed(reason, f"{request.command.name} not supported"))
            return
        if request.version is SocksVersion.SOCKS4 and self._server.credentials is not None:
            self._socks_fail(
                ChannelOpenFailed(
                    ReplyReason.CONNECTION_NOT_ALLOWED,
                    "SOCKS4 has no password and this proxy requires one: use SOCKS5 or HTTP",
                )
            )
            return
        # Stop reading until the channel is open: what was pipelined stays bounded.
        self.transport.pause_reading()
        self._open_task = asyncio.get_running_loop().create_task(self._socks_open(request))

    async def _socks_open(self, request: Request) -> None:
        try:
            channel = await self.open_channel(request.host, request.port, self)
        except ChannelOpenFailed as exc:
            self._socks_fail(exc)
            return
        self.transport.write(self._codec.accept())
        # Channels arrive paused so that nothing can overtake the reply; now it is out.
        self.start_relay(channel, self._codec.trailing_data)

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
        self._reject_client(exc.message)

    def _reject_client(self, reason: str, *, auth: bool = False) -> None:
        self._server.emit(events.ClientRejected(self.info, reason, auth=auth))
        if self._transport is not None:
            self._transport.close()

    # -- deadlines and closing --------------------------------------------------------

    def _arm_deadline(self) -> None:
        """The handshake bound; for HTTP keep-alive also the idle bound between requests."""
        self._cancel_deadline()
        self._deadline = asyncio.get_running_loop().call_later(
            self._server.handshake_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        if self._channel is None and self._open_task is None:
            self._reject_client(f"no complete request within {self._server.handshake_timeout:g} s")

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
        if self._open_task is not None and not self._open_task.done():
            self._open_task.cancel()
        if self._http is not None:
            self._http.close()
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


class _Upstream:
    """The origin side of an absolute-form HTTP request: a channel whose bytes feed an
    h11 client connection. Reading pauses until the handler asks for more."""

    def __init__(self, client: ProxyClient, key: tuple[str, int]) -> None:
        self.client = client
        self.key = key
        self.conn = h11.Connection(h11.CLIENT)
        self.channel: Channel | None = None
        self.wakeup = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.ended = False

    def remote_data(self, data: bytes) -> None:
        self.client.info.bytes_down += len(data)
        self.conn.receive_data(data)
        if self.channel is not None:
            self.channel.pause_reading()
        self.wakeup.set()

    def remote_eof(self) -> None:
        self._end()

    def remote_pause(self) -> None:
        self.writable.clear()

    def remote_resume(self) -> None:
        self.writable.set()

    def remote_closed(self, exc: BaseException | None) -> None:
        self._end()
        self.writable.set()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.conn.receive_data(b"")
        self.wakeup.set()

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.wakeup.clear()
            if self.channel is not None:
                self.channel.resume_reading()
            await self.wakeup.wait()

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data and self.channel is not None:
            self.client.info.bytes_up += len(data)
            self.channel.write(data)
            await self.writable.wait()

    def reusable_for(self, key: tuple[str, int]) -> bool:
        return (
            self.key == key
            and not self.ended
            and self.conn.our_state is h11.DONE
            and self.conn.their_state is h11.DONE
        )

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


class _HttpSession:
    """HTTP/1.1 from a client: CONNECT becomes a spliced channel, absolute-form requests
    are forwarded in origin form (keep-alive on both sides), and pytunnel answers for
    itself at /proxy.pac and /wpad.dat."""

    def __init__(self, client: ProxyClient) -> None:
        self.client = client
        self.conn = h11.Connection(h11.SERVER)
        self.wakeup = asyncio.Event()
        self.upstream: _Upstream | None = None
        self.relaying = False
        self.task = asyncio.get_running_loop().create_task(self.run())

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if data:
            # One chunk at a time: reading resumes when the handler needs more.
            self.client.transport.pause_reading()
        self.wakeup.set()

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.wakeup.clear()
            if not self.client.transport.is_closing():
                self.client.transport.resume_reading()
            await self.wakeup.wait()

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            self.client.transport.write(data)
            await self.client.drained()

    async def run(self) -> None:
        try:
            while True:
                event = await self.next_event()
                if not isinstance(event, h11.Request):
                    return
                if not await self.handle(event):
                    return
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return
                self.conn.start_next_cycle()
                self.client._arm_deadline()
        except h11.RemoteProtocolError as exc:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                # h11 lets a server answer a broken request; if even that fails, close.
                with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                    await self.respond(exc.error_status_hint, f"bad request: {exc}")
            self.client._reject_client(f"HTTP protocol error: {exc}")
        except (ConnectionError, h11.LocalProtocolError) as exc:
            log.debug("HTTP client #%s: %s", self.client.info.id, exc)
        finally:
            if self.upstream is not None:
                self.upstream.close()
            if not self.relaying and not self.client.transport.is_closing():
                self.client.transport.close()

    async def respond(
        self,
        status: int,
        text: str,
        *,
        content_type: bytes = b"text/plain; charset=utf-8",
        body: bytes | None = None,
        extra: Sequence[tuple[bytes, bytes]] = (),
        close: bool = True,
    ) -> None:
        payload = body if body is not None else (text + "\n").encode()
        headers = [
            (b"Content-Type", content_type),
            (b"Content-Length", str(len(payload)).encode()),
            *extra,
        ]
        if close:
            headers.append((b"Connection", b"close"))
        reason = HTTPStatus(status).phrase.encode() if status in _STATUSES else b""
        await self.send(h11.Response(status_code=status, headers=headers, reason=reason))
        await self.send(h11.Data(data=payload))
        await self.send(h11.EndOfMessage())

    async def handle(self, request: h11.Request) -> bool:
        """Serve one request; True to keep the client connection for another."""
        server = self.client._server
        try:
            target = parse_target(request.method, request.target)
        except BadTarget as exc:
            await self.respond(400, str(exc))
            return False
        if target.kind is Kind.PAC:
            listener = self.client.info.listener
            await self.respond(200, "", content_type=PAC_TYPE, body=pac_file(listener), close=False)
            return await self._finish_body()
        if target.kind is Kind.LOCAL:
            await self.respond(404, "not found: this is pytunnel; try /proxy.pac", close=False)
            return await self._finish_body()
        if server.credentials is not None:
            header = next(
                (v for n, v in request.headers if n.lower() == b"proxy-authorization"), None
            )
            if not check_basic(header, *server.credentials):
                self.client._server.emit(
                    events.ClientRejected(
                        self.client.info, "wrong proxy credentials (HTTP)", auth=True
                    )
                )
                await self.respond(
                    407,
                    "proxy authentication required",
                    extra=[(b"Proxy-Authenticate", f'Basic realm="{REALM}"'.encode())],
                )
                return False
        if target.kind is Kind.CONNECT:
            await self.connect(target)
            return False
        return await self.forward(request, target)

    async def _finish_body(self) -> bool:
        """Read (and drop) what is left of a request we answered ourselves."""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.EndOfMessage):
                return True
            if not isinstance(event, h11.Data):
                return False

    async def connect(self, target: Target) -> None:
        client = self.client
        client.parsed("http-connect", "CONNECT", target.host, target.port, _is_name(target.host))
        client.transport.pause_reading()
        try:
            channel = await client.open_channel(target.host, target.port, client)
        except ChannelOpenFailed as exc:
            client.failed(exc)
            await self.respond(status_for(exc.reason), f"{exc.reason.label}: {exc.message}")
            return
        await self.send(h11.Response(status_code=200, headers=[], reason=b"Connection established"))
        self.relaying = True
        pipelined, _ = self.conn.trailing_data
        client.start_relay(channel, bytes(pipelined))

    async def forward(self, request: h11.Request, target: Target) -> bool:
        client = self.client
        client.parsed(
            "http", request.method.decode(), target.host, target.port, _is_name(target.host)
        )
        key = (target.host, target.port)
        upstream = self.upstream
        if upstream is None or not upstream.reusable_for(key):
            if upstream is not None:
                upstream.close()
            self.upstream = upstream = _Upstream(client, key)
            try:
                upstream.channel = await client.open_channel(target.host, target.port, upstream)
            except ChannelOpenFailed as exc:
                self.upstream = None
                client.failed(exc)
                await self.respond(status_for(exc.reason), f"{exc.reason.label}: {exc.message}")
                return False
            upstream.channel.resume_reading()
        else:
            upstream.conn.start_next_cycle()
        headers = forward_headers(list(request.headers))
        if not any(name.lower() == b"host" for name, _ in headers):
            headers.insert(0, (b"Host", _host_header(target)))
        await upstream.send(h11.Request(method=request.method, target=target.path, headers=headers))
        if self.conn.they_are_waiting_for_100_continue:
            # The client holds its body until "100 Continue": relay the origin's answer
            # (a proxy must pass 1xx on). An origin that says nothing in a second gets
            # the body anyway, as clients themselves do.
            try:
                early = await asyncio.wait_for(upstream.next_event(), _CONTINUE_WAIT)
            except TimeoutError:
                early = None
            if isinstance(early, h11.InformationalResponse):
                await self.send(
                    h11.InformationalResponse(
                        status_code=early.status_code,
                        headers=forward_headers(list(early.headers)),
                        reason=early.reason,
                    )
                )
            elif early is not None:
                # A final answer without the body: pass it on, then this connection ends.
                await self._relay_response(upstream, target, early)
                return False
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                await upstream.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await upstream.send(h11.EndOfMessage())
                break
            else:
                return False
        return await self._relay_response(upstream, target, None)

    async def _relay_response(self, upstream: _Upstream, target: Target, first: Any) -> bool:
        """Pass the origin's response on; True if both sides may keep the connection."""
        while True:
            try:
                answer = first if first is not None else await upstream.next_event()
                first = None
            except h11.RemoteProtocolError as exc:
                if self.conn.our_state is h11.SEND_RESPONSE:
                    await self.respond(502, f"bad response from {target.host}: {exc}")
                return False
            if isinstance(answer, h11.InformationalResponse):
                continue
            if isinstance(answer, h11.Response):
                await self.send(
                    h11.Response(
                        status_code=answer.status_code,
                        headers=forward_headers(list(answer.headers)),
                        reason=answer.reason,
                    )
                )
            elif isinstance(answer, h11.Data):
                await self.send(h11.Data(data=answer.data))
            elif isinstance(answer, h11.EndOfMessage):
                await self.send(h11.EndOfMessage())
                return True
            else:
                if self.conn.our_state is h11.SEND_RESPONSE:
                    await self.respond(502, f"{target.host} closed the connection")
                return False

    def close(self) -> None:
        if not self.task.done():
            self.task.cancel()
        if self.upstream is not None:
            self.upstream.close()


_STATUSES = frozenset(HTTPStatus)
_CONTINUE_WAIT = 1.0


def _is_name(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _host_header(target: Target) -> bytes:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return (host if target.port == 80 else f"{host}:{target.port}").encode()


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
    ) -> None:
        self.opener = opener
        self.emit = emit
        self.handshake_timeout = handshake_timeout
        self.max_clients = max_clients
        self.rules = rules or Rules()
        self.credentials = credentials
        self.clients: set[ProxyClient] = set()
        self.ids = itertools.count(1)
        self.listeners: list[events.Listener] = []
        self.starved = False
        self._acceptors: list[_Acceptor] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()

    async def listen(self, specs: Iterable[tuple[str | None, int]]) -> list[events.Listener]:
        """Bind every ``(host, port)``; all or nothing: on any failure, close what was
        bound and raise :class:`ListenError`."""
        bound: list[socket.socket] = []
        try:
            for host, port in specs:
                bound.extend(_bind_group(bind_addresses(host), port, host))
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        # Only now that every address is bound: nothing is announced that then closes.
        for sock in bound:
            self._acceptors.append(_Acceptor(self, sock))
            host, port = sock.getsockname()[:2]
            listener = events.Listener(host, port)
            self.listeners.append(listener)
            self.emit(events.ListenerStarted(listener))
        return list(self.listeners)

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
    for _ in range(attempts):
        bound: list[socket.socket] = []
        chosen = port
        try:
            for address in addresses:
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
    where = _describe(addresses, port)
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
    """A listening socket, or None when the default loopback of a family is missing
    (a host without IPv6 still serves 127.0.0.1, as OpenSSH does)."""
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
        sock.listen()
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if address == "::1" and exc.errno == errno.EADDRNOTAVAIL:
            return None
        raise
    return sock
