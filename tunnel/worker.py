"""A worker process of ``--workers`` (``python -m tunnel.worker``, started by pytunnel's
first process, never by hand): reads its :class:`~tunnel.workers.Setup` from stdin,
serves the listening sockets it was given with an SSH session of its own, and writes
its events to stdout. stdin stays open: its end (the first process is gone) stops the
worker as SIGTERM does. Like ``cli``, a process entry point: the only other room that
exits."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import sys

from . import app
from .errors import TunnelError
from .retry import is_retryable
from .workers import Forwarder, Setup


def _read_setup() -> Setup:
    head = _read_exactly(0, 4)
    setup = pickle.loads(_read_exactly(0, int.from_bytes(head, "big")))
    if not isinstance(setup, Setup):
        raise SystemExit("pytunnel worker: not started by pytunnel")
    return setup


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise SystemExit("pytunnel worker: not started by pytunnel")
        data += chunk
    return data


async def _serve(setup: Setup, forward: Forwarder) -> int:
    loop = asyncio.get_running_loop()

    def control() -> None:
        # Nothing is ever written here: readable means the first process closed it.
        try:
            data = os.read(0, 64)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            signal.raise_signal(signal.SIGTERM)

    loop.add_reader(0, control)
    sockets = [socket.socket(fileno=fd) for fd in setup.descriptors]
    try:
        side = app.WorkerSide(setup.number, sockets, setup.given, forward)
        return await app.serve(setup.config, forward, worker=side)
    finally:
        forward.close()


def main() -> None:
    setup = _read_setup()
    root = logging.getLogger()
    if setup.log_level < logging.WARNING:
        # -v: the first process's stderr, each line saying whose it is.
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"pytunnel[worker {setup.number}]: %(message)s"))
    else:
        # Nothing of a worker goes to the terminal the live view draws on: what the user
        # needs to know travels as events.
        handler = logging.NullHandler()
    root.handlers[:] = [handler]
    logging.getLogger("tunnel").setLevel(setup.log_level)
    logging.getLogger("asyncssh").setLevel(logging.ERROR)
    forward = Forwarder()
    try:
        status = app.run_loop(_serve(setup, forward))
    except TunnelError as exc:
        forward.failed(str(exc), is_retryable(exc))
        status = exc.exit_status
    except KeyboardInterrupt:
        status = 130
    except Exception as exc:  # a bug: said once, as an event; the traceback only with -v
        logging.getLogger("tunnel").debug("worker failed", exc_info=True)
        forward.failed(f"internal error: {exc!r}", True)
        status = 1
    sys.exit(status)


if __name__ == "__main__":
    main()
