"""Tasks and their owners: who cancels a task and waits for it to end, and a guard for a
cancellation that Python 3.11 can lose.

Every task pytunnel starts belongs to an :class:`Owner` (or to an object that cancels
and awaits it in its own ``close``), so none outlives what it works for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Owner:
    """Owns tasks: ``close`` cancels and awaits every one still running. A task whose
    failure nobody reads (``report``) has it logged; the others are awaited by whoever
    spawned them."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T], *, report: bool = True) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._reported if report else self.tasks.discard)
        return task

    def _reported(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a background task failed", exc_info=task.exception())

    async def close(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` if it still runs and wait until it has ended; what it raised is
    left in it, for whoever reads its result."""
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def raise_if_cancelling() -> None:
    """Raise CancelledError if the current task was asked to stop. A retry loop calls it
    between attempts: on Python 3.11, ``asyncio.wait_for`` (in asyncssh, or ours) returns
    the result or error of an operation that ended just as its task was cancelled, and the
    cancellation is lost; a loop that catches that error would retry for ever, and whoever
    cancelled it would wait for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
