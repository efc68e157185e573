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
from .config import (
    Config,
    Destination,
    Forward,
    HostKeyPolicy,
    is_loopback_address,
    literal_forward,
    merge_forwards,
    open_proxy_forwards,
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
from .names import printable
from .platform import on_signals
from .pool import SessionPool
from .proxy import ProxyServer
from .reverse import ReverseForwards
from .session import Session
from .sshconfig import apply_ssh_config
from .udp import UdpSettings
from .upstreams import Direct, Upstream

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
    undo_signals = on_signals(loop, (signal.SIGINT, signal.SIGTERM), stop.request)
    try:
        async with contextlib.AsyncExitStack() as stack:
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
            session = Session(config, emit, prompter)
            opener: Session | SessionPool = session
            if config.ssh_connections > 1:
                opener = pool = SessionPool(session, config.ssh_connections)
                stack.push_async_callback(pool.close)
            upstream: Upstream = SshUpstream(opener)
            if config.isolate:
                upstream = isolated = isolating(config, emit, prompter, upstream)
                stack.push_async_callback(isolated.close)
            udp = UdpSettings(
                upstream=upstream,
                runner=session,
                rules=config.rules,
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
                binder=session,
                udp=udp,
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
            supervisor = Supervisor(session, config, emit)

            starting = loop.create_task(supervisor.start())
            stopping = loop.create_task(stop.event.wait())
            await _first(starting, stopping)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                emit(events.Stopping("signal before the session was up"))
                return stop.status
            starting.result()  # raises the SessionError of a failed start
            # -R first: refused there is fatal (ListenError), and must not come after
            # the local port took its first client.
            remote = await reverse.open() if reverse is not None else []
            listeners = proxy.start_accepting() + remote
            emit(events.Ready(tuple(listeners), session.server))
            if config.demo and not command:
                from .demo import DEMO_HOST

                emit(events.Notice(f"try: curl -x {listeners[0].url} http://{DEMO_HOST}/"))

            child: asyncio.subprocess.Process | None = None
            if command:
                child = await _spawn(
                    command, command_environment(listeners, config.proxy_credentials)
                )
            keeping = loop.create_task(supervisor.keep_up())
            if reverse is not None:
                relisten = loop.create_task(reverse.keep())
                stack.callback(relisten.cancel)
            waiting: list[asyncio.Future[Any]] = [keeping, stopping]
            if child is not None:
                waiting.append(loop.create_task(child.wait()))
            try:
                await _first(*waiting)
            finally:
                if not keeping.done():
                    keeping.cancel()
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
