"""The supervisor's timing (``tunnel.keeper``): backoff, demand, reconnect-now and the
outage limit, on a fake session with an injected clock and sleep. Nothing here waits for
real time: the test moves the clock, and the supervisor's sleeps end when it passes them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tunnel import events
from tunnel.config import Config, Destination
from tunnel.errors import ConnectFailed, OutageTooLong, SessionClosed, SessionError
from tunnel.keeper import DEMAND_GAP, SshUpstream, Supervisor
from tunnel.upstreams import Request

SERVER = "user@host:22"


class FakeTime:
    """A monotonic clock the test moves, and a sleep that ends when it has moved far
    enough."""

    def __init__(self) -> None:
        self.now = 100.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for due, future in list(self._sleepers):
            if due <= self.now and not future.done():
                future.set_result(None)
        await settle()


async def settle() -> None:
    """Let every task run until it waits on something the test controls (the fake clock,
    the fake session): a bounded number of loop turns, no wall-clock time."""
    for _ in range(50):
        await asyncio.sleep(0)


@dataclass
class Attempt:
    at: float
    demand: bool
    cause: str | None
    outage: float | None = None
    result: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class FakeSession:
    """What the supervisor uses of a Session. Each connect is an :class:`Attempt` the
    test ends with ``succeed`` or ``fail``."""

    def __init__(self, time: FakeTime, emit: events.Sink) -> None:
        self.server = SERVER
        self.time = time
        self.emit = emit
        self.attempts_made: list[Attempt] = []
        self.retired: list[float] = []
        self.is_up = False
        self._lost: asyncio.Future[SessionError] | None = None

    @property
    def attempts(self) -> int:
        return len(self.attempts_made)

    async def connect(
        self,
        *,
        demand: bool = False,
        cause: str | None = None,
        outage: Callable[[], float | None] | None = None,
    ) -> None:
        attempt = Attempt(self.time.now, demand, cause)
        self.attempts_made.append(attempt)
        self.emit(events.SessionConnecting(self.server, self.attempts, demand))
        await attempt.result
        attempt.outage = None if outage is None else outage()
        self.is_up = True
        self._lost = asyncio.get_running_loop().create_future()
        self.emit(events.SessionUp(self.server, "v", "c", "k", "m", "none", cause, attempt.outage))

    async def wait_lost(self) -> SessionError:
        assert self._lost is not None
        return await asyncio.shield(self._lost)

    def retire(self, keep_open: float) -> None:
        self.retired.append(keep_open)
        self.is_up = False

    # -- driven by the test --

    @property
    def last(self) -> Attempt:
        return self.attempts_made[-1]

    async def succeed(self) -> None:
        self.last.result.set_result(None)
        await settle()

    async def fail(self, message: str = "Connection refused") -> None:
        self.last.result.set_exception(ConnectFailed(message))
        await settle()

    async def lose(self) -> None:
        assert self._lost is not None
        self.is_up = False
        self._lost.set_result(SessionClosed(self.server, "EOF"))
        await settle()


@dataclass
class Rig:
    time: FakeTime
    session: FakeSession
    supervisor: Supervisor
    seen: list[events.Event]

    def of(self, kind: type) -> list[events.Event]:
        return [event for event in self.seen if isinstance(event, kind)]


def make_rig(session_type: type[FakeSession] = FakeSession, **config: object) -> Iterator[Rig]:
    time = FakeTime()
    seen: list[events.Event] = []
    session = session_type(time, seen.append)
    supervisor = Supervisor(
        session,  # type: ignore[arg-type]
        Config(Destination("host", "user", 22), **config),  # type: ignore[arg-type]
        seen.append,
        # No jitter: delays 1, 2, 4, 8... exactly.
        random=lambda: 0.0,
        clock=time.clock,
        sleep=time.sleep,
    )
    yield Rig(time, session, supervisor, seen)


@contextlib.asynccontextmanager
async def kept_up(rig: Rig) -> AsyncIterator[asyncio.Task[None]]:
    """The supervisor started (first connect succeeded) and keeping the session up."""
    starting = asyncio.ensure_future(rig.supervisor.start())
    await settle()
    await rig.session.succeed()
    await starting
    task: asyncio.Task[None] = asyncio.ensure_future(rig.supervisor.keep_up())
    await settle()
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def rig() -> Iterator[Rig]:
    yield from make_rig()


async def lose_and_fail_until_a_long_wait(rig: Rig) -> None:
    """Lost; the immediate retry and the ones after 1 and 2 s fail: the next wait is 4 s."""
    await rig.session.lose()
    assert rig.session.attempts == 2  # the start, then the immediate retry
    await rig.session.fail()
    await rig.time.advance(1.0)
    await rig.session.fail()
    await rig.time.advance(2.0)
    await rig.session.fail()
    assert rig.session.attempts == 4
    delays = [event.delay for event in rig.of(events.ReconnectScheduled)]
    assert delays == [1.0, 2.0, 4.0]


async def test_without_demand_backoff_paces_the_attempts(rig: Rig) -> None:
    async with kept_up(rig):
        await lose_and_fail_until_a_long_wait(rig)
        await rig.time.advance(3.9)
        assert rig.session.attempts == 4
        await rig.time.advance(0.1)
        assert rig.session.attempts == 5
        assert not rig.session.last.demand


async def test_a_demand_starts_an_attempt_at_once(rig: Rig) -> None:
    async with kept_up(rig):
        await lose_and_fail_until_a_long_wait(rig)
        await rig.time.advance(1.5)  # well past the gap, well before the 4 s are up
        rig.supervisor.demand()
        await settle()
        assert rig.session.attempts == 5
        assert rig.session.last.demand
        assert rig.session.last.at == rig.time.now  # not a moment of (fake) time later
        await rig.session.succeed()
        [*_, connecting] = rig.of(events.SessionConnecting)
        assert connecting == events.SessionConnecting(SERVER, 5, True)


async def test_a_demand_right_after_an_attempt_waits_for_the_gap(rig: Rig) -> None:
    async with kept_up(rig):
        await lose_and_fail_until_a_long_wait(rig)
        started = rig.session.last.at
        await rig.time.advance(0.25)
        rig.supervisor.demand()
        await settle()
        assert rig.session.attempts == 4
        await rig.time.advance(DEMAND_GAP - 0.25 - 0.01)
        assert rig.session.attempts == 4
        await rig.time.advance(0.01)
        assert rig.session.attempts == 5
        assert rig.session.last.demand
        assert rig.session.last.at == started + DEMAND_GAP


async def test_many_demands_make_one_attempt(rig: Rig) -> None:
    async with kept_up(rig):
        await lose_and_fail_until_a_long_wait(rig)
        await rig.time.advance(2.0)
        for _ in range(20):
            rig.supervisor.demand()
        await settle()
        assert rig.session.attempts == 5
        # It fails: the demands were for that attempt; the next waits its backoff (8 s)
        # unless someone asks again.
        await rig.session.fail()
        await rig.time.advance(7.9)
        assert rig.session.attempts == 5
        await rig.time.advance(0.1)
        assert rig.session.attempts == 6
        assert not rig.session.last.demand


async def test_a_demand_while_up_changes_nothing_later(rig: Rig) -> None:
    async with kept_up(rig):
        rig.supervisor.demand()  # up: nothing to hurry
        await lose_and_fail_until_a_long_wait(rig)
        await rig.time.advance(3.9)
        assert rig.session.attempts == 4


async def test_session_up_after_a_loss_says_how_long_service_was_out(rig: Rig) -> None:
    async with kept_up(rig):
        lost_at = rig.time.now
        await lose_and_fail_until_a_long_wait(rig)
        await rig.time.advance(4.0)
        await rig.session.succeed()
        up = rig.of(events.SessionUp)
        # The start ended no outage.
        assert up[0].outage is None
        assert up[0].cause is None
        assert up[-1].outage == rig.time.now - lost_at == 7.0
        assert up[-1].cause == events.CAUSE_LOST
        [lost] = rig.of(events.SessionLost)
        assert lost.cause == events.CAUSE_LOST
        assert all(e.cause == events.CAUSE_LOST for e in rig.of(events.ReconnectScheduled))
        assert rig.supervisor.reconnects == 1


async def test_reconnect_now_replaces_a_live_session(rig: Rig) -> None:
    async with kept_up(rig):
        rig.supervisor.reconnect_now(events.CAUSE_SIGHUP, keep_open=30.0)
        await settle()
        assert rig.session.retired == [30.0]
        assert rig.session.attempts == 2
        assert rig.session.last.cause == events.CAUSE_SIGHUP
        await rig.time.advance(0.5)
        await rig.session.succeed()
        [lost] = rig.of(events.SessionLost)
        assert lost.cause == events.CAUSE_SIGHUP
        up = rig.of(events.SessionUp)[-1]
        assert (up.cause, up.outage) == (events.CAUSE_SIGHUP, 0.5)
        # And again, on the new session.
        rig.supervisor.reconnect_now(events.CAUSE_NETWORK)
        await settle()
        assert rig.session.retired == [30.0, 0.0]
        assert rig.session.last.cause == events.CAUSE_NETWORK


async def test_reconnect_now_cuts_the_backoff_short(rig: Rig) -> None:
    async with kept_up(rig):
        await lose_and_fail_until_a_long_wait(rig)
        await rig.time.advance(0.1)  # within the demand gap: only a request beats it
        rig.supervisor.reconnect_now(events.CAUSE_SLEEP)
        await settle()
        assert rig.session.attempts == 5
        assert rig.session.retired == []  # nothing was up to retire


async def test_reconnect_now_during_an_attempt_is_served_by_it(rig: Rig) -> None:
    async with kept_up(rig):
        await rig.session.lose()
        rig.supervisor.reconnect_now(events.CAUSE_SIGHUP)
        await rig.session.succeed()
        assert rig.session.attempts == 2
        assert rig.session.retired == []


async def test_the_outage_limit_ends_the_wait() -> None:
    [rig] = make_rig(give_up_after=10.0)
    async with kept_up(rig) as keeping:
        await lose_and_fail_until_a_long_wait(rig)  # 3 s into the outage
        await rig.time.advance(4.0)
        await rig.session.fail()  # 7 s; the next wait (8 s) would pass the limit
        await rig.time.advance(2.9)
        assert not keeping.done()
        await rig.time.advance(0.1)
        assert keeping.done()
        with pytest.raises(OutageTooLong) as raised:
            keeping.result()
        assert raised.value.exit_status == 255
        assert "10 s" in str(raised.value)
        assert "Connection refused" in str(raised.value)


async def test_the_outage_limit_stops_a_hanging_attempt() -> None:
    [rig] = make_rig(give_up_after=5.0)
    async with kept_up(rig) as keeping:
        await rig.session.lose()  # the immediate retry hangs (a black hole)
        await rig.time.advance(4.9)
        assert not keeping.done()
        await rig.time.advance(0.1)
        assert keeping.done()
        assert rig.session.last.result.cancelled()
        with pytest.raises(OutageTooLong):
            keeping.result()


async def test_the_outage_limit_counts_each_outage_afresh() -> None:
    [rig] = make_rig(give_up_after=5.0)
    async with kept_up(rig) as keeping:
        await rig.session.lose()
        await rig.time.advance(4.0)
        await rig.session.succeed()
        await rig.time.advance(100.0)  # up for long
        await rig.session.lose()
        await rig.time.advance(4.0)
        await rig.session.succeed()
        assert not keeping.done()


# -- the upstream tells of demand for every kind of request ----------------------------


class RecordingSession:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def open_tcp(self, *args: object) -> object:
        self.calls.append("open_tcp")
        return "channel"

    async def listen_tcp(self, *args: object) -> object:
        self.calls.append("listen_tcp")
        return "listener"

    async def run_process(self, *args: object) -> object:
        self.calls.append("run_process")
        return "process"


async def test_every_kind_of_request_signals_demand_before_it_waits() -> None:
    calls: list[str] = []
    upstream = SshUpstream(
        RecordingSession(calls),  # type: ignore[arg-type]
        lambda: calls.append("demand"),
    )
    request = Request("example.com", 80, ("127.0.0.1", 5000), "socks5", None, "127.0.0.1:1080")
    await upstream.open(request, None)  # type: ignore[arg-type]
    await upstream.listen_tcp("", 0, lambda origin: None)
    await upstream.run_process("python3", None)  # type: ignore[arg-type]
    assert calls == ["demand", "open_tcp", "demand", "listen_tcp", "demand", "run_process"]


class CancelLosingSession(FakeSession):
    """An attempt that, cancelled, ends with a connection error instead: what Python
    3.11's ``asyncio.wait_for`` does (inside asyncssh's connect, say) when the operation
    ends just as the task is cancelled."""

    async def connect(
        self,
        *,
        demand: bool = False,
        cause: str | None = None,
        outage: Callable[[], float | None] | None = None,
    ) -> None:
        try:
            await super().connect(demand=demand, cause=cause, outage=outage)
        except asyncio.CancelledError:
            raise ConnectFailed("Connection refused") from None


async def test_a_cancellation_an_attempt_loses_still_ends_the_retry_loop() -> None:
    # Without the check, the loop takes the error for a failed attempt and waits for the
    # next one, and serve, which awaits the cancelled task on its way out, hangs.
    [rig] = make_rig(CancelLosingSession)
    async with kept_up(rig) as task:
        await rig.session.lose()
        assert rig.session.attempts == 2  # the immediate retry is running
        task.cancel()
        await settle()
        assert task.cancelled()
        assert rig.session.attempts == 2
        assert rig.of(events.ReconnectScheduled) == []
