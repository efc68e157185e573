"""Chooses the upstream of each request. Today that is the ``--allow``/``--deny`` rules
(a denied request goes to :class:`~tunnel.upstreams.Reject`) and otherwise the default
upstream of the listener the request came in on."""

from __future__ import annotations

from .channels import Channel, ChannelSink
from .rules import Rules
from .upstreams import Reject, Request, Upstream


class Router:
    """An :class:`Upstream` itself: ``open`` routes, then opens through the choice."""

    def __init__(self, rules: Rules, default: Upstream) -> None:
        self.rules = rules
        self.default = default
        self.name = default.name

    def route(self, request: Request) -> Upstream:
        rule = self.rules.denies(request.host, request.port)
        if rule is not None:
            return Reject(f"denied by {rule}")
        return self.default

    def check(self, request: Request) -> None:
        """Raise what a refused request gets, for commands that open no channel through
        an upstream (BIND listens on the server instead)."""
        upstream = self.route(request)
        if isinstance(upstream, Reject):
            raise upstream.failure()

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        return await self.route(request).open(request, sink)
