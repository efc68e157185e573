"""Questions asked off the event loop: passwords, passphrases, host keys, challenges.
The terminal is read in a thread so that signals and timers keep running meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from . import events

# As ssh: three password tries, then give up on the method.
PASSWORD_TRIES = 3


async def ask_in_thread(prompter: events.Prompter, prompt: str, echo: bool) -> str | None:
    """Ask without blocking the event loop: the read runs in a daemon thread, so signals
    (Ctrl-C) and timers keep working, and an abandoned question does not keep the
    process alive. The live view is paused from here, the loop's own thread."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str | None] = loop.create_future()

    def deliver(value: str | None) -> None:
        if not answer.done():
            answer.set_result(value)

    def read() -> None:
        value = prompter.ask(prompt, echo)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(deliver, value)

    prompter.pause()
    try:
        threading.Thread(target=read, name="pytunnel-prompt", daemon=True).start()
        return await answer
    except asyncio.CancelledError:
        prompter.interrupt()
        raise
    finally:
        prompter.resume()
