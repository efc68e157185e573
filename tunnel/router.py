"""Chooses the upstream of each request: the ``--allow``/``--deny`` rules first (a denied
request goes to :class:`~tunnel.upstreams.Reject`), then the routes (``--route``, first
match wins: ``direct``, ``reject``, or SSH destinations tried in order), and otherwise
the default upstream (the command line's destination)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .channels import Channel, ChannelSink
from .errors import ChannelOpenFailed, ReplyReason
from .rules import Route, Rules
from .upstreams import Reject, Request, Upstream


class Standby(Upstream, Protocol):
    """An upstream that can be down (an SSH destination): the router asks its state so
    that a destination known to be down costs a request no wait while another is up."""

    @property
    def is_up(self) -> bool: ...

    @property
    def is_down(self) -> bool:
        """Known down: its last attempt failed and it is retrying in the background."""
        ...

    async def settle(self) -> bool:
        """Start it if it was never started; wait (bounded) until it is up (True) or known
        down (False)."""
        ...

    async def wait_up(self, within: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class Choice:
    """Where a request goes: one upstream, or SSH destinations in failover order."""

    label: str
    upstream: Upstream | None = None
    standbys: tuple[Standby, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteWay:
    """A route with its target made concrete by the composition root."""

    route: Route
    choice: Choice


class Router:
    """An :class:`Upstream` itself: ``open`` routes, then opens through the choice."""

    def __init__(
        self,
        rules: Rules,
        default: Upstream,
        routes: Sequence[RouteWay] = (),
        *,
        reconnect_wait: float = 10.0,
    ) -> None:
        self.rules = rules
        self.default = default
        self.routes = tuple(routes)
        self.reconnect_wait = reconnect_wait
        self.name = default.name

    def choose(self, request: Request) -> Choice:
        rule = self.rules.denies(request.host, request.port)
        if rule is not None:
            return Choice("reject", Reject(f"denied by {rule}"))
        for way in self.routes:
            if way.route.rule.matches(request.host, request.port):
                return way.choice
        return Choice(self.default.name, self.default)

    def route(self, request: Request) -> Upstream:
        choice = self.choose(request)
        if choice.upstream is not None:
            return choice.upstream
        return choice.standbys[0]

    def check(self, request: Request) -> None:
        """Raise what a refused request gets, for commands that open no channel through
        an upstream (BIND listens on the command line's destination). What a route
        sends elsewhere is refused too: BIND has no other way out."""
        choice = self.choose(request)
        if isinstance(choice.upstream, Reject):
            raise choice.upstream.failure()
        if choice.upstream is not self.default:
            raise ChannelOpenFailed(
                ReplyReason.CONNECTION_NOT_ALLOWED,
                f"routed to {choice.label}, but only the command line's destination "
                "offers this command",
            )

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        channel, _ = await self.open_labelled(request, sink)
        return channel

    async def open_labelled(self, request: Request, sink: ChannelSink) -> tuple[Channel, str]:
        """The channel and the label of the upstream it went through. A failure raises
        :class:`ChannelOpenFailed` whose ``upstream`` names the choice."""
        choice = self.choose(request)
        if choice.upstream is not None:
            try:
                return await choice.upstream.open(request, sink), choice.upstream.name
            except ChannelOpenFailed as exc:
                exc.upstream = choice.label
                raise
        standby = await self._pick(choice)
        try:
            return await standby.open(request, sink), standby.name
        except ChannelOpenFailed as exc:
            exc.upstream = standby.name
            raise

    async def _pick(self, choice: Choice) -> Standby:
        """In list order: the first destination that is up, or that is not known to be
        down (never tried yet, or connecting: started if need be and waited for,
        bounded). One known down costs no wait: its supervisor retries it in the
        background, and requests go back to it once it is up. When all are known down,
        whichever comes back first within ``reconnect_wait``; never anything outside the
        list: then the request fails (0x01)."""
        for standby in choice.standbys:
            if standby.is_up:
                return standby
            if not standby.is_down and await standby.settle():
                return standby
        back = await _first_up(choice.standbys, self.reconnect_wait)
        if back is not None:
            return back
        failure = ChannelOpenFailed(
            ReplyReason.GENERAL_FAILURE,
            f"{'every SSH destination of' if len(choice.standbys) > 1 else 'the SSH session'} "
            f"{choice.label} is down (waited {self.reconnect_wait:g} s)",
        )
        failure.upstream = choice.label
        raise failure


async def _first_up(standbys: Sequence[Standby], within: float) -> Standby | None:
    """The first of these to be up within ``within`` seconds, in list order when several are."""
    if within <= 0:
        return None
    waits = {asyncio.ensure_future(s.wait_up(within)): s for s in standbys}
    try:
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(task.result() for task in done):
                break
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    for standby in standbys:
        if standby.is_up:
            return standby
    return None
