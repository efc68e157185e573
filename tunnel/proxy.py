"""Listeners and the per-client connection.

Each client is one :class:`ProxyClient`, a thin :class:`asyncio.Protocol`: its first
byte says SOCKS or HTTP, and it hands the connection to a handler (the SOCKS handshake,
which hands a complete request to the handler of its command, or the HTTP session of
:mod:`tunnel.http_proxy`). It keeps the handshake deadline, and once a handler has a
channel it splices at the protocol level: client ``data_received`` goes straight to
``channel.write`` and the channel's data straight to ``transport.write``, with no task,
await or copy per chunk. Channels are opened only through the :class:`Router`, which
chooses an upstream for each :class:`~tunnel.upstreams.Request`.

Flow control: when the channel's send buffer passes its high-water mark the upstream
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
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, cast

from . import events
from .channels import Binder, Channel, ChannelSink, LentSocket
from .errors import ChannelOpenFailed, ListenError, ReplyReason
from .handlers.associate import AssociateHandler
from .handlers.base import Handler, normal_host
from .handlers.bind import BindHandler
from .handlers.connect import ConnectHandler
from .handlers.socks import CommandHandler, SocksHandshake, SocksSettings
from .http_proxy import HttpSession
from .names import printable
from .router import Router, RouteWay
from .rules import Route, Rule, Rules
from .socks import Command
from .throttle import LoginThrottle
from .udp import UdpSettings
from .upstreams import Request, Upstream

log = logging.getLogger(__name__)


class ProxyClient(asyncio.Protocol):
    """One client connection, from its first byte to its close. The first byte decides
    the protocol: 0x04 or 0x05 SOCKS, an ASCII letter HTTP/1.1, anything else a close.
    Until the relay starts, the connection belongs to one handler at a time."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        # Relaying once set; before that the handler (if the first byte came) owns it.
        self._channel: Channel | None = None
        self._handler: Handler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._deadline: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._client_eof = False
        self._closed = False
        self._over_limit = False
        self._remote_paused = False
        self._pending: list[bytes] | None = None
        # Read from the client before the relay (the handshake), and whether the channel
        # being opened may borrow the client's socket (nothing of it left to relay).
        self._consumed = 0
        self._may_lend = False
        self._loop = asyncio.get_running_loop()
        self.user: str | None = None
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
        self._consumed += len(data)
        handler = self._handler
        if handler is None:
            if self._closed:
                return
            handler = self._handler = self._server.sniff(self, data)
            handler.start()
        handler.data_received(data)

    def eof_received(self) -> bool:
        self._client_eof = True
        if self._channel is not None:
            self._channel.write_eof()
            return True
        if self._handler is not None:
            return self._handler.eof_received()
        # Not a byte came: a port probe or a preconnect the browser did not need.
        self.reject_client("client closed without sending a request", empty=True)
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

    def counted(self, up: int, down: int) -> None:
        self.info.bytes_up += up
        self.info.bytes_down += down

    def lend_socket(self) -> LentSocket | None:
        """A duplicate of the client's socket for an upstream that reads it itself, while
        a channel is being opened for a request with nothing pipelined after it (and so
        nothing we read that would have to go first). Reading is paused then, and a
        channel that reads the client keeps it so."""
        transport = self._transport
        if not self._may_lend or self._client_eof or self._closed or transport is None:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        if transport.is_reading():
            return None
        try:
            duplicate = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return None
        return LentSocket(duplicate, self._consumed, transport.get_write_buffer_size)

    def remote_closed(self, exc: BaseException | None) -> None:
        self._channel = None
        self._flush_pending()
        if self._transport is not None:
            # close() flushes what is still buffered towards the client first.
            self._transport.close()

    # -- for the handlers (tunnel.handlers.base.Client) -------------------------------

    @property
    def credentials(self) -> tuple[bytes, bytes] | None:
        return self._server.credentials

    @property
    def routing(self) -> tuple[tuple[Rule, ...], tuple[Route, ...]]:
        """The --allow/--deny rules and the routes, for the PAC file."""
        return self._server.rules.rules, self._server.routes

    @property
    def isolating(self) -> bool:
        return self._server.isolate

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a handler's work as a task this connection owns: cancelled when it
        closes, and awaited by the server's close."""
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._server.own(task)
        return task

    def hand_over(self, handler: Handler) -> None:
        """The next handler takes the connection (the SOCKS handshake hands over to the
        handler of the command)."""
        self._handler = handler

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

    def request(self, host: str, port: int) -> Request:
        """What the router sees of a request of this client."""
        origin = self.transport.get_extra_info("peername") or ("", 0)
        if self._server.isolate and self.user is not None:
            self.info.isolation = printable(self.user)
        return Request(
            host=host,
            port=port,
            origin=(str(origin[0]), int(origin[1])),
            protocol=self.info.protocol,
            user=self.user,
            listener=self.info.listener,
        )

    async def open_channel(
        self, host: str, port: int, sink: ChannelSink, *, lend: bool = False
    ) -> Channel:
        """Ask the router for a channel, after the connection limit; raise
        ChannelOpenFailed with the reason. The channel arrives paused. The host goes to
        the router in its normal form. ``lend``: nothing was pipelined after the request,
        so the upstream may read the client's socket itself (:meth:`lend_socket`)."""
        self.check_limit()
        request = self.request(normal_host(host), port)
        started = time.monotonic()
        self._may_lend = lend
        try:
            channel, self.info.upstream = await self._server.router.open_labelled(request, sink)
        except ChannelOpenFailed as exc:
            self.info.upstream = exc.upstream
            raise
        except Exception as exc:  # a bug or an unexpected failure: answer, never hang
            log.debug("opening %s:%s failed", request.host, port, exc_info=True)
            raise ChannelOpenFailed(
                ReplyReason.GENERAL_FAILURE, f"internal error: {exc!r}"
            ) from exc
        finally:
            self._may_lend = False
        if self._closed:
            channel.close()
            raise ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, "the client went away")
        self.opened(time.monotonic() - started)
        return channel

    def opened(self, seconds: float) -> None:
        self.info.open = True
        self._server.emit(events.ChannelOpened(self.info, seconds))

    def failed(self, exc: ChannelOpenFailed) -> None:
        self._server.emit(
            events.ChannelFailed(self.info, int(exc.reason), exc.reason.label, exc.message)
        )

    def start_relay(self, channel: Channel, pipelined: bytes) -> None:
        """Splice from here on: the reply is written, the channel may deliver."""
        self._channel = channel
        self._handler = None
        channel.resume_reading()
        if getattr(channel, "reads_client", False):
            # The upstream reads the client itself (lent before anything was pipelined,
            # with reading paused): it stays paused here for good.
            return
        if pipelined:
            self.info.bytes_up += len(pipelined)
            channel.write(pipelined)
        if self._client_eof:
            channel.write_eof()
        elif not self._remote_paused:
            # (If the pipelined bytes filled the channel, remote_resume will do it.)
            self.transport.resume_reading()

    def check_limit(self) -> None:
        if self._over_limit:
            raise ChannelOpenFailed(
                ReplyReason.GENERAL_FAILURE,
                f"too many connections (limit {self._server.max_clients})",
            )

    def check_policy(self, host: str, port: int) -> str:
        """The connection limit and the router's refusal, for a command that opens no
        channel through it; ChannelOpenFailed if refused. Returns the host in its
        normal form, which is what was checked."""
        self.check_limit()
        request = self.request(normal_host(host), port)
        self._server.router.check(request)
        self.info.upstream = self._server.router.name
        return request.host

    def login_failed(self) -> float:
        """Count a wrong proxy password from this client's address; how long to hold the
        answer. While it is held, the handshake deadline does not also close the client."""
        peer = self.transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else self.info.client
        hold = self._server.throttle.failed(address, self._server.clock())
        if hold > 0:
            self._cancel_deadline()
        return hold

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
        self._deadline = self._loop.call_later(
            self._server.handshake_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        if self._channel is None:
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
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.close()
        for task in self._tasks:
            task.cancel()
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
        upstream: Upstream,
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
        routes: Sequence[RouteWay] = (),
        reconnect_wait: float = 10.0,
        isolate: bool = False,
    ) -> None:
        # upstream: where the listeners' requests go unless a rule refuses them.
        # binder: SOCKS BIND through the SSH server; udp: UDP ASSOCIATE. Without them
        # those commands get 0x07. ``reverse`` marks the proxy behind -R listeners.
        self.udp = udp
        if udp is not None:
            # DNS channels of UDP associations count toward the connection limit.
            udp.room = self.has_room
        self.emit = emit
        self.handshake_timeout = handshake_timeout
        self.max_clients = max_clients
        self.rules = rules or Rules()
        self.router = Router(self.rules, upstream, routes, reconnect_wait=reconnect_wait)
        # The routes as written, for the PAC file.
        self.routes = tuple(way.route for way in routes)
        self.credentials = credentials
        # --isolate: the proxy user name keys the upstream's sessions (tunnel.isolation).
        self.isolate = isolate
        # The handler of each SOCKS command this proxy offers (the others get 0x07).
        commands: dict[Command, CommandHandler] = {Command.CONNECT: ConnectHandler}
        if binder is not None:
            commands[Command.BIND] = lambda c, k, r: BindHandler(c, k, r, binder)
        if udp is not None:
            commands[Command.UDP_ASSOCIATE] = lambda c, k, r: AssociateHandler(c, k, r, udp)
        self.socks = SocksSettings(
            commands,
            check_credentials=self.check_credentials if credentials is not None else None,
            # --isolate: any SOCKS5 login is welcome where none is checked.
            any_login=isolate and credentials is None,
            where="on this listener" if reverse else "here",
        )
        # Slows down password guessing, per client address; see tunnel.throttle.
        self.throttle = LoginThrottle() if throttle is None else throttle
        self.clock = clock
        self.clients: set[ProxyClient] = set()
        self.ids = ids or itertools.count(1)
        self.listeners: list[events.Listener] = []
        self.starved = False
        self._bound: list[socket.socket] = []  # bound, not yet listening
        self._acceptors: list[_Acceptor] = []
        # Every task of this proxy and its clients: close() cancels and awaits them.
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()

    def sniff(self, client: ProxyClient, first: bytes) -> Handler:
        """The handler for a client, by its first byte: a letter starts an HTTP request,
        anything else is SOCKS (whose codec refuses what is not)."""
        if first[:1].isalpha():
            return HttpSession(client)
        return SocksHandshake(client, self.socks)

    def own(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        self.own(loop.create_task(self._connect(loop, conn)))

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
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Awaited, so nothing of this proxy outlives it (and no task is left pending).
        await asyncio.gather(*tasks, return_exceptions=True)


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
        except socket.gaierror as exc:
            # The address is the problem, not the port: no other port would do better.
            for sock in bound:
                sock.close()
            raise ListenError(
                f"cannot listen on {_describe((failed,), port)}: cannot resolve {failed} "
                f"({exc.strerror or exc})",
                hint="give an address of this machine, such as 127.0.0.1 or ::1, or a name "
                "that resolves to one",
            ) from exc
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
        if port != 0:
            # A port asked for by number may still have connections of an earlier run in
            # TIME_WAIT. A port the system picks gets no SO_REUSEADDR: with it, Linux may
            # pick a port that another socket holds bound but not yet listening (as ours
            # is until the tunnel is up), and one of the two could not listen.
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
