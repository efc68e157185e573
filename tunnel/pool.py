"""``--connections N``: several SSH sessions to the same server, least loaded first."""

from __future__ import annotations

import asyncio
import logging

from . import events
from .channels import Channel, ChannelSink
from .errors import SessionError
from .session import Session

log = logging.getLogger(__name__)


class SessionPool:
    """``--connections N``: channels spread over up to N SSH connections to the same
    server, so that one slow flow or one busy core does not hold up the others.

    The first session is the one the supervisor keeps up (it decides readiness and what
    is fatal). The others are opened only when every live one already carries a channel,
    and a lost one is simply dropped: the next busy moment opens a new one.
    """

    def __init__(self, primary: Session, size: int) -> None:
        self.primary = primary
        self.size = size
        self.extras: list[Session] = []
        self._growing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def pick(self) -> Session:
        live = [s for s in (self.primary, *self.extras) if s.is_up]
        if not live:
            return self.primary  # it waits for the reconnect, within its bound
        return min(live, key=lambda s: s.channels)

    async def open_tcp(
        self, host: str, port: int, origin: tuple[str, int], sink: ChannelSink
    ) -> Channel:
        session = self.pick()
        if (
            session.is_up
            and session.channels
            and 1 + len(self.extras) < self.size
            and self._growing is None
        ):
            # Every live connection is busy: open one more for the next ones (owned by
            # the pool, cancelled and awaited by close()).
            self._growing = asyncio.get_running_loop().create_task(self._grow())
        return await session.open_tcp(host, port, origin, sink)

    async def _grow(self) -> None:
        # The extra connections report nothing of their own: the status view follows
        # the primary, and a failure here only means fewer connections for a while.
        extra = Session(self.primary.config, events.discard, None)
        try:
            await extra.connect()
        except SessionError as exc:
            log.info("extra connection failed: %s", exc)
            return
        finally:
            self._growing = None
        self.extras.append(extra)
        task = asyncio.get_running_loop().create_task(self._forget_when_lost(extra))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forget_when_lost(self, extra: Session) -> None:
        error = await extra.wait_lost()
        log.info("extra connection lost: %s", error)
        if extra in self.extras:
            self.extras.remove(extra)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._growing] if self._growing else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for extra in self.extras:
            await extra.close()
        self.extras.clear()
