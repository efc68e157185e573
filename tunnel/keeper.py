"""One way out over SSH kept up: the session (or pool) as the proxy's upstream, and the
supervisor that reconnects it with backoff after a loss."""

from __future__ import annotations

import asyncio
import random as _random
from collections.abc import Callable
from typing import NoReturn

from . import events
from .channels import Channel, ChannelSink
from .config import Config
from .errors import SessionClosed, SessionError
from .pool import SessionPool
from .retry import backoff, is_retryable
from .session import Session
from .upstreams import Request


class SshUpstream:
    """The SSH session (or pool) as the proxy's upstream: a request becomes a
    ``direct-tcpip`` channel to its destination."""

    name = "ssh"

    def __init__(self, session: Session | SessionPool) -> None:
        self.session = session

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        return await self.session.open_tcp(request.host, request.port, request.origin, sink)


class Supervisor:
    """Keeps the SSH session up under listeners that never close: reconnects with
    backoff after a loss, and gives up only on errors that retrying cannot fix."""

    def __init__(
        self,
        session: Session,
        config: Config,
        emit: events.Sink,
        *,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.session = session
        self.config = config
        self.emit = emit
        self.random = random

    async def start(self) -> None:
        """The first connection. By default a failure is final (scripts want to know);
        with ``retry_start`` it is retried like a lost session."""
        try:
            await self.session.connect()
        except SessionError as exc:
            if not (self.config.retry_start and is_retryable(exc)):
                raise
            await self._reconnect(str(exc))

    async def keep_up(self) -> NoReturn:
        """Run until a fatal error, which it raises."""
        while True:
            error = await self.session.wait_lost()
            reason = error.reason if isinstance(error, SessionClosed) else error.message
            self.emit(events.SessionLost(self.session.server, reason))
            # What was open went through the dead connection; asyncssh closes those
            # channels, and the proxy closes their clients with the byte counts.
            if not self.config.reconnect:
                raise error
            await self._reconnect(reason)

    def reconnect_now(self, cause: str) -> None:
        """The session stopped answering after ``cause`` (a sleep, a network change):
        drop it, so that keep_up reconnects at once (its first attempt has no delay)."""
        what = "resume from sleep" if cause == "sleep" else cause.replace("-", " ")
        self.session.drop(f"no answer to a probe after a {what}")

    async def _reconnect(self, reason: str) -> None:
        schedule = backoff(cap=self.config.reconnect_cap, random=self.random)
        for delay in schedule:
            if delay > 0:
                # The number the next "connecting" line will carry.
                attempt = self.session.attempts + 1
                self.emit(events.ReconnectScheduled(self.session.server, delay, attempt, reason))
                await asyncio.sleep(delay)
            try:
                await self.session.connect()
            except SessionError as exc:
                if not is_retryable(exc):
                    raise
                reason = exc.message
            else:
                return
