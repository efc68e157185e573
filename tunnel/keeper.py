"""One way out over SSH kept up: the session (or pool) as the proxy's upstream, and the
supervisor that reconnects it with backoff after a loss, at once when a client waits,
and on request (SIGHUP, a wake-up)."""

from __future__ import annotations

import asyncio
import contextlib
import random as _random
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

from . import events
from .channels import Channel, ChannelSink, IncomingHandler, RemoteListener
from .config import Config
from .errors import OutageTooLong, SessionClosed, SessionError
from .pool import SessionPool
from .retry import backoff, is_retryable
from .session import Session
from .tasks import raise_if_cancelling
from .upstreams import Request

# A demand starts an attempt no sooner than this after the last one started: a crowd of
# clients against a server that is still away costs one attempt a second, not one each.
DEMAND_GAP = 1.0

# The reason a replaced session's loss gives, by cause: a probe found it dead, or asked.
_ASKED_REASONS = {
    events.CAUSE_SLEEP: "no answer to a probe after resume from sleep",
    events.CAUSE_NETWORK: "no answer to a probe after a network change",
}

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def _nobody() -> None:
    """The demand hook of an upstream no supervisor watches."""


class SshUpstream:
    """The SSH session (or pool) as the proxy's upstream: a request becomes a
    ``direct-tcpip`` channel to its destination. It is also the proxy's Binder (SOCKS
    BIND) and Runner (the UDP helper), so that every kind of request tells the
    supervisor it is waiting (``on_demand``) before it waits for the session."""

    name = "ssh"

    def __init__(
        self, session: Session | SessionPool, on_demand: Callable[[], None] = _nobody
    ) -> None:
        self.session = session
        self.on_demand = on_demand
        self._primary = session.primary if isinstance(session, SessionPool) else session

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        self.on_demand()
        return await self.session.open_tcp(request.host, request.port, request.origin, sink)

    async def listen_tcp(self, host: str, port: int, handler: IncomingHandler) -> RemoteListener:
        self.on_demand()
        return await self._primary.listen_tcp(host, port, handler)

    async def run_process(self, command: str, sink: ChannelSink) -> Channel:
        self.on_demand()
        return await self._primary.run_process(command, sink)


