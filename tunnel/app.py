"""Composition root: builds the session and the proxy, runs them, owns signals and the
shutdown order (stop accepting, close clients, close the SSH session)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Sequence
from typing import Any

from . import events
from .config import Config, Destination, HostKeyPolicy
from .errors import ExitStatus
from .proxy import ProxyServer
from .session import Session

log = logging.getLogger(__name__)

# How long a command gets to exit after SIGTERM before it is killed.
_COMMAND_GRACE = 5.0


class _Stop:
    """Why the tunnel is stopping: the first signal wins, a second Ctrl-C exits at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.status = ExitStatus.OK
        self.signal: int | None = None

    def request(self, signum: int) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            os._exit(ExitStatus.INTERRUPTED)
        self.signal = signum
        self.status = ExitStatus.INTERRUPTED if signum == signal.SIGINT else ExitStatus.OK
        self.event.set()


def command_environment(listeners: Sequence[events.Listener]) -> dict[str, str]:
    """What a wrapped command needs to use the tunnel: the first loopback listener as
    ``ALL_PROXY`` in the form curl, git, pip and most libraries read."""
    first = next((item for item in listeners if item.host in ("127.0.0.1", "::1")), listeners[0])
    env = dict(os.environ)
    env["ALL_PROXY"] = env["all_proxy"] = first.url
    env["PYTUNNEL_PORT"] = str(first.port)
    return env


def exit_status_of(returncode: int) -> int:
    """A child's status as a shell reports it: 128+N when it died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


async def _first(*aws: asyncio.Future[Any]) -> None:
    await asyncio.wait(aws, return_when=asyncio.FIRST_COMPLETED)


async def serve(config: Config, emit: events.Sink, command: Sequence[str] = ()) -> int:
    """Run the tunnel until a signal, a fatal error, or the command's end."""
    loop = asyncio.get_running_loop()
    stop = _Stop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.request, signum)
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
            session = Session(config, emit)
            proxy = ProxyServer(session, emit, handshake_timeout=config.handshake_timeout)
            stack.push_async_callback(session.close)
            stack.push_async_callback(proxy.close)
            listeners = await proxy.listen((f.host, f.port) for f in config.forwards)

            connecting = loop.create_task(session.connect())
            stopping = loop.create_task(stop.event.wait())
            try:
                await _first(connecting, stopping)
            finally:
                if not connecting.done():
                    connecting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await connecting
            if not connecting.done() or connecting.cancelled():
                emit(events.Stopping("signal before the session was up"))
                return stop.status
            connecting.result()  # raises the SessionError of a failed connect
            emit(events.Ready(tuple(listeners), session.server))

            lost = loop.create_task(session.wait_lost())
            child: asyncio.subprocess.Process | None = None
            waiting: list[asyncio.Future[Any]] = [lost, stopping]
            if command:
                child = await asyncio.create_subprocess_exec(
                    *command, env=command_environment(listeners)
                )
                waiting.append(loop.create_task(child.wait()))
            await _first(*waiting)

            if child is not None and child.returncode is None:
                await _stop_child(child, stop)
            if child is not None and (child.returncode is not None) and not lost.done():
                emit(events.Stopping("command finished"))
                return exit_status_of(child.returncode)
            if lost.done():
                raise lost.result()
            emit(events.Stopping("interrupted" if stop.signal == signal.SIGINT else "terminated"))
            if child is not None and child.returncode is not None:
                return exit_status_of(child.returncode)
            return stop.status
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


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


def run(config: Config, emit: events.Sink, command: Sequence[str] = ()) -> int:
    """Run :func:`serve` on the fastest event loop available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, emit, command))
    return int(uvloop.run(serve(config, emit, command)))
