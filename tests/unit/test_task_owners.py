"""Every task has an owner, and only the CLI exits: the pool starts no task when asked
which session to use, and a second Ctrl-C is the CLI's to act on (issue 18)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tunnel import app, master
from tunnel.config import Config, Destination
from tunnel.errors import ConnectFailed
from tunnel.pool import SessionPool


class BusySession:
    """What the pool reads of a session: up, and already carrying a channel."""

    is_up = True
    channels = 1


async def test_picking_a_session_starts_no_task() -> None:
    pool = SessionPool(BusySession(), 4)  # type: ignore[arg-type]
    before = asyncio.all_tasks()
    assert pool.pick() is pool.primary
    assert asyncio.all_tasks() == before
    await pool.close()


def test_a_second_ctrl_c_is_handed_to_the_caller_not_exited_below_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_exit(status: int) -> None:
        raise AssertionError(f"os._exit({status}) below the CLI")

    monkeypatch.setattr(os, "_exit", no_exit)
    forced: list[str] = []

    async def run() -> None:
        stop = app._Stop(lambda: forced.append("forced"))
        stop.request(signal.SIGINT)
        assert stop.event.is_set()
        assert forced == []
        stop.request(signal.SIGINT)

    asyncio.run(run())
    assert forced == ["forced"]


async def test_a_cancellation_lost_while_asking_the_master_still_ends_its_retry_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[asyncio.Future[None]] = []

    async def losing_connect(path: str) -> master.MuxClient:
        # Cancelled, it fails as if no master answered (Python 3.11's wait_for can).
        asked.append(asyncio.get_running_loop().create_future())
        try:
            await asked[-1]
        except asyncio.CancelledError:
            raise ConnectFailed(f"no OpenSSH master at {path} (no such socket)") from None
        raise AssertionError("never answered here")

    monkeypatch.setattr(master, "_connect", losing_connect)
    seen: list[object] = []
    upstream = master.MasterUpstream(
        "/nonexistent/m.sock", Config(Destination("h", "u", 22)), seen.append, random=lambda: 0.0
    )
    task = asyncio.ensure_future(upstream._reconnect("the master closed the socket"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(asked) == 1  # the first attempt is at once
    task.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert task.cancelled()
    assert len(asked) == 1


async def test_a_cancel_that_arrives_as_the_tcp_connect_completes_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM while connecting: the cancellation reaches the task just as the socket is
    connected. Python 3.11's wait_for returned the socket and dropped the cancellation
    there, so pytunnel went on into the SSH handshake with a mute server."""
    from tunnel import eyeballs, session

    caller: asyncio.Task[None] | None = None
    opened: list[object] = []

    async def connects_as_it_is_cancelled(*args: object, **kwargs: object) -> object:
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[object] = loop.create_future()

        def complete_and_cancel() -> None:
            sock = object()
            opened.append(sock)
            connected.set_result(sock)  # the connect completes...
            assert caller is not None
            caller.cancel()  # ...and the signal's cancellation comes in the same pass

        loop.call_soon(complete_and_cancel)
        return await connected

    monkeypatch.setattr(eyeballs, "open_socket", connects_as_it_is_cancelled)
    monkeypatch.setattr(session, "connect_target", lambda config, dest: ("127.0.0.1", 22, None))
    config = Config(destination=Destination("127.0.0.1"))
    dialing = session.Session(config, lambda event: None)
    kwargs: dict[str, object] = {}

    async def dial() -> None:
        await dialing._dial(config.destination, kwargs)

    caller = asyncio.get_running_loop().create_task(dial())
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert opened  # the connect did complete; the task still ended cancelled
    assert "sock" not in kwargs  # and went no further
