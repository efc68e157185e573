"""``--isolate``: requests whose proxy user names differ never share an upstream (Tor's
IsolateSOCKSAuth). :class:`Isolated` keeps one upstream per user name, made on first
use by a factory, and closes one that has carried no connection for an idle time;
:class:`OnDemand` connects such an upstream when a request needs it, and again after it
was lost. This room knows the Upstream protocol only: the factory (in the composition
root) knows what an upstream is made of.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .channels import Channel, ChannelSink
from .errors import ChannelOpenFailed, ReplyReason
from .upstreams import Request, Upstream

log = logging.getLogger(__name__)

# Closes an upstream the factory made; the argument says why ("idle ...", "stopping").
Closer = Callable[[str], Awaitable[None]]
# Makes the upstream of one user name, and what closes it. Called on the event loop,
# never awaited: what needs a connection connects when the first request opens.
Factory = Callable[[str], tuple[Upstream, Closer]]


@dataclass(slots=True)
class _Entry:
    upstream: Upstream
    close: Closer
    active: int  # connections opening or open through it
    since: float  # when it last had none


class _Finish:
    """Calls ``done`` once, however often it is called: a connection ends when the far
    side closes, when the proxy closes the channel, or when its open fails, and the
    first of these counts."""

    __slots__ = ("_done",)

    def __init__(self, done: Callable[[], None]) -> None:
        self._done: Callable[[], None] | None = done

    def __call__(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done()


class _CountedSink:
    """The proxy's sink, seeing the far side's close. Every other call goes straight to
    the proxy's bound methods: the per-chunk path gains no call."""

    def __init__(self, sink: ChannelSink, finish: _Finish) -> None:
        self.remote_data = sink.remote_data
        self.remote_eof = sink.remote_eof
        self.remote_pause = sink.remote_pause
        self.remote_resume = sink.remote_resume
        self._closed = sink.remote_closed
        self._finish = finish

    def remote_closed(self, exc: BaseException | None) -> None:
        self._finish()
        self._closed(exc)


class _CountedChannel:
    """The channel, seeing the proxy's close; the rest is the channel's own methods."""

    def __init__(self, channel: Channel, finish: _Finish) -> None:
        self.write = channel.write
        self.write_eof = channel.write_eof
        self.pause_reading = channel.pause_reading
        self.resume_reading = channel.resume_reading
        self._close = channel.close
        self._finish = finish

    def close(self) -> None:
        self._finish()
        self._close()


class Isolated:
    """An :class:`Upstream` that opens each request through the upstream of its proxy
    user name (``Request.user``). Requests without a name go to ``default`` (the
    command line's session), which this never closes."""

    def __init__(
        self,
        make: Factory,
        default: Upstream,
        *,
        idle: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.make = make
        self.default = default
        self.name = default.name
        self.idle = idle
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # The idle sweep, running while there are entries, and the closes it started:
        # close() cancels the one and awaits both.
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._stopped = False

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    @property
    def keys(self) -> list[str]:
        """The user names with an upstream now."""
        return list(self._entries)

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        key = request.user
        if key is None:
            return await self.default.open(request, sink)
        if self._stopped:
            raise ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, "the tunnel is stopping")
        entry = self._entries.get(key)
        if entry is None:
            upstream, close = self.make(key)
            entry = self._entries[key] = _Entry(upstream, close, 0, self._now())
            self._sweep()
        # Counted from the start of the open, so the sweep never closes an upstream a
        # request is waiting on.
        entry.active += 1
        finish = _Finish(lambda: self._ended(entry))
        try:
            channel = await entry.upstream.open(request, _CountedSink(sink, finish))
        except BaseException:
            finish()
            raise
        return _CountedChannel(channel, finish)

    def _ended(self, entry: _Entry) -> None:
        entry.active -= 1
        if entry.active == 0:
            entry.since = self._now()

    def _sweep(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_while_any())

    async def _reap_while_any(self) -> None:
        while self._entries:
            now = self._now()
            # The next moment an entry may expire: no entry's expiry comes sooner, since
            # one that goes idle later expires later than ``idle`` from now.
            due = [e.since + self.idle - now for e in self._entries.values() if not e.active]
            await asyncio.sleep(max(0.0, min(due, default=self.idle)))
            self.reap()

    def reap(self) -> list[str]:
        """Close the upstreams that have carried no connection for ``idle`` seconds;
        return their keys. Each close runs as a task this object owns."""
        now = self._now()
        expired = [
            key
            for key, entry in self._entries.items()
            if not entry.active and now - entry.since >= self.idle
        ]
        for key in expired:
            self._close_entry(key, self._entries.pop(key), f"no connection for {self.idle:g} s")
        return expired

    def _close_entry(self, key: str, entry: _Entry, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._close_one(key, entry, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_one(key: str, entry: _Entry, reason: str) -> None:
        try:
            await entry.close(reason)
        except Exception:  # one upstream failing to close must not stop the others
            log.debug("closing the upstream of an isolated user failed", exc_info=True)

    async def close(self) -> None:
        """Close every upstream made (never the default) and await every task."""
        self._stopped = True
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
        entries, self._entries = self._entries, {}
        for key, entry in entries.items():
            self._close_entry(key, entry, "stopping")
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class OnDemand:
    """An upstream connected when a request needs it: the first request connects, and
    after a loss the next one connects again. Requests that come meanwhile wait for the
    same attempt; a failed attempt fails them all (``connect`` raises the
    :class:`ChannelOpenFailed` to answer with) and the next request tries afresh."""

    def __init__(
        self,
        upstream: Upstream,
        connect: Callable[[], Awaitable[None]],
        is_up: Callable[[], bool],
    ) -> None:
        self.upstream = upstream
        self.name = upstream.name
        self._connect = connect
        self._is_up = is_up
        self._connecting: asyncio.Task[None] | None = None

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        if not self._is_up():
            if self._connecting is None or self._connecting.done():
                loop = asyncio.get_running_loop()
                self._connecting = loop.create_task(self._connect_once())
                # Its failure is each waiter's to raise; with none left, it is seen here.
                self._connecting.add_done_callback(_retrieve)
            # Shielded: a client that gives up does not cancel the others' attempt.
            await asyncio.shield(self._connecting)
        return await self.upstream.open(request, sink)

    async def _connect_once(self) -> None:
        await self._connect()

    async def close(self) -> None:
        """Cancel and await an attempt in progress."""
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
