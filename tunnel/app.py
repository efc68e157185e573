"""Composition root: builds the session and the proxy, runs them, owns signals and the
shutdown order (stop accepting, close clients, close the SSH session)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from . import events
from .channels import Channel, ChannelSink
from .config import (
    Config,
    Destination,
    Forward,
    HostKeyPolicy,
    is_loopback_address,
    literal_forward,
    merge_forwards,
    open_proxy_forwards,
    parse_destination,
)
from .errors import (
    ChannelOpenFailed,
    CommandFailed,
    ConfigError,
    ExitStatus,
    ReplyReason,
    SessionClosed,
    SessionError,
)
from .isolation import Closer, Isolated, OnDemand
from .keeper import SshUpstream, Supervisor
from .master import MasterUpstream, master_upstream
from .names import printable
from .platform import on_signals
from .pool import SessionPool
from .proxy import ProxyServer
from .retry import is_retryable
from .reverse import ReverseForwards
from .router import Choice, RouteWay
from .rules import DIRECT, REJECT, RoutedRules
from .session import Session
from .sshconfig import apply_ssh_config, resolve_control_path
from .stats import Stats
from .tasks import Owner, cancel_and_wait
from .udp import UdpSettings
from .upstreams import Direct, Reject, Request, Upstream
from .watch import Wake, watch

log = logging.getLogger(__name__)


# How long a command gets to exit after SIGTERM before it is killed.
_COMMAND_GRACE = 5.0


class _Stop:
    """Why the tunnel is stopping: the first signal wins; a second Ctrl-C calls
    ``on_force_exit`` at once (the CLI ends the process there: only it exits)."""

    def __init__(self, on_force_exit: Callable[[], None]) -> None:
        self.event = asyncio.Event()
        self.status = ExitStatus.OK
        self.signal: int | None = None
        self.on_force_exit = on_force_exit

    def request(self, signum: int) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            self.on_force_exit()
            return
        self.signal = signum
        self.status = ExitStatus.INTERRUPTED if signum == signal.SIGINT else ExitStatus.OK
        self.event.set()


_SESSION_EVENTS = (
    events.SessionConnecting,
    events.SessionUp,
    events.SessionLost,
    events.ReconnectScheduled,
)


class SshWay:
    """A route's SSH destination: its own session (or pool), supervisor and state. It
    connects on first use, so a route to a host that is down never holds up the start;
    after a failure its supervisor keeps retrying in the background, and the router
    meanwhile sends the route's requests to the next destination of its list."""

    def __init__(
        self,
        label: str,
        config: Config,
        emit: events.Sink,
        prompter: events.Prompter | None,
        owner: Owner,
    ) -> None:
        self.name = label
        self.config = config
        self._emit_to = emit
        self.session = Session(config, self.emit, prompter)
        self.pool = (
            SessionPool(self.session, config.ssh_connections)
            if config.ssh_connections > 1
            else None
        )
        # A first connection that fails is retried like a lost one: this destination
        # is one way among several, and never decides whether the tunnel runs.
        self.supervisor = Supervisor(
            self.session, dataclasses.replace(config, retry_start=True), self.emit
        )
        self.upstream: Upstream = SshUpstream(self.pool or self.session, self.supervisor.demand)
        self.isolated: Isolated | None = None
        if config.isolate:
            # --isolate holds on every way out over SSH: a user name gets its own
            # session to this destination too.
            self.upstream = self.isolated = isolating(config, self.emit, prompter, self.upstream)
        self.owner = owner
        self.task: asyncio.Task[None] | None = None
        self.down_reason: str | None = None  # set while known down
        self.dead: str | None = None  # a failure retrying cannot fix
        self._changed = asyncio.Event()

    def emit(self, event: events.Event) -> None:
        """The session's events, labelled with this destination; they also move its
        state (the router reads it)."""
        if isinstance(event, _SESSION_EVENTS):
            event = dataclasses.replace(event, upstream=self.name)
            if isinstance(event, events.SessionLost | events.ReconnectScheduled):
                self.down_reason = event.reason
            elif isinstance(event, events.SessionUp):
                self.down_reason = None
            self._emit_to(event)
            self._wake()
            return
        self._emit_to(event)

    def _wake(self) -> None:
        # Everyone waiting sees the change; later waiters wait for the next one.
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def is_up(self) -> bool:
        return self.session.is_up

    @property
    def is_down(self) -> bool:
        return not self.is_up and (self.dead is not None or self.down_reason is not None)

    def in_use(self) -> bool:
        """Asked for at least once (it connects on first use)."""
        return self.task is not None

    def start(self) -> None:
        if self.task is None:
            self.task = self.owner.spawn(self._run())

    async def _run(self) -> None:
        try:
            try:
                await self.session.connect()
            except SessionError as exc:
                if not is_retryable(exc):
                    raise
                self.down_reason = exc.message
                self._wake()
                await self.supervisor.start()
            await self.supervisor.keep_up()
        except SessionError as exc:
            self.dead = exc.message
            self._emit_to(
                events.Notice(
                    f"route destination {self.name} failed for good: {exc.message}; "
                    "what is routed to it fails until pytunnel is restarted"
                )
            )
            self._wake()

    async def _wait(self, within: float, done: Callable[[], bool]) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.is_up

    async def settle(self) -> bool:
        """Connect on first use; wait until up or known down, within --open-timeout."""
        self.start()
        return await self._wait(self.config.open_timeout, lambda: self.is_up or self.is_down)

    async def wait_up(self, within: float) -> bool:
        self.start()
        return await self._wait(within, lambda: self.is_up or self.dead is not None)

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        return await self.upstream.open(request, sink)

    async def close(self) -> None:
        if self.isolated is not None:
            await self.isolated.close()
        if self.pool is not None:
            await self.pool.close()
        await self.session.close()


