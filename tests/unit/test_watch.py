"""The wake room's pure parts and its probe logic, at unit speed: the clock-jump check
with injected clocks, the netlink message count byte by byte, one probe per burst."""

from __future__ import annotations

import asyncio
import struct

from hypothesis import given
from hypothesis import strategies as st

from tunnel import events, watch
from tunnel.ui import describe
from tunnel.watch import ClockJump, Wake, route_changes, watch_clock


class FakeSession:
    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.probes: list[float] = []

    async def probe(self, within: float) -> bool:
        self.probes.append(within)
        return self.answers


class FakeKeeper:
    def __init__(self) -> None:
        self.causes: list[str] = []

    def reconnect_now(self, cause: str) -> None:
        self.causes.append(cause)


def test_clock_jump_reports_the_wall_clock_running_ahead_only() -> None:
    jumps = ClockJump(wall=1000.0, mono=50.0, margin=5.0)
    assert jumps.check(1005.0, 55.0) is None  # both moved 5 s: awake
    assert jumps.check(1010.0, 59.0) is None  # 1 s of drift: within the margin
    assert jumps.check(1100.0, 64.0) == 85.0  # slept: wall +90, monotonic +5
    assert jumps.check(1105.0, 69.0) is None  # measured from the new offset
    assert jumps.check(1000.0, 74.0) is None  # set back: not a sleep


def nlmsg(kind: int, body: bytes) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + body + b"\0" * (-length % 4)


def rtmsg(dst_len: int, table: int) -> bytes:
    # family, dst_len, src_len, tos, table, protocol, scope, type, flags
    return struct.pack("=BBBBBBBBI", 2, dst_len, 0, 0, table, 3, 0, 1, 0)


NEWADDR = nlmsg(watch.RTM_NEWADDR, b"\x02\x20\x00\x00\x01\x00\x00\x00")
DEFAULT_ROUTE = nlmsg(watch.RTM_NEWROUTE, rtmsg(0, 254))
PREFIX_ROUTE = nlmsg(watch.RTM_NEWROUTE, rtmsg(24, 254))
LOCAL_TABLE = nlmsg(watch.RTM_DELROUTE, rtmsg(0, 255))


def test_route_changes_counts_addresses_and_the_default_route() -> None:
    assert route_changes(NEWADDR) == 1
    assert route_changes(DEFAULT_ROUTE) == 1
    assert route_changes(PREFIX_ROUTE) == 0
    assert route_changes(LOCAL_TABLE) == 0
    assert route_changes(NEWADDR + PREFIX_ROUTE + DEFAULT_ROUTE + NEWADDR) == 3
    # A truncated message ends the count; what came before it stands.
    assert route_changes(NEWADDR + DEFAULT_ROUTE[:-1]) == 1
    for cut in range(len(NEWADDR)):
        assert route_changes(NEWADDR[:cut]) == 0


@given(st.binary(max_size=300))
def test_route_changes_never_raises(data: bytes) -> None:
    assert route_changes(data) >= 0


async def run_briefly(wake: Wake, until: asyncio.Event) -> None:
    task = asyncio.create_task(wake.run())
    try:
        await asyncio.wait_for(until.wait(), 30)
    finally:
        task.cancel()


async def test_a_burst_of_changes_gives_one_probe_and_a_silent_session_a_reconnect() -> None:
    seen: list[events.Event] = []
    probed = asyncio.Event()

    def emit(event: events.Event) -> None:
        seen.append(event)
        probed.set()

    session, keeper = FakeSession(answers=False), FakeKeeper()
    wake = Wake(session, keeper, emit, "srv", probe_timeout=2.0, settle=0.0)
    for _ in range(5):
        wake.notice(watch.NETWORK_CHANGE)
    await run_briefly(wake, probed)
    assert session.probes == [2.0]
    assert seen == [events.SessionProbed("srv", "network", False)]
    assert keeper.causes == ["network"]


async def test_an_answering_session_is_kept_and_sleep_wins_over_network_change() -> None:
    seen: list[events.Event] = []
    probed = asyncio.Event()

    def emit(event: events.Event) -> None:
        seen.append(event)
        probed.set()

    session, keeper = FakeSession(answers=True), FakeKeeper()
    wake = Wake(session, keeper, emit, "srv", settle=0.0)
    wake.notice(watch.SLEEP)
    wake.notice(watch.NETWORK_CHANGE)
    await run_briefly(wake, probed)
    assert seen == [events.SessionProbed("srv", "sleep", True)]
    assert keeper.causes == []


async def test_watch_clock_notices_a_sleep_from_injected_clocks() -> None:
    # (wall, monotonic) at start and after each interval: awake, awake, slept 600 s.
    readings = iter([(0.0, 0.0), (5.0, 5.0), (10.0, 10.0), (615.0, 15.0)])
    now = (0.0, 0.0)
    steps = 0
    done = asyncio.Event()

    async def sleep(_: float) -> None:
        nonlocal now, steps
        try:
            now = next(readings)
        except StopIteration:
            await asyncio.Event().wait()  # the script is over: wait to be cancelled
        steps += 1

    noticed: list[str] = []

    class Recorder(Wake):
        def notice(self, cause: str) -> None:
            noticed.append(cause)
            done.set()

    recorder = Recorder(FakeSession(True), FakeKeeper(), events.discard, "srv")
    now = next(readings)
    task = asyncio.create_task(
        watch_clock(recorder, wall=lambda: now[0], mono=lambda: now[1], sleep=sleep)
    )
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        task.cancel()
    assert noticed == ["sleep"]
    assert steps == 3  # at the third reading, not before


def test_the_log_line_says_why_and_what_follows() -> None:
    assert describe(events.SessionProbed("srv", "sleep", True)) == (
        "resumed from sleep: srv still answers",
        False,
    )
    assert describe(events.SessionProbed("srv", "network", False)) == (
        "the network changed: srv did not answer, reconnecting now",
        True,
    )


async def test_every_session_is_probed_on_its_own_but_not_one_out_of_use() -> None:
    # One wake per session (the command line's, each route destination's): a change is
    # told to all; a route destination nobody asked for yet is not probed.
    seen: list[events.Event] = []
    probed = asyncio.Event()
    asked = asyncio.Event()

    def emit(event: events.Event) -> None:
        seen.append(event)
        probed.set()

    def unused() -> bool:
        asked.set()
        return False

    used, idle = FakeSession(answers=False), FakeSession(answers=False)
    keeper, idle_keeper = FakeKeeper(), FakeKeeper()
    wakes = [
        Wake(used, keeper, emit, "main", settle=0.0),
        Wake(idle, idle_keeper, emit, "lab", settle=0.0, active=unused),
    ]
    tasks = [asyncio.create_task(wake.run()) for wake in wakes]
    try:
        watch.Every(wakes).notice(watch.SLEEP)
        await asyncio.wait_for(asyncio.gather(probed.wait(), asked.wait()), 30)
        await asyncio.sleep(0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert seen == [events.SessionProbed("main", "sleep", False)]
    assert (keeper.causes, idle_keeper.causes) == (["sleep"], [])
    assert idle.probes == []
