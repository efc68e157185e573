"""What the operating system offers, with a fallback where it offers less.

POSIX-only modules (``termios``) are imported here, when first needed, never at import
time of a room that every platform loads: pytunnel must start on Windows, where they
are missing, and do without what they give (echo control, the live view's keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
from collections.abc import Callable, Iterable
from types import ModuleType, TracebackType
from typing import Any


def posix_module(name: str) -> ModuleType | None:
    """``importlib.import_module(name)``, or None where the platform lacks it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def on_signals(
    loop: asyncio.AbstractEventLoop,
    signals: Iterable[int],
    handler: Callable[[int], None],
) -> Callable[[], None]:
    """Call ``handler(signum)`` on the event loop when one of ``signals`` arrives, and
    return what undoes it. ``loop.add_signal_handler`` where the loop has it (POSIX);
    otherwise (Windows' loops raise NotImplementedError) ``signal.signal``, whose
    handler runs between bytecodes of the main thread and so hands the call over to the
    loop rather than running it there."""
    wanted = list(signals)
    try:
        for signum in wanted:
            loop.add_signal_handler(signum, handler, signum)
    except NotImplementedError:
        for signum in wanted:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
        return _fallback(loop, wanted, handler)

    def undo() -> None:
        for signum in wanted:
            loop.remove_signal_handler(signum)

    return undo


def _fallback(
    loop: asyncio.AbstractEventLoop, signals: list[int], handler: Callable[[int], None]
) -> Callable[[], None]:
    def deliver(signum: int, _frame: Any) -> None:
        # The loop may be closing as a second signal arrives; nothing is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(handler, signum)

    previous = {signum: signal.signal(signum, deliver) for signum in signals}

    def undo() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return undo


class RawKeys:
    """The terminal ``fd`` without echo and line editing, for as long as the context
    lasts: typed keys reach the reader one by one instead of being drawn into the live
    view. Signals stay on (Ctrl-C is still SIGINT). Where there is no ``termios``, ``fd``
    is not a terminal, or we are not its foreground job, it changes nothing and
    ``active`` is False."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.active = False
        self._saved: list[Any] | None = None

    def __enter__(self) -> RawKeys:
        termios = posix_module("termios")
        if termios is None:
            return self
        if not _in_foreground(self.fd):
            # A background job (``pytunnel ... &``): changing the terminal's modes, or
            # reading it, would stop us with SIGTTOU or SIGTTIN.
            return self
        try:
            saved = termios.tcgetattr(self.fd)
            raw = termios.tcgetattr(self.fd)
            raw[3] &= ~(termios.ECHO | termios.ICANON)
            raw[6][termios.VMIN] = 1
            raw[6][termios.VTIME] = 0
            termios.tcsetattr(self.fd, termios.TCSANOW, raw)
        except (OSError, termios.error):
            return self
        self._saved = saved
        self.active = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()

    def restore(self) -> None:
        """Give the terminal back as it was; safe to call more than once."""
        saved, self._saved = self._saved, None
        self.active = False
        termios = posix_module("termios")
        if saved is None or termios is None:
            return
        with contextlib.suppress(OSError, termios.error):
            # TCSANOW, not TCSADRAIN: the view's last frame must not hold it back.
            termios.tcsetattr(self.fd, termios.TCSANOW, saved)


def _in_foreground(fd: int) -> bool:
    """False when ``fd`` is our controlling terminal and another job has it. A terminal
    that is not our controlling one (ENOTTY here) has no job control over us."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return True
