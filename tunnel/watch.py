"""Noticing that the network under the session may be gone: the machine slept (the wall
clock jumped ahead of the monotonic one, which stands still while suspended) or the local
addresses or the default route changed (Linux: a NETLINK_ROUTE socket). Either makes the
session be probed at once, instead of waiting out the keepalive (interval x count)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, Protocol

from . import events
from .tasks import raise_if_cancelling

log = logging.getLogger(__name__)

# The causes this room notices, as the session events name them.
SLEEP = events.CAUSE_SLEEP
NETWORK_CHANGE = events.CAUSE_NETWORK

# How often the clocks are compared, and by how much the wall clock must run ahead of the
# monotonic one to count as a sleep: more than NTP ever slews, less than a short nap.
CLOCK_INTERVAL = 5.0
CLOCK_MARGIN = 5.0
# A probe that gets no answer within this long means the session is gone.
PROBE_TIMEOUT = 5.0
# A network change comes as a burst of messages (addresses, routes, both families), and
# a new route needs a moment to carry traffic: wait this long, then probe once.
SETTLE = 1.0

# linux/rtnetlink.h
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG_DST_LEN = 1  # struct rtmsg: family, dst_len, ...
_RT_TABLE_MAIN = 254
_RTMSG_TABLE = 4


class Prober(Protocol):
    async def probe(self, within: float) -> bool: ...


class Reconnector(Protocol):
    def reconnect_now(self, cause: str) -> None: ...


class ClockJump:
    """Pure: fed (wall, monotonic) readings, says when the wall clock ran ahead of the
    monotonic one by more than ``margin`` since the last reading. A wall clock set back
    is not a sleep (and is not reported)."""

    def __init__(self, wall: float, mono: float, margin: float = CLOCK_MARGIN) -> None:
        self.margin = margin
        self._offset = wall - mono

    def check(self, wall: float, mono: float) -> float | None:
        offset = wall - mono
        jump = offset - self._offset
        self._offset = offset
        return jump if jump > self.margin else None


def route_changes(data: bytes) -> int:
    """Pure: how many messages in one netlink datagram tell of a changed local address
    or default route. Anything malformed ends the count; nothing raises."""
    count = 0
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body = data[offset + _NLMSGHDR.size : offset + length]
        if kind in (RTM_NEWADDR, RTM_DELADDR) or (
            kind in (RTM_NEWROUTE, RTM_DELROUTE)
            and len(body) > _RTMSG_TABLE
            # Only the default route: prefix and local routes follow address changes,
            # which are counted already.
            and body[_RTMSG_DST_LEN] == 0
            and body[_RTMSG_TABLE] == _RT_TABLE_MAIN
        ):
            count += 1
        # Messages are aligned to 4 bytes.
        offset += (length + 3) & ~3
    return count


class Wake:
    """Turns noticed causes into probes: one probe per burst, and a reconnect at once
    when the session does not answer."""

    def __init__(
        self,
        prober: Prober,
        keeper: Reconnector,
        emit: events.Sink,
        server: str,
        *,
        probe_timeout: float = PROBE_TIMEOUT,
        settle: float = SETTLE,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.prober = prober
        # A session not in use (a route's destination nobody asked for yet) is not probed.
        self.active = active
        self.keeper = keeper
        self.emit = emit
        self.server = server
        self.probe_timeout = probe_timeout
        self.settle = settle
        self._cause: str | None = None
        self._noticed = asyncio.Event()

    def notice(self, cause: str) -> None:
        # A sleep says more than a network change (which follows it on resume).
        if self._cause != SLEEP:
            self._cause = cause
        self._noticed.set()

    async def run(self) -> NoReturn:
        while True:
            await self._noticed.wait()
            await asyncio.sleep(self.settle)
            cause, self._cause = self._cause, None
            self._noticed.clear()
            assert cause is not None
            if not self.active():
                continue
            answered = await self.prober.probe(self.probe_timeout)
            raise_if_cancelling()
            self.emit(events.SessionProbed(self.server, cause, answered))
            if not answered:
                self.keeper.reconnect_now(cause)


class Notice(Protocol):
    def notice(self, cause: str) -> None: ...


class Every:
    """Tells every wake what was noticed: each session is probed on its own."""

    def __init__(self, wakes: Sequence[Wake]) -> None:
        self.wakes = wakes

    def notice(self, cause: str) -> None:
        for wake in self.wakes:
            wake.notice(cause)


async def watch_clock(
    wake: Notice,
    *,
    interval: float = CLOCK_INTERVAL,
    margin: float = CLOCK_MARGIN,
    wall: Callable[[], float] = time.time,
    mono: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> NoReturn:
    jumps = ClockJump(wall(), mono(), margin)
    while True:
        await sleep(interval)
        jump = jumps.check(wall(), mono())
        if jump is not None:
            log.info("the wall clock jumped %.1f s ahead: probing the session", jump)
            wake.notice(SLEEP)


def open_netlink() -> socket.socket | None:
    """A NETLINK_ROUTE socket subscribed to address and route changes; None where
    there is none (not Linux, or not allowed)."""
    if not sys.platform.startswith("linux"):
        return None
    groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except OSError as exc:
        log.info("no netlink socket (%s): watching the clock only", exc)
        return None
    try:
        sock.setblocking(False)
        sock.bind((0, groups))
    except OSError as exc:
        sock.close()
        log.info("cannot subscribe to netlink (%s): watching the clock only", exc)
        return None
    return sock


async def watch_netlink(wake: Notice, sock: socket.socket) -> NoReturn:
    """Read ``sock`` (from :func:`open_netlink`) with the event loop until cancelled;
    closes it then."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(sock.fileno(), readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            changes = 0
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError as exc:
                    # ENOBUFS: messages were lost in a burst; that is a change too.
                    log.info("netlink: %s", exc)
                    changes += 1
                    continue
                changes += route_changes(data)
            if changes:
                log.info("%d local address or route change(s): probing the session", changes)
                wake.notice(NETWORK_CHANGE)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


async def watch(*wakes: Wake) -> NoReturn:
    """Run the wakes (one per session), the clock check and (on Linux) the netlink
    watcher until cancelled."""
    sock = open_netlink()
    every = Every(wakes)
    async with asyncio.TaskGroup() as group:
        for wake in wakes:
            group.create_task(wake.run())
        group.create_task(watch_clock(every))
        if sock is not None:
            group.create_task(watch_netlink(every, sock))
    raise AssertionError("the watchers never end")  # pragma: no cover
