"""Happy Eyeballs' pure parts without sockets: the address order (RFC 8305 section 4)
and the race (fake attempts: which starts when, which wins, what is closed)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from tunnel.eyeballs import AddrInfo, interleave, race

SIX, FOUR = socket.AF_INET6, socket.AF_INET


def info(family: int, address: str) -> AddrInfo:
    sockaddr = (address, 22, 0, 0) if family == SIX else (address, 22)
    return (family, socket.SOCK_STREAM, 6, "", sockaddr)


def addresses(infos: list[AddrInfo]) -> list[str]:
    return [str(item[4][0]) for item in infos]


def test_interleave_starts_with_ipv6_and_alternates() -> None:
    given = [
        info(FOUR, "192.0.2.1"),
        info(FOUR, "192.0.2.2"),
        info(FOUR, "192.0.2.3"),
        info(SIX, "2001:db8::1"),
        info(SIX, "2001:db8::2"),
    ]
    assert addresses(interleave(given)) == [
        "2001:db8::1",
        "192.0.2.1",
        "2001:db8::2",
        "192.0.2.2",
        "192.0.2.3",
    ]


def test_interleave_keeps_one_family_and_drops_duplicates() -> None:
    given = [info(FOUR, "192.0.2.1"), info(FOUR, "192.0.2.1"), info(FOUR, "192.0.2.9")]
    assert addresses(interleave(given)) == ["192.0.2.1", "192.0.2.9"]
    assert interleave([]) == []


class Attempts:
    """Fake connection attempts: "hang" never connects, "fail" is refused at once,
    anything else connects and returns its name."""

    def __init__(self, plan: list[str]) -> None:
        self.plan = plan
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.discarded: list[str] = []

    def attempt(self, name: str, outcome: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self.started.append(name)
            if outcome == "fail":
                raise ConnectionRefusedError(111, f"{name} refused")
            if outcome == "hang":
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled.append(name)
                    raise
            return name

        return run

    async def race(self) -> str:
        attempts = [self.attempt(f"a{i}", outcome) for i, outcome in enumerate(self.plan)]
        return await race(attempts, self.discarded.append, delay=0.05)


async def test_a_black_holed_first_address_loses_to_the_next_and_is_cancelled() -> None:
    fakes = Attempts(["hang", "ok", "ok"])
    assert await fakes.race() == "a1"
    assert fakes.started == ["a0", "a1"]  # the third was never needed
    assert fakes.cancelled == ["a0"]
    assert fakes.discarded == []


async def test_a_refused_address_starts_the_next_at_once_and_the_last_error_is_raised() -> None:
    fakes = Attempts(["fail", "ok"])
    assert await fakes.race() == "a1"
    fakes = Attempts(["fail", "fail"])
    with pytest.raises(ConnectionRefusedError, match="a1 refused"):
        await fakes.race()
    assert fakes.started == ["a0", "a1"]


async def test_an_attempt_that_connects_late_is_discarded() -> None:
    gate = asyncio.Event()
    discarded: list[str] = []

    async def first() -> str:
        await asyncio.Event().wait()
        return "never"

    async def slow() -> str:
        try:
            await gate.wait()
        except asyncio.CancelledError:
            # Connected just as it was cancelled: the result comes back all the same.
            return "late"
        return "late"

    async def winner() -> str:
        await asyncio.sleep(0)
        return "won"

    result = await race([first, slow, winner], discarded.append, delay=0.01)
    assert result == "won"
    assert discarded == ["late"]