def route_config(base: Config, alias: str) -> Config:
    """A route destination's own settings: the command line's SSH options (-o, -i, -c
    and the like, which ssh applies to any host), but its own ssh_config block, host
    keys, jump hosts and ProxyCommand. -J, ProxyJump and ProxyCommand on the command
    line belong to the command line's destination."""
    return apply_ssh_config(
        dataclasses.replace(
            base,
            destination=parse_destination(alias),
            jump_hosts=None,
            proxy_command=None,
            hops=(),
            proxy_run=None,
            forwards=(),
            reverse_forwards=(),
            routes=(),
        )
    )


def make_way(
    label: str,
    config: Config,
    emit: events.Sink,
    prompter: events.Prompter | None,
    owner: Owner,
) -> SshWay:
    """The way out through one SSH destination of a route: the one place that decides
    what carries it (an asyncssh session today)."""
    return SshWay(label, route_config(config, label), emit, prompter, owner)


def build_routes(
    config: Config,
    direct: Direct,
    emit: events.Sink,
    prompter: events.Prompter | None,
    owner: Owner,
) -> tuple[list[RouteWay], list[SshWay]]:
    """Each route with its target made concrete; a destination named in several routes
    is one session, shared."""
    ways: dict[str, SshWay] = {}
    routed: list[RouteWay] = []
    for route in config.routes:
        if route.target == (DIRECT,):
            choice = Choice(DIRECT, direct)
        elif route.target == (REJECT,):
            choice = Choice(REJECT, Reject(f"rejected by route {route}"))
        else:
            for alias in route.target:
                if alias not in ways:
                    ways[alias] = make_way(alias, config, emit, prompter, owner)
            choice = Choice(route.label, standbys=tuple(ways[a] for a in route.target))
        routed.append(RouteWay(route, choice))
    return routed, list(ways.values())


def listeners_to_open(config: Config) -> Config:
    """The final -D list, once ssh_config has added its DynamicForward lines: -g opens
    the ones without an address to every interface; none at all, or an open proxy by
    accident, is a usage error."""
    if config.gateway_ports:
        config = dataclasses.replace(
            config,
            forwards=tuple(
                Forward("" if f.host is None else f.host, f.port) for f in config.forwards
            ),
        )
    # A loopback name is bound as the literal it means, never looked up: the guard
    # below lets it through as loopback, so nothing may turn it into another address.
    config = dataclasses.replace(
        config, forwards=merge_forwards(literal_forward(f) for f in config.forwards)
    )
    if not config.forwards and not config.reverse_forwards:
        raise ConfigError(
            "nothing to forward",
            hint="give -D [bind_address:]port, such as -D 1080 (or -R for the server's "
            "side), or a DynamicForward line for this host in ssh_config",
        )
    guard_open_proxy(config)
    return config


