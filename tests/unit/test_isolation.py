"""``--isolate`` at unit speed: :class:`tunnel.isolation.Isolated` with fake upstreams
and an injected clock (one upstream per user name, the default for none, idle expiry
counted from the last connection's end, close awaiting every task), :class:`OnDemand`
(one connect for the requests that wait on it, a failure for each of them, a fresh try
after), and the proxy-side parts: the SOCKS5 codec's optional login, the unchecked HTTP
Basic user name, and user names kept byte for byte.
"""

from __future__ import annotations

import asyncio
import base64

import pytest
from fixtures.fake_upstream import FakeChannel, FakeUpstream
from hypothesis import given
from hypothesis import strategies as st

from tunnel.errors import ChannelOpenFailed, RemoteProtocolError, ReplyReason
from tunnel.http import basic_user
from tunnel.isolation import Isolated, OnDemand
from tunnel.names import has_control, printable, user_name
from tunnel.socks import NEED_DATA, Credentials, Request, ServerConnection
from tunnel.upstreams import Request as UpstreamRequest
from tunnel.upstreams import Upstream


class Sink:
    def __init__(self) -> None:
        self.closed: list[BaseException | None] = []

    def remote_data(self, data: bytes) -> None: ...
    def remote_eof(self) -> None: ...
    def remote_pause(self) -> None: ...
    def remote_resume(self) -> None: ...

    def remote_closed(self, exc: BaseException | None) -> None:
        self.closed.append(exc)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Made:
    """The factory: a FakeUpstream per key, and a record of the closes asked for."""

    def __init__(self) -> None:
        self.upstreams: dict[str, FakeUpstream] = {}
        self.made: list[str] = []
        self.closed: list[tuple[str, str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.some_closed = asyncio.Event()

    def __call__(self, key: str) -> tuple[Upstream, object]:
        self.made.append(key)
        upstream = self.upstreams[key] = FakeUpstream()

        async def close(reason: str) -> None:
            await self.release.wait()
            self.closed.append((key, reason))
            self.some_closed.set()

        return upstream, close


def request(user: str | None) -> UpstreamRequest:
    return UpstreamRequest("db.internal", 5432, ("127.0.0.1", 50000), "socks5", user, "l")


def isolated(made: Made, clock: Clock, idle: float = 60.0) -> tuple[Isolated, FakeUpstream]:
    default = FakeUpstream()
    return Isolated(made, default, idle=idle, clock=clock), default  # type: ignore[arg-type]


async def test_each_user_name_has_its_own_upstream_and_none_goes_to_the_default() -> None:
    made, clock = Made(), Clock()
    iso, default = isolated(made, clock)
    for user in ("alice", "bob", "alice", None, "Alice", ""):
        await iso.open(request(user), Sink())
    assert made.made == ["alice", "bob", "Alice", ""]
    assert [r.user for r in made.upstreams["alice"].requests] == ["alice", "alice"]
    assert len(made.upstreams["bob"].requests) == 1
    assert [r.user for r in default.requests] == [None]
    await iso.close()
    assert sorted(made.closed) == sorted((k, "stopping") for k in ("alice", "bob", "Alice", ""))


async def test_an_upstream_closes_only_after_idle_seconds_without_a_connection() -> None:
    made, clock = Made(), Clock()
    iso, _ = isolated(made, clock, idle=60)
    channel = await iso.open(request("alice"), Sink())
    clock.now += 3600  # an hour with the connection open: not idle
    assert iso.reap() == []
    channel.close()
    assert made.upstreams["alice"].channels[0].closed  # the proxy's close reaches it
    clock.now += 59.5
    assert iso.reap() == []
    clock.now += 0.5
    assert iso.reap() == ["alice"]
    assert iso.keys == []
    await iso.close()
    assert made.closed == [("alice", "no connection for 60 s")]


async def test_the_far_side_closing_ends_a_connection_too_and_counts_once() -> None:
    made, clock = Made(), Clock()
    iso, _ = isolated(made, clock, idle=10)
    sink = Sink()
    first = await iso.open(request("alice"), sink)
    second = await iso.open(request("alice"), Sink())
    fake = made.upstreams["alice"].channels[0]
    assert fake.sink is not None
    fake.sink.remote_closed(None)  # the far side closed the first
    assert sink.closed == [None]  # and the proxy's sink heard of it
    first.close()  # then the proxy closes it: counted once, so the second still holds
    clock.now += 100
    assert iso.reap() == []
    second.close()
    clock.now += 10
    assert iso.reap() == ["alice"]
    await iso.close()


async def test_a_failed_open_does_not_keep_the_upstream_busy() -> None:
    made, clock = Made(), Clock()
    iso, _ = isolated(made, clock, idle=5)
    (await iso.open(request("bob"), Sink())).close()
    made.upstreams["bob"].failure = ChannelOpenFailed(ReplyReason.CONNECTION_REFUSED, "no")
    with pytest.raises(ChannelOpenFailed):
        await iso.open(request("bob"), Sink())
    clock.now += 5
    assert iso.reap() == ["bob"]
    await iso.close()


async def test_a_name_used_again_after_its_close_gets_a_new_upstream() -> None:
    made, clock = Made(), Clock()
    iso, _ = isolated(made, clock, idle=1)
    (await iso.open(request("carol"), Sink())).close()
    clock.now += 1
    assert iso.reap() == ["carol"]
    await iso.open(request("carol"), Sink())
    assert made.made == ["carol", "carol"]
    await iso.close()


async def test_close_awaits_the_closes_and_stops_the_sweep() -> None:
    made, clock = Made(), Clock()
    iso, _ = isolated(made, clock, idle=1)
    (await iso.open(request("alice"), Sink())).close()
    await iso.open(request("bob"), Sink())
    clock.now += 1
    made.release.clear()
    assert iso.reap() == ["alice"]  # its close now waits on release
    before = asyncio.all_tasks()
    closing = asyncio.ensure_future(iso.close())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not closing.done()  # two closes wait on release
    made.release.set()
    await closing
    assert sorted(made.closed) == [("alice", "no connection for 1 s"), ("bob", "stopping")]
    mine = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert not mine, mine
    with pytest.raises(ChannelOpenFailed):
        await iso.open(request("dave"), Sink())
    assert made.made == ["alice", "bob"]


async def test_the_sweep_closes_idle_upstreams_by_itself() -> None:
    # The loop's own clock this time: the sweep sleeps until the expiry it computes.
    made = Made()
    iso = Isolated(made, FakeUpstream(), idle=0.01)  # type: ignore[arg-type]
    (await iso.open(request("erin"), Sink())).close()
    await asyncio.wait_for(made.some_closed.wait(), 30)
    assert made.closed == [("erin", "no connection for 0.01 s")]
    await iso.close()


async def test_on_demand_connects_once_for_the_requests_that_wait() -> None:
    inner = FakeUpstream()
    up = False
    calls = 0
    gate = asyncio.Event()

    async def connect() -> None:
        nonlocal up, calls
        calls += 1
        await gate.wait()
        up = True

    demand = OnDemand(inner, connect, lambda: up)
    opens = [asyncio.ensure_future(demand.open(request("a"), Sink())) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    channels = await asyncio.gather(*opens)
    assert calls == 1
    assert all(isinstance(c, FakeChannel) for c in channels)
    up = False  # lost: the next request connects again
    await demand.open(request("a"), Sink())
    assert calls == 2
    await demand.close()


async def test_on_demand_fails_each_waiter_then_tries_afresh() -> None:
    inner = FakeUpstream()
    failures = [ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, "auth failed")]

    async def connect() -> None:
        if failures:
            raise failures.pop()

    demand = OnDemand(inner, connect, lambda: False)
    results = await asyncio.gather(
        demand.open(request("a"), Sink()), demand.open(request("a"), Sink()),
        return_exceptions=True,
    )  # fmt: skip
    assert all(isinstance(r, ChannelOpenFailed) for r in results)
    assert inner.requests == []
    await demand.open(request("a"), Sink())
    assert len(inner.requests) == 1
    await demand.close()


async def test_on_demand_close_cancels_an_attempt_in_progress() -> None:
    started = asyncio.Event()

    async def connect() -> None:
        started.set()
        await asyncio.Event().wait()

    demand = OnDemand(FakeUpstream(), connect, lambda: False)
    opening = asyncio.ensure_future(demand.open(request("a"), Sink()))
    await started.wait()
    await demand.close()
    with pytest.raises(asyncio.CancelledError):
        await opening


# -- the proxy side ------------------------------------------------------------------------

GREET_BOTH = b"\x05\x02\x00\x02"
LOGIN = b"\x01\x05alice\x03pwd"
CONNECT = b"\x05\x01\x00\x03\x0bdb.internal\x15\x38"


def events_of(codec: ServerConnection) -> list[object]:
    out = []
    while True:
        event = codec.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, Credentials):
            codec.accept_auth()
        if isinstance(event, Request):
            return out


@pytest.mark.parametrize("chunk", [1, 100])
def test_offered_login_is_taken_when_the_client_offers_it(chunk: int) -> None:
    codec = ServerConnection(offer_auth=True)
    wire = GREET_BOTH + LOGIN + CONNECT
    seen: list[object] = []
    for i in range(0, len(wire), chunk):
        codec.receive_data(wire[i : i + chunk])
        seen += events_of(codec)
    assert codec.data_to_send() == b"\x05\x02"
    assert seen[0] == Credentials(b"alice", b"pwd")
    assert isinstance(seen[1], Request)
    assert seen[1].host == "db.internal"


def test_offered_login_is_not_forced_on_a_client_without_it() -> None:
    codec = ServerConnection(offer_auth=True)
    codec.receive_data(b"\x05\x01\x00" + CONNECT)
    (event,) = events_of(codec)
    assert isinstance(event, Request)
    assert codec.data_to_send() == b"\x05\x00"


def test_without_offer_a_client_offering_both_gets_no_auth() -> None:
    codec = ServerConnection()
    codec.receive_data(GREET_BOTH)
    assert events_of(codec) == []
    assert codec.data_to_send() == b"\x05\x00"


def test_required_login_still_refuses_a_client_without_it() -> None:
    codec = ServerConnection(require_auth=True, offer_auth=True)
    codec.receive_data(b"\x05\x01\x00")
    with pytest.raises(RemoteProtocolError) as caught:
        codec.next_event()
    assert caught.value.reply == b"\x05\xff"


def basic(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


@pytest.mark.parametrize(
    ("header", "user"),
    [
        (None, None),
        (basic(b"alice:secret"), b"alice"),
        (basic(b"alice:"), b"alice"),
        (basic(b":secret"), b""),
        (basic(b"a:b:c"), b"a"),
        (b"basic " + base64.b64encode(b"bob:x"), b"bob"),
        (basic(b"no-colon"), None),
        (b"Bearer abc", None),
        (b"Basic !!!", None),
        (b"Basic", None),
    ],
)
def test_basic_user_reads_the_name_without_checking(header: bytes | None, user: bytes) -> None:
    assert basic_user(header) == user


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_basic_user_is_the_name_before_the_first_colon(name: bytes, rest: bytes) -> None:
    name = name.replace(b":", b"")
    assert basic_user(basic(name + b":" + rest)) == name


@given(st.binary(max_size=32), st.binary(max_size=32))
def test_user_names_differing_in_any_byte_stay_different_keys(a: bytes, b: bytes) -> None:
    assert (user_name(a) == user_name(b)) == (a == b)
    assert not has_control(printable(user_name(a)))
