"""HTTP/1.1 proxying on the SOCKS port: the asyncio side, driven by h11.

A client whose first byte is a letter gets an :class:`HttpSession`. ``CONNECT`` becomes
a spliced channel (the client's own relay takes over once ``200`` is written);
absolute-form requests are forwarded in origin form with keep-alive on both sides; and
pytunnel answers for itself at ``/proxy.pac`` and ``/wpad.dat``. h11 is fed straight
from ``data_received`` and reading pauses until the session asks for more, so neither
side buffers more than a chunk. What the session needs from the client connection is
the small :class:`HttpClient` protocol; it never imports the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Coroutine, Sequence
from http import HTTPStatus
from typing import Any, Protocol

import h11

from . import events
from .channels import Channel, ChannelSink
from .errors import ChannelOpenFailed
from .http import (
    HEAD_TOO_LARGE,
    MAX_HEAD,
    PAC_TYPE,
    REALM,
    BadTarget,
    Kind,
    Target,
    basic_user,
    check_basic,
    forward_headers,
    head_too_large,
    pac_file,
    parse_target,
    protocol_error_reason,
    status_for,
)
from .names import user_name
from .rules import Route, Rule

log = logging.getLogger(__name__)


class HttpClient(ChannelSink, Protocol):
    """The client connection, as the HTTP session uses it (also the sink of a CONNECT
    channel, which it splices)."""

    info: events.ConnectionInfo
    user: str | None

    @property
    def transport(self) -> asyncio.Transport: ...
    @property
    def credentials(self) -> tuple[bytes, bytes] | None: ...
    @property
    def routing(self) -> tuple[tuple[Rule, ...], tuple[Route, ...]]: ...
    @property
    def isolating(self) -> bool: ...
    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...
    async def drained(self) -> None: ...
    def parsed(
        self, protocol: str, command: str, host: str, port: int, sent_name: bool
    ) -> None: ...
    async def open_channel(
        self, host: str, port: int, sink: ChannelSink, *, lend: bool = False
    ) -> Channel: ...
    def failed(self, exc: ChannelOpenFailed) -> None: ...
    def start_relay(self, channel: Channel, pipelined: bytes) -> None: ...
    @property
    def idle_timeout(self) -> float: ...
    def arm_deadline(self) -> None: ...
    def reject_client(self, reason: str, *, auth: bool = False, close: bool = True) -> None: ...
    def login_failed(self) -> float: ...


class _Fed:
    """An h11 connection fed from callbacks, one chunk at a time: the source pauses after
    each chunk and resumes only when :meth:`next_event` needs more, so nothing piles up."""

    def __init__(self, conn: h11.Connection) -> None:
        self.conn = conn
        self.wakeup = asyncio.Event()

    def pause_source(self) -> None:
        raise NotImplementedError

    def resume_source(self) -> None:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if data:
            self.pause_source()
        self.wakeup.set()

    def check_pending(self) -> None:
        """Refuse what h11 holds before it is parsed (raise ``RemoteProtocolError``)."""

    async def next_event(self) -> Any:
        while True:
            self.check_pending()
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.wakeup.clear()
            self.resume_source()
            await self.wakeup.wait()


# What a kept-alive origin channel may be reused for: destination and proxy user.
_OriginKey = tuple[str, int, str | None]


class _Origin(_Fed):
    """The origin side of an absolute-form HTTP request: a channel whose bytes feed an
    h11 client connection."""

    def __init__(self, client: HttpClient, key: _OriginKey) -> None:
        super().__init__(h11.Connection(h11.CLIENT))
        self.client = client
        self.key = key
        self.channel: Channel | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.ended = False

    def pause_source(self) -> None:
        if self.channel is not None:
            self.channel.pause_reading()

    def resume_source(self) -> None:
        if self.channel is not None:
            self.channel.resume_reading()

    def remote_data(self, data: bytes) -> None:
        self.client.info.bytes_down += len(data)
        self.feed(data)

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
            self.feed(b"")
        self.wakeup.set()

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data and self.channel is not None:
            self.client.info.bytes_up += len(data)
            self.channel.write(data)
            await self.writable.wait()

    def reusable_for(self, key: _OriginKey) -> bool:
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


class HttpSession(_Fed):
    """HTTP/1.1 from a client: CONNECT becomes a spliced channel, absolute-form requests
    are forwarded in origin form (keep-alive on both sides), and pytunnel answers for
    itself at /proxy.pac and /wpad.dat."""

    def __init__(self, client: HttpClient) -> None:
        super().__init__(h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD))
        self.client = client
        self.origin: _Origin | None = None
        self.relaying = False

    # -- the client connection's handler (tunnel.handlers.base.Handler) ---------------

    def start(self) -> None:
        # The client owns the task: it cancels it on close, and the proxy awaits it.
        self.client.spawn(self.run())

    def data_received(self, data: bytes) -> None:
        self.feed(data)

    def eof_received(self) -> bool:
        self.feed(b"")
        return True

    def pause_source(self) -> None:
        self.client.transport.pause_reading()

    def resume_source(self) -> None:
        if not self.client.transport.is_closing():
            self.client.transport.resume_reading()

    def check_pending(self) -> None:
        # h11 bounds a head only while it is incomplete: one that arrived whole in a
        # single read would be parsed and forwarded at any size. So look before it parses.
        if self.conn.their_state is h11.IDLE:
            pending, _ = self.conn.trailing_data
            if head_too_large(pending):
                raise h11.RemoteProtocolError(HEAD_TOO_LARGE, error_status_hint=431)

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
                self.client.arm_deadline()
        except h11.RemoteProtocolError as exc:
            # h11's text may quote the bad line, credentials and all: say only what kind
            # of thing was wrong, to the client and in the logs alike.
            what = protocol_error_reason(str(exc))
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                # h11 lets a server answer a broken request; if even that fails, close.
                with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                    await self.respond(exc.error_status_hint, f"bad request: {what}")
            self.client.reject_client(f"HTTP protocol error: {what}")
        except h11.LocalProtocolError as exc:
            log.debug("HTTP client #%s: %s", self.client.info.id, protocol_error_reason(str(exc)))
        except ConnectionError as exc:
            log.debug("HTTP client #%s: %s", self.client.info.id, exc)
        finally:
            if self.origin is not None:
                self.origin.close()
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
        try:
            target = parse_target(request.method, request.target)
        except BadTarget as exc:
            await self.respond(400, str(exc))
            return False
        if target.kind is Kind.PAC:
            listener = self.client.info.listener
            denied, routes = self.client.routing
            body = pac_file(
                listener,
                auth=self.client.credentials is not None,
                denied=denied,
                routes=routes,
            )
            await self.respond(200, "", content_type=PAC_TYPE, body=body, close=False)
            return await self._finish_body()
        if target.kind is Kind.LOCAL:
            await self.respond(404, "not found: this is pytunnel; try /proxy.pac", close=False)
            return await self._finish_body()
        credentials = self.client.credentials
        header = next((v for n, v in request.headers if n.lower() == b"proxy-authorization"), None)
        if credentials is None and self.client.isolating:
            # Any Basic user name is an isolation key, unchecked; each request of a
            # kept-alive connection has its own (none: the shared default).
            user = basic_user(header)
            self.client.user = None if user is None else user_name(user)
        if credentials is not None:
            if not check_basic(header, *credentials):
                self.client.reject_client("wrong proxy credentials (HTTP)", auth=True, close=False)
                # No header at all is the challenge every browser starts with, not a guess.
                hold = self.client.login_failed() if header is not None else 0.0
                if hold > 0:
                    # Held without blocking anyone: this task waits, the loop serves on
                    # (and reads nothing more meanwhile: feed() paused the client).
                    await asyncio.sleep(hold)
                await self.respond(
                    407,
                    "proxy authentication required",
                    extra=[(b"Proxy-Authenticate", f'Basic realm="{REALM}"'.encode())],
                )
                return False
            # One user name per proxy today: the one the password was checked against.
            self.client.user = user_name(credentials[0])
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
            pipelined, _ = self.conn.trailing_data
            channel = await client.open_channel(
                target.host, target.port, client, lend=not pipelined
            )
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
        # The proxy user too: under --isolate a channel opened for one name went through
        # that name's SSH session, so another name's request must not reuse it.
        key = (target.host, target.port, client.user)
        origin = self.origin
        if origin is None or not origin.reusable_for(key):
            if origin is not None:
                origin.close()
            self.origin = origin = _Origin(client, key)
            try:
                origin.channel = await client.open_channel(target.host, target.port, origin)
            except ChannelOpenFailed as exc:
                self.origin = None
                client.failed(exc)
                await self.respond(status_for(exc.reason), f"{exc.reason.label}: {exc.message}")
                return False
            origin.channel.resume_reading()
        else:
            origin.conn.start_next_cycle()
        # Host is the URL's (RFC 9112 section 3.2.2), whatever the client sent: the rules
        # checked the URL's host, and a server picks its site by this header.
        headers = [(b"Host", _host_header(target))] + [
            (name, value)
            for name, value in forward_headers(list(request.headers))
            if name.lower() != b"host"
        ]
        await origin.send(h11.Request(method=request.method, target=target.path, headers=headers))
        if self.conn.they_are_waiting_for_100_continue:
            # The client holds its body until "100 Continue": relay the origin's answer
            # (a proxy must pass 1xx on). An origin that says nothing in a second gets
            # the body anyway, as clients themselves do.
            try:
                early = await asyncio.wait_for(origin.next_event(), _CONTINUE_WAIT)
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
                await self._relay_response(origin, target, early)
                return False
        while True:
            # The handshake deadline ended with the head; the body gets the same bound
            # between two pieces, or a client that stops sending holds a channel forever.
            try:
                async with asyncio.timeout(self.client.idle_timeout):
                    event = await self.next_event()
            except TimeoutError:
                await self._body_stalled()
                return False
            if isinstance(event, h11.Data):
                await origin.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await origin.send(h11.EndOfMessage())
                break
            else:
                return False
        return await self._relay_response(origin, target, None)

    async def _body_stalled(self) -> None:
        """408 for a request body that stopped arriving; the caller then closes the
        client and the channel."""
        seconds = f"{self.client.idle_timeout:g} s"
        self.client.reject_client(f"request body stalled for {seconds}", close=False)
        if self.conn.our_state is h11.SEND_RESPONSE:
            await self.respond(408, f"the request body stalled for {seconds}")

    async def _relay_response(self, origin: _Origin, target: Target, first: Any) -> bool:
        """Pass the origin's response on; True if both sides may keep the connection."""
        while True:
            try:
                answer = first if first is not None else await origin.next_event()
                first = None
            except h11.RemoteProtocolError as exc:
                if self.conn.our_state is h11.SEND_RESPONSE:
                    what = protocol_error_reason(str(exc))
                    await self.respond(502, f"bad response from {target.host}: {what}")
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
        """Close the origin side; the task is the client's, which cancels it."""
        if self.origin is not None:
            self.origin.close()


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
