"""``--workers``: the wire between pytunnel's first process and its workers, the limit's
shares, the mirror that turns a worker's events into the tunnel's, the worker's sink,
holding the accept loop, and the restart policy with stand-in worker processes (the
real ones, on a real sshd, are in tests/integration/test_workers.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import pickle
import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel import events
from tunnel.config import Config, Destination, Forward
from tunnel.proxy import ProxyServer
from tunnel.tasks import Owner
from tunnel.workers import (
    MAX_FRAME,
    Forwarder,
    Mirror,
    Workers,
    frame,
    load_from_worker,
    read_frame,
    share_limit,
    worker_config,
)

START = 1000.0


def info(number: int, **fields: Any) -> events.ConnectionInfo:
    return events.ConnectionInfo(id=number, client="127.0.0.1:5000", started=START, **fields)


# -- frames ---------------------------------------------------------------------------


async def frames_of(data: bytes) -> list[bytes | None]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out: list[bytes | None] = []
    while True:
        payload = await read_frame(reader)
        out.append(payload)
        if payload is None:
            return out


async def test_frames_come_back_as_they_were_sent() -> None:
    messages = [("events", [events.Notice("a", "k")]), ("counts", [(1, 2, 3, 0)], [4]), ()]
    data = b"".join(frame(message) for message in messages)
    payloads = await frames_of(data)
    assert payloads[-1] is None
    assert [load_from_worker(p) for p in payloads[:-1] if p is not None] == messages


@pytest.mark.parametrize("cut", [1, 3, 5, 20])
async def test_a_stream_that_ends_inside_a_frame_is_an_error(cut: int) -> None:
    data = frame(("events", [events.Notice("a long enough message", "")]))
    with pytest.raises(ValueError, match="inside a frame"):
        await frames_of(data[:cut])


async def test_an_oversized_frame_is_refused_before_it_is_read() -> None:
    with pytest.raises(ValueError, match="frame of"):
        await frames_of((MAX_FRAME + 1).to_bytes(4, "big"))


class _Runs:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch should-not-exist",))


def test_only_event_classes_are_built_from_a_worker(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="not an event"):
        load_from_worker(pickle.dumps(("events", [_Runs()])))
    assert not (tmp_path / "should-not-exist").exists()
    # Every kind of event does come through, with its connection.
    sample = events.ChannelOpened(info(3, protocol="socks5", host="h", port=1, worker=0), 0.5)
    assert load_from_worker(pickle.dumps(("events", [sample]))) == ("events", [sample])


# -- the limit's shares ---------------------------------------------------------------


@given(st.integers(min_value=1, max_value=64), st.integers(min_value=0, max_value=10_000))
def test_shares_add_up_to_the_limit_and_each_process_has_room(processes: int, extra: int) -> None:
    limit = processes + extra
    shares = share_limit(limit, processes)
    assert len(shares) == processes
    assert sum(shares) == limit
    assert min(shares) >= 1
    # Equal, but for the remainder, which the first process takes.
    assert set(shares[1:]) <= {limit // processes}
    assert 0 <= shares[0] - limit // processes < processes


@pytest.mark.parametrize(("limit", "processes"), [(1, 2), (3, 4), (0, 1), (5, 0)])
def test_a_limit_below_one_per_process_is_refused(limit: int, processes: int) -> None:
    with pytest.raises(ValueError, match="room for one connection"):
        share_limit(limit, processes)


def test_a_worker_binds_nothing_forwards_nothing_and_gives_up_never() -> None:
    config = Config(
        Destination("bastion"),
        forwards=(Forward(None, 1080),),
        reverse_forwards=(Forward(None, 2080),),
        workers=4,
        max_connections=100,
        give_up_after=30.0,
        demo=True,
    )
    mine = worker_config(config, 25)
    assert (mine.forwards, mine.reverse_forwards, mine.workers) == ((), (), 1)
    assert (mine.max_connections, mine.give_up_after, mine.retry_start) == (25, None, True)
    assert mine.demo is False
    assert mine.destination == config.destination


# -- the mirror -----------------------------------------------------------------------


class Seen(list[events.Event]):
    def __call__(self, event: events.Event) -> None:
        self.append(event)


def test_a_workers_connections_get_the_tunnels_ids_and_one_mirror_each() -> None:
    ids = itertools.count(7)
    seen = Seen()
    first, second = Mirror(1, 100, ids, seen), Mirror(2, 200, ids, seen)
    theirs = info(1)
    first.event(events.ClientAccepted(theirs))
    second.event(events.ClientAccepted(info(1)))  # the same id in another worker
    theirs.protocol, theirs.host, theirs.port = "socks5", "db", 5432
    first.event(events.RequestParsed(theirs, "socks5", "CONNECT", "db", 5432, True))
    theirs.open, theirs.bytes_up = True, 10
    first.event(events.ChannelOpened(theirs, 0.25))
    accepted, other, parsed, opened = seen
    assert isinstance(opened, events.ChannelOpened)
    assert accepted.connection is parsed.connection is opened.connection  # type: ignore[union-attr]
    mine = opened.connection
    assert (mine.id, other.connection.id) == (7, 8)  # type: ignore[union-attr]
    assert (mine.worker, other.connection.worker) == (1, 2)  # type: ignore[union-attr]
    assert (mine.host, mine.port, mine.protocol, mine.open, mine.bytes_up) == (
        "db",
        5432,
        "socks5",
        True,
        10,
    )
    assert (mine.client, mine.started, opened.latency) == ("127.0.0.1:5000", START, 0.25)
    assert theirs.id == 1  # the worker's own object is left as it was


def test_counts_are_copied_and_gone_connections_forgotten() -> None:
    seen = Seen()
    mirror = Mirror(1, 100, itertools.count(1), seen)
    mirror.event(events.ClientAccepted(info(5)))
    mirror.event(events.ClientAccepted(info(6)))
    mine = seen[0].connection  # type: ignore[union-attr]
    mirror.counts([(5, 300, 4000, 2), (99, 1, 1, 1)], [6, 98])
    assert (mine.bytes_up, mine.bytes_down, mine.dropped) == (300, 4000, 2)
    assert set(mirror.infos) == {5}


def test_a_workers_end_closes_what_it_had_open_with_the_last_counts() -> None:
    seen = Seen()
    mirror = Mirror(1, 100, itertools.count(1), seen)
    mirror.event(events.ChannelOpened(info(1, open=True, bytes_up=5, bytes_down=6), 0.1))
    mirror.event(events.ClientAccepted(info(2)))  # no channel yet: nothing to close
    mirror.counts([(1, 50, 60, 0)], [])
    seen.clear()
    mirror.ended(START + 4.0)
    [closed] = seen
    assert isinstance(closed, events.ConnectionClosed)
    assert (closed.bytes_up, closed.bytes_down, closed.duration) == (50, 60, 4.0)
    assert closed.connection.open is False
    assert mirror.infos == {}
    mirror.ended(START + 5.0)
    assert len(seen) == 1


def test_a_workers_session_is_its_state_and_the_rest_is_its_own() -> None:
    seen = Seen()
    mirror = Mirror(2, 4242, itertools.count(1), seen)
    listener = events.Listener("127.0.0.1", 1080)
    up = events.SessionUp("u@h:22", "OpenSSH", "aes128-gcm", "k", "m", "none")
    for event in (
        events.SessionConnecting("u@h:22", 1),
        up,  # the first one: "ready" says it
        events.ListenerStarted(listener),
        events.Ready((listener,), "u@h:22"),
        events.SessionLost("u@h:22", "EOF"),
        events.ReconnectScheduled("u@h:22", 1.0, 1, "EOF"),
        dataclasses.replace(up, outage=2.5, cause="lost"),
        events.SessionLost("u@lab:22", "EOF", upstream="lab"),  # a route's: its own
        events.Status("u@h:22", "up", 1.0, 2.0, 0, 0, 0, 0, 0, 0, 0),
        events.Notice("cannot accept connections", key="accept-starved"),
        events.IsolatedSession("alice", "u@h:22", "up", "aes128-gcm"),
        events.Stopping("terminated"),
    ):
        mirror.event(event)
    assert seen == [
        events.WorkerState(2, 4242, "up", "u@h:22"),
        events.WorkerState(2, 4242, "lost", "EOF; it stops accepting until it is back"),
        events.WorkerState(2, 4242, "up", "u@h:22"),
        events.Notice("worker 2: cannot accept connections", key="accept-starved"),
        events.IsolatedSession("alice", "u@h:22", "up", "aes128-gcm"),
    ]


# -- the worker's sink ----------------------------------------------------------------


async def read_messages(fd: int) -> list[object]:
    data = b""
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out = []
    while (payload := await read_frame(reader)) is not None:
        out.append(load_from_worker(payload))
    return out


async def test_a_workers_events_go_once_per_loop_pass_and_its_counts_on_a_timer() -> None:
    read, write = os.pipe()
    try:
        forward = Forwarder(write)
        live = [info(1), info(2)]
        forward(events.ClientAccepted(live[0]))
        forward(events.ClientAccepted(live[1]))
        forward(events.ClientAccepted(info(3)))
        assert await read_messages(read) == []  # nothing before the pass ends
        await asyncio.sleep(0)
        [batch] = await read_messages(read)
        assert batch == ("events", [events.ClientAccepted(c) for c in (*live, info(3))])
        # Counts: what changed since the last tick, and what is no longer open.
        loop = asyncio.get_running_loop()
        ticked = loop.create_future()
        forward.watch(lambda: (ticked.done() or ticked.set_result(None), live)[1])
        live[0].bytes_up = 10
        await asyncio.wait_for(ticked, 5)
        assert await read_messages(read) == [("counts", [(1, 10, 0, 0)], [3])]
        forward.failed("no way to log in", False)
        forward.close()
        assert await read_messages(read) == [("failed", "no way to log in", False)]
    finally:
        os.close(read)
        os.close(write)


def test_a_sink_whose_reader_is_gone_stops_writing_without_failing() -> None:
    read, write = os.pipe()
    os.close(read)
    try:
        forward = Forwarder(write)
        forward.failed("x", True)
        assert forward.broken
        forward.failed("y", True)
    finally:
        os.close(write)


# -- holding the accept loop ----------------------------------------------------------


class _NoUpstream:
    name = "none"

    async def open(self, request: Any, sink: Any) -> Any:
        raise AssertionError("not used")


async def test_a_held_listener_accepts_nothing_until_released() -> None:
    seen = Seen()
    proxy = ProxyServer(_NoUpstream(), seen)  # type: ignore[arg-type]
    [listener] = await proxy.listen([("127.0.0.1", 0)])
    client = socket.create_connection((listener.host, listener.port))
    try:
        proxy.hold_accepting()
        proxy.hold_accepting()  # twice is once
        late = socket.create_connection((listener.host, listener.port))
        await asyncio.sleep(0.2)
        accepted = [e for e in seen if isinstance(e, events.ClientAccepted)]
        assert len(accepted) <= 1  # the first may have been taken before the hold
        proxy.release_accepting()
        for _ in range(200):
            if len([e for e in seen if isinstance(e, events.ClientAccepted)]) == 2:
                break
            await asyncio.sleep(0.01)
        assert len([e for e in seen if isinstance(e, events.ClientAccepted)]) == 2
        assert proxy.listening_sockets()[0].getsockname()[1] == listener.port
        late.close()
    finally:
        client.close()
        await proxy.close()


# -- restarts, with stand-in worker processes -----------------------------------------

_STAND_IN = textwrap.dedent(
    """
    import os, pickle, sys
    head = os.read(0, 4)
    size = int.from_bytes(head, "big")
    data = b""
    while len(data) < size:
        data += os.read(0, size - len(data))
    setup = pickle.loads(data)
    def send(message):
        body = pickle.dumps(message)
        os.write(1, len(body).to_bytes(4, "big") + body)
    mode = sys.argv[1]
    if mode == "fail":
        send(("failed", f"worker {setup.number} cannot log in", False))
        sys.exit(255)
    if mode == "crash":
        sys.exit(3)
    send(("events", [__import__("tunnel.events").events.Notice(
        f"share {setup.config.max_connections} fds {len(setup.descriptors)}", "")]))
    os.read(0, 1)  # until the first process closes the pipe
    """
)


async def run_stand_ins(mode: str, until: Any, count: int = 2) -> list[events.Event]:
    seen = Seen()
    owner = Owner()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = Config(Destination("bastion"), workers=count + 1, max_connections=10)
    pool = Workers(
        count,
        config,
        config,
        [sock],
        seen,
        itertools.count(1),
        owner=owner,
        command=(sys.executable, "-c", _STAND_IN, mode),
    )
    try:
        pool.start()
        for _ in range(1000):
            if until(seen):
                break
            await asyncio.sleep(0.01)
        return list(seen)
    finally:
        await pool.close()
        await owner.close()
        sock.close()


async def test_workers_get_their_setup_and_share_of_the_limit() -> None:
    seen = await run_stand_ins("serve", lambda seen: len(seen) == 2)
    assert sorted(e.message for e in seen if isinstance(e, events.Notice)) == [
        "worker 1: share 3 fds 1",
        "worker 2: share 3 fds 1",
    ]


async def test_a_worker_that_cannot_log_in_is_not_started_again() -> None:
    seen = await run_stand_ins("fail", lambda seen: len(seen) == 2, count=2)
    states = sorted(
        (e.worker, e.state, e.reason) for e in seen if isinstance(e, events.WorkerState)
    )
    assert states == [
        (1, "failed", "worker 1 cannot log in; it is not started again"),
        (2, "failed", "worker 2 cannot log in; it is not started again"),
    ]


async def test_a_worker_that_ends_is_started_again() -> None:
    def twice(seen: list[events.Event]) -> bool:
        return len([e for e in seen if isinstance(e, events.WorkerState)]) >= 2

    seen = await run_stand_ins("crash", twice, count=1)
    first, second = [e for e in seen if isinstance(e, events.WorkerState)][:2]
    assert (first.state, second.state) == ("exited", "exited")
    assert first.reason.startswith("exited with status 3; starting again in ")
    assert first.pid != second.pid