class Supervisor:
    """Keeps the SSH session up under listeners that never close: reconnects with
    backoff after a loss, and gives up only on errors that retrying cannot fix, or
    (``give_up_after``) when the outage has lasted too long.

    Backoff paces only the attempts nobody waits for: :meth:`demand` (a client's
    request while the session is down) starts one at once, if none is running and the
    last began :data:`DEMAND_GAP` ago. :meth:`reconnect_now` replaces the session
    whether it is up or not. ``clock`` (monotonic seconds) and ``sleep`` are injectable,
    so the interplay can be tested without waiting."""

    def __init__(
        self,
        session: Session,
        config: Config,
        emit: events.Sink,
        *,
        random: Callable[[], float] = _random.random,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.session = session
        self.config = config
        self.emit = emit
        self.random = random
        self.clock = clock
        self.sleep = sleep
        # Set by a waiting client; cleared as an attempt starts (that attempt serves it).
        self._demanded = asyncio.Event()
        # Set by reconnect_now; the cause and how long the old session may keep its
        # open channels go with it.
        self._asked = asyncio.Event()
        self._asked_cause = events.CAUSE_SIGHUP
        self._asked_keep_open = 0.0
        self._last_attempt: float | None = None
        # When service went out (the loss, or the request to reconnect), None while up.
        self._down_since: float | None = None
        self.reconnects = 0

    # -- requests from outside ------------------------------------------------------

    def demand(self) -> None:
        """A client waits for the session: if it is down, cut the backoff short."""
        if not self.session.is_up:
            self._demanded.set()

    def reconnect_now(self, cause: str, *, keep_open: float = 0.0) -> None:
        """Replace the session now, ``cause`` saying why (``events.CAUSE_*``). If it is
        up it is taken out of service at once: new requests wait for the new one, while
        channels already open on it may run on for up to ``keep_open`` seconds (0: it
        is dropped, for a session found dead). If it is down, the next attempt starts
        now instead of after the backoff."""
        self._asked_cause = cause
        self._asked_keep_open = keep_open
        self._asked.set()

    @property
    def server(self) -> str:
        return self.session.server

    @property
    def down_for(self) -> float | None:
        """Seconds the service has been out, None while the session is up."""
        return None if self._down_since is None else self.clock() - self._down_since

    # -- the loop -------------------------------------------------------------------

    async def start(self) -> None:
        """The first connection. By default a failure is final (scripts want to know);
        with ``retry_start`` it is retried like a lost session."""
        try:
            await self._attempt(demand=False)
        except SessionError as exc:
            raise_if_cancelling()
            if not (self.config.retry_start and is_retryable(exc)):
                raise
            self._down_since = self.clock()
            await self._reconnect(str(exc), events.CAUSE_LOST)

    async def keep_up(self) -> NoReturn:
        """Run until a fatal error, which it raises."""
        while True:
            lost = asyncio.ensure_future(self.session.wait_lost())
            asked = asyncio.ensure_future(self._asked.wait())
            try:
                await asyncio.wait({lost, asked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (lost, asked):
                    task.cancel()
                await asyncio.gather(lost, asked, return_exceptions=True)
            if lost.cancelled() or not lost.done():
                # Asked: the session may be fine; it is replaced all the same.
                self._asked.clear()
                cause = self._asked_cause
                reason = _ASKED_REASONS.get(cause, f"reconnecting now ({cause})")
                self._down_since = self.clock()
                self.emit(events.SessionLost(self.session.server, reason, cause))
                self.session.retire(self._asked_keep_open)
            else:
                error = lost.result()
                reason = error.reason if isinstance(error, SessionClosed) else error.message
                cause = events.CAUSE_LOST
                self._down_since = self.clock()
                self.emit(events.SessionLost(self.session.server, reason, cause))
                # What was open went through the dead connection; asyncssh closes those
                # channels, and the proxy closes their clients with the byte counts.
                if not self.config.reconnect:
                    raise error
            await self._reconnect(reason, cause)

    async def _reconnect(self, reason: str, cause: str) -> None:
        schedule = backoff(cap=self.config.reconnect_cap, random=self.random)
        for delay in schedule:
            demand = False
            if delay > 0:
                # The number the next "connecting" line will carry.
                attempt = self.session.attempts + 1
                self.emit(
                    events.ReconnectScheduled(self.session.server, delay, attempt, reason, cause)
                )
                demand = await self._pause(delay)
            self._check_outage(reason)
            try:
                await self._bounded(self._attempt(demand=demand, cause=cause), reason)
            except SessionError as exc:
                raise_if_cancelling()
                if isinstance(exc, OutageTooLong) or not is_retryable(exc):
                    raise
                reason = exc.message
            else:
                raise_if_cancelling()
                self.reconnects += 1
                return

    async def _attempt(self, *, demand: bool, cause: str | None = None) -> None:
        self._demanded.clear()
        self._asked.clear()
        self._last_attempt = self.clock()
        down_since = self._down_since

        def outage() -> float | None:
            return None if down_since is None else self.clock() - down_since

        await self.session.connect(demand=demand, cause=cause, outage=outage)
        self._down_since = None
        # A request to reconnect made while this attempt ran is served by it.
        self._asked.clear()

    async def _pause(self, delay: float) -> bool:
        """Wait ``delay`` seconds, or less: True if a demand ended it. A request to
        reconnect now ends it at once; a demand once :data:`DEMAND_GAP` has passed since
        the last attempt began; the outage limit when it is reached."""
        due = self.clock() + delay
        while True:
            now = self.clock()
            if self._asked.is_set():
                return False
            wake = due
            if self._demanded.is_set():
                earliest = (self._last_attempt or now) + DEMAND_GAP
                if now >= earliest:
                    return True
                wake = min(due, earliest)
            limit = self._limit_at()
            if limit is not None:
                wake = min(wake, limit)
            if now >= wake:
                return False
            await self._sleep_or_request(wake - now)

    async def _sleep_or_request(self, seconds: float) -> None:
        """``sleep(seconds)``, cut short by a demand (unless one is already pending,
        which only the time can serve now) or a request to reconnect."""
        waiters = [
            asyncio.ensure_future(self.sleep(seconds)),
            asyncio.ensure_future(self._asked.wait()),
        ]
        if not self._demanded.is_set():
            waiters.append(asyncio.ensure_future(self._demanded.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    # -- the outage limit -----------------------------------------------------------

    def _limit_at(self) -> float | None:
        limit = self.config.give_up_after
        if limit is None or self._down_since is None:
            return None
        return self._down_since + limit

    def _check_outage(self, reason: str) -> None:
        limit_at = self._limit_at()
        if limit_at is not None and self.clock() >= limit_at:
            raise OutageTooLong(self.session.server, self.config.give_up_after or 0.0, reason)

    async def _bounded(self, attempt: Awaitable[None], reason: str) -> None:
        """An attempt, stopped when the outage limit comes first."""
        limit_at = self._limit_at()
        task = asyncio.ensure_future(attempt)
        if limit_at is None:
            await task
            return
        timer = asyncio.ensure_future(self.sleep(max(0.0, limit_at - self.clock())))
        try:
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
            await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise OutageTooLong(self.session.server, self.config.give_up_after or 0.0, reason)
        task.result()