def guard_open_proxy(config: Config) -> None:
    """Refuse to become an open proxy into the SSH server's network by accident."""
    exposed = open_proxy_forwards(config)
    if exposed:
        where = ", ".join(exposed)
        places = [
            place
            for flag, place in (("-D", "this machine"), ("-R", "the server"))
            if any(item.startswith(flag) for item in exposed)
        ]
        raise ConfigError(
            f"{where} would let anyone who can reach {' or '.join(places)} use the tunnel",
            hint="require a password with --proxy-auth USER, or pass --allow-open-proxy "
            "if that is really what you want",
        )


def guard_bound(config: Config, addresses: Sequence[tuple[str, int]]) -> None:
    """The guard once more, on what was actually bound (each socket's own address),
    before anything is served: whatever path a bind address took, a listener that is
    not loopback needs --proxy-auth or --allow-open-proxy."""
    if config.proxy_credentials is not None or config.allow_open_proxy:
        return
    exposed = [(host, port) for host, port in addresses if not is_loopback_address(host)]
    if exposed:
        where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in exposed)
        raise ConfigError(
            f"-D bound {where}, which is not loopback, and would let anyone who can "
            "reach this machine use the tunnel",
            hint="require a password with --proxy-auth USER, or pass --allow-open-proxy "
            "if that is really what you want",
        )


def command_environment(
    listeners: Sequence[events.Listener], credentials: tuple[bytes, bytes] | None = None
) -> dict[str, str]:
    """What a wrapped command needs to use the tunnel: the first loopback listener as
    ``ALL_PROXY`` in the form curl, git, pip and most libraries read. With only -R
    listeners (on the server) there is nothing here to point it at. With --proxy-auth
    the URLs carry the credentials, percent-encoded, so the command can use them; the
    password is in no other variable."""
    env = dict(os.environ)
    # Read once by the CLI; a child that wants the password has it in the URLs.
    env.pop("PYTUNNEL_PROXY_PASSWORD", None)
    local = [item for item in listeners if not item.remote]
    if not local:
        return env
    first = next((item for item in local if item.host in ("127.0.0.1", "::1")), local[0])
    userinfo = ""
    if credentials is not None:
        user, password = credentials
        userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    socks = first.url.replace("socks5h://", f"socks5h://{userinfo}", 1)
    env["ALL_PROXY"] = env["all_proxy"] = socks
    # The same port speaks HTTP too, for tools that only know http_proxy.
    http = socks.replace("socks5h://", "http://", 1)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = http
    # Loopback stays local (the command's own services), added to what the user had.
    mine = [item.strip() for item in (env.get("NO_PROXY") or env.get("no_proxy") or "").split(",")]
    merged = [item for item in mine if item] + [
        item for item in ("localhost", "127.0.0.1", "::1") if item not in mine
    ]
    env["NO_PROXY"] = env["no_proxy"] = ",".join(merged)
    env["PYTUNNEL_PORT"] = str(first.port)
    return env


def exit_status_of(returncode: int) -> int:
    """A child's status as a shell reports it: 128+N when it died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


def isolating(
    config: Config,
    emit: events.Sink,
    prompter: events.Prompter | None,
    default: Upstream,
) -> Isolated:
    """--isolate on the SSH destination of ``config``: each proxy user name gets its own
    Session, connected by the first request of that name and again after a loss, closed
    after ``isolate_idle`` seconds without a connection. Requests without a name go to
    ``default`` (the command line's session, which decides readiness)."""

    def make(key: str) -> tuple[Upstream, Closer]:
        label = printable(key)  # the name is the client's text

        def emit_as(event: events.Event) -> None:
            # Its session's facts as its own, so they never pass for the main session's.
            if isinstance(event, events.SessionConnecting):
                emit(events.IsolatedSession(label, event.server, "connecting"))
            elif isinstance(event, events.SessionUp):
                emit(events.IsolatedSession(label, event.server, "up", event.cipher))
            else:
                emit(event)

        session = Session(config, emit_as, prompter)
        watching: set[asyncio.Task[None]] = set()

        async def watch() -> None:
            error = await session.wait_lost()
            reason = error.reason if isinstance(error, SessionClosed) else error.message
            emit(events.IsolatedSession(label, session.server, "lost", reason))

        async def connect() -> None:
            try:
                await session.connect()
            except SessionError as exc:
                emit(events.IsolatedSession(label, session.server, "failed", exc.message))
                raise ChannelOpenFailed(
                    ReplyReason.GENERAL_FAILURE,
                    f"the SSH session for user {label} failed: {exc.message}",
                ) from exc
            task = asyncio.get_running_loop().create_task(watch())
            watching.add(task)
            task.add_done_callback(watching.discard)

        upstream = OnDemand(SshUpstream(session), connect, lambda: session.is_up)

        async def close(reason: str) -> None:
            await upstream.close()
            for task in list(watching):
                task.cancel()
            await asyncio.gather(*watching, return_exceptions=True)
            await session.close()
            emit(events.IsolatedSession(label, session.server, "closed", reason))

        return upstream, close

    return Isolated(make, default, idle=config.isolate_idle)


async def _first(*aws: asyncio.Future[Any]) -> None:
    await asyncio.wait(aws, return_when=asyncio.FIRST_COMPLETED)


async def serve(
    config: Config,
    emit: events.Sink,
    command: Sequence[str] = (),
    prompter: events.Prompter | None = None,
    on_force_exit: Callable[[], None] | None = None,
) -> int:
    """Run the tunnel until a signal, a fatal error, or the command's end.
    ``on_force_exit`` is called on a second Ctrl-C (the CLI exits the process there);
    without one, a second Ctrl-C cancels serve, skipping the drain."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def cancel_serve() -> None:
        if main is not None:
            main.cancel()

    stop = _Stop(on_force_exit or cancel_serve)
    # Counted for SIGUSR1's status line.
    stats = Stats()
    started = loop.time()
    emit = _counting(emit, stats, loop.time)
    undo_signals = on_signals(loop, (signal.SIGINT, signal.SIGTERM), stop.request)
    try:
        async with contextlib.AsyncExitStack() as stack:
            # What no route matches goes to the command line's destination: its label
            # is that destination as written (an ssh_config alias, say).
            label = "demo" if config.demo else str(config.destination)
            given = config
            if config.demo:
                from .demo import demo_server

                demo = await stack.enter_async_context(demo_server())
                config = dataclasses.replace(
                    config,
                    destination=Destination(demo.host, demo.user, demo.port),
                    identities=(demo.identity,),
                    ssh_config=(),
                    known_hosts=(demo.known_hosts,),
                    global_known_hosts=(),
                    host_key_policy=HostKeyPolicy.YES,
                )
            else:
                config = apply_ssh_config(config)
            config = listeners_to_open(config)
            master = await _master(config, emit)
            if master is not None:
                stack.callback(master.close)
            session = Session(config, emit, prompter)
            opener: Session | SessionPool = session
            if config.ssh_connections > 1 and master is None:
                opener = pool = SessionPool(session, config.ssh_connections)
                stack.push_async_callback(pool.close)
            supervisor = Supervisor(session, config, emit)
            # Every kind of request (CONNECT, HTTP, BIND, the UDP helper) goes through
            # the upstream, which tells the supervisor a client is waiting.
            ssh = SshUpstream(opener, supervisor.demand)
            ssh.name = label
            upstream: Upstream = master or ssh
            if config.isolate:
                upstream = isolated = isolating(config, emit, prompter, upstream)
                stack.push_async_callback(isolated.close)
            owner = Owner()
            direct = Direct(config.open_timeout)
            routes, ways = build_routes(given, direct, emit, prompter, owner)
            for way in ways:
                stack.push_async_callback(way.close)
            # Cancelled and awaited before the ways close (the stack unwinds in reverse).
            stack.push_async_callback(owner.close)
            # Through a master: no BIND or UDP ASSOCIATE (0x07, see the README).
            udp = None
            if master is None:
                udp = UdpSettings(
                    upstream=ssh,
                    runner=ssh,
                    # UDP goes through the command line's destination only: what a route
                    # sends elsewhere is refused there.
                    rules=RoutedRules(config.rules.rules, tuple(way.route for way in routes)),
                    emit=emit,
                    dns_server=config.dns_server,
                    helper=config.udp_helper,
                )
            proxy = ProxyServer(
                upstream,
                emit,
                handshake_timeout=config.handshake_timeout,
                max_clients=config.max_connections,
                rules=config.rules,
                credentials=config.proxy_credentials,
                binder=ssh if master is None else None,
                udp=udp,
                routes=routes,
                reconnect_wait=config.reconnect_wait,
                isolate=config.isolate,
            )
            stack.push_async_callback(session.close)
            stack.push_async_callback(proxy.close)
            reverse: ReverseForwards | None = None
            if config.reverse_forwards:
                # -R: the server's side connects through us to this machine's network,
                # with the same limits, rules and password as -D.
                reverse_proxy = ProxyServer(
                    Direct(config.open_timeout),
                    emit,
                    handshake_timeout=config.handshake_timeout,
                    max_clients=config.max_connections,
                    rules=config.rules,
                    credentials=config.proxy_credentials,
                    ids=proxy.ids,
                    reverse=True,
                )
                stack.push_async_callback(reverse_proxy.close)
                reverse = ReverseForwards(session, reverse_proxy, config.reverse_forwards, emit)
                stack.callback(reverse.close)
            # Bound now, so a port in use fails before any prompt; listening only once
            # the session is up, so until then a client is refused by the kernel and a
            # start-up that fails never accepted anyone (``ssh -f -D`` scripts poll).
            proxy.bind(
                ((f.host, f.port) for f in config.forwards),
                check=lambda bound: guard_bound(config, bound),
            )
            keeper: Supervisor | MasterUpstream = master or supervisor
            stack.callback(
                _on_request_signals(
                    loop,
                    keeper,
                    stats,
                    started,
                    lambda: [way.supervisor for way in ways if way.in_use()],
                )
            )

            # serve's own tasks: cancelled and awaited on the way out, before anything
            # they use is closed (the stack unwinds in reverse).
            tasks = Owner()
            stack.push_async_callback(tasks.close)
            starting = tasks.spawn(keeper.start(), report=False)
            stopping = tasks.spawn(stop.event.wait(), report=False)
            await _first(starting, stopping)
            if not starting.done():
                await cancel_and_wait(starting)
                emit(events.Stopping("signal before the session was up"))
                return stop.status
            starting.result()  # raises the SessionError of a failed start
            # -R first: refused there is fatal (ListenError), and must not come after
            # the local port took its first client.
            remote = await reverse.open() if reverse is not None else []
            listeners = proxy.start_accepting() + remote
            if master is None:
                emit(events.Ready(tuple(listeners), session.server, label))
            else:
                # The live view shows ``server``: say there which master, and its PID.
                server = f"{master.server} (pid {master.pid})"
                emit(
                    events.Ready(
                        tuple(listeners),
                        server,
                        upstream=label,
                        transport=master.name,
                        master_pid=master.pid,
                    )
                )
            if config.demo and not command:
                from .demo import DEMO_HOST

                emit(events.Notice(f"try: curl -x {listeners[0].url} http://{DEMO_HOST}/"))

            child: asyncio.subprocess.Process | None = None
            if command:
                child = await _spawn(
                    command, command_environment(listeners, config.proxy_credentials)
                )
            keeping = tasks.spawn(keeper.keep_up(), report=False)
            # Sleep and network changes: probe each session at once (the command line's
            # unless a master carries it, a route destination's once it is in use), and
            # reconnect the ones that are silent.
            wakes = [
                Wake(way.session, way.supervisor, way.emit, way.name, active=way.in_use)
                for way in ways
            ]
            if master is None:
                wakes.append(Wake(session, supervisor, emit, session.server))
            tasks.spawn(watch(*wakes))
            if reverse is not None:
                tasks.spawn(reverse.keep())
            waiting: list[asyncio.Future[Any]] = [keeping, stopping]
            if child is not None:
                waiting.append(tasks.spawn(child.wait(), report=False))
            try:
                await _first(*waiting)
            finally:
                # The session is not kept up through the drain, as before: what is
                # open finishes on it, or ends with it.
                await cancel_and_wait(keeping)
            if child is not None and child.returncode is None:
                # The tunnel failed or we got a signal: pass it on and wait for the child.
                await _stop_child(child, stop)
            if not keeping.cancelled() and keeping.done():
                keeping.result()  # raises the fatal SessionError
            if child is not None and child.returncode is not None:
                emit(events.Stopping("command finished"))
                return exit_status_of(child.returncode)
            emit(events.Stopping("interrupted" if stop.signal == signal.SIGINT else "terminated"))
            await proxy.drain(config.drain)
            return stop.status
    finally:
        undo_signals()


def _counting(emit: events.Sink, stats: Stats, clock: Callable[[], float]) -> events.Sink:
    def counted(event: events.Event) -> None:
        stats.apply(event, clock())
        emit(event)

    return counted


# SIGHUP: how long the old session may carry its open channels when --drain is 0.
_SIGHUP_KEEP_OPEN = 600.0


def _on_request_signals(
    loop: asyncio.AbstractEventLoop,
    supervisor: Supervisor | MasterUpstream,
    stats: Stats,
    started: float,
    routed: Callable[[], Sequence[Supervisor]] = list,
) -> Callable[[], None]:
    """SIGHUP reconnects now (channels open on the old session finish on it, for up to
    --drain seconds, or 10 minutes), and so does every route destination already in use
    (``routed``); through an OpenSSH master there is no session of ours to remake (see
    MasterUpstream.reconnect_now). SIGUSR1 emits a status line. Windows has neither."""
    hup, usr1 = getattr(signal, "SIGHUP", None), getattr(signal, "SIGUSR1", None)
    if hup is None or usr1 is None:
        return lambda: None
    keep_open = supervisor.config.drain or _SIGHUP_KEEP_OPEN

    def handle(signum: int) -> None:
        if signum == hup:
            for each in (supervisor, *routed()):
                each.reconnect_now(events.CAUSE_SIGHUP, keep_open=keep_open)
            return
        now = loop.time()
        since = stats.session_since
        supervisor.emit(
            events.Status(
                server=supervisor.server,
                state=stats.session_state,
                state_seconds=0.0 if since is None else now - since,
                uptime=now - started,
                reconnects=supervisor.reconnects,
                open=len(stats.open),
                served=stats.served,
                failed=stats.failed,
                rejected=stats.rejected,
                bytes_up=stats.bytes_up,
                bytes_down=stats.bytes_down,
            )
        )

    return on_signals(loop, (hup, usr1), handle)


async def _master(config: Config, emit: events.Sink) -> MasterUpstream | None:
    """The OpenSSH master to ride for the destination (-S / ControlPath), or None to log
    in ourselves."""
    path = resolve_control_path(config)
    if path is None:
        return None
    if config.isolate:
        raise ConfigError(
            "--isolate is not available through an OpenSSH master: each user name needs "
            "a session of pytunnel's own",
            hint="drop -S/ControlPath to log in yourself, or drop --isolate",
        )
    if config.reverse_forwards:
        raise ConfigError(
            "-R is not available through an OpenSSH master",
            hint="drop -S/ControlPath to log in yourself, or add the forward to the master",
        )
    return await master_upstream(path, config, emit)


async def _spawn(command: Sequence[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start ``-- COMMAND``; a command that cannot start is 127 or 126, as in a shell."""
    try:
        return await asyncio.create_subprocess_exec(*command, env=env)
    except FileNotFoundError as exc:
        raise CommandFailed(f"cannot run {command[0]}: command not found", 127) from exc
    except OSError as exc:
        raise CommandFailed(f"cannot run {command[0]}: {exc.strerror or exc}", 126) from exc


async def _stop_child(child: asyncio.subprocess.Process, stop: _Stop) -> None:
    """Pass the signal we got on to the command (SIGTERM if the tunnel failed), give it a
    grace period, then kill it."""
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(stop.signal or signal.SIGTERM)
    try:
        await asyncio.wait_for(child.wait(), _COMMAND_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()


def run(
    config: Config,
    emit: events.Sink,
    command: Sequence[str] = (),
    prompter: events.Prompter | None = None,
    on_force_exit: Callable[[], None] | None = None,
) -> int:
    """Run :func:`serve` on the fastest event loop available."""
    main = serve(config, emit, command, prompter, on_force_exit)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return int(uvloop.run(main))
