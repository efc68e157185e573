"""``--workers N``: more processes accepting on the same ``-D`` sockets.

pytunnel's own process binds the ports, logs in, announces ``ready`` and runs
everything it runs without workers. Once it is ready it starts N-1 worker processes
(``python -m tunnel.worker``). Each gets the listening sockets (passed as descriptors),
logs in on its own, accepts from the shared sockets while its session is up, and sends
its events back over a pipe. Here they are turned into this process's events: the
connection ids renumbered from the tunnel's one counter, live byte counts mirrored, the
worker's session reported as a :class:`~tunnel.events.WorkerState`, so the live view,
``--json`` and the counters show one tunnel.

The wire between the two is frames of ``4-byte length + pickle``, on a pipe private to
the two processes. What the first process reads from a worker is unpickled with only
the event classes allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import pickle
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import events
from .config import Config
from .retry import backoff
from .tasks import Owner

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
# A frame bigger than this from a worker is a broken worker, not a busy one.
MAX_FRAME = 64 * 1024 * 1024

# How often a worker sends the byte counts of its open connections.
COUNTS_EVERY = 0.5

# A worker that ran this long before it ended starts again after the first delay.
_STEADY = 60.0

# How long a worker gets to exit after SIGTERM, on top of --drain, before it is killed.
_GRACE = 5.0


def frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class _EventsOnly(pickle.Unpickler):
    """Builds the event classes and nothing else (no callable of any other module)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == events.__name__ and isinstance(getattr(events, name, None), type):
            return getattr(events, name)
        raise pickle.UnpicklingError(f"a worker sent {module}.{name}, which is not an event")


def load_from_worker(data: bytes) -> object:
    return _EventsOnly(io.BytesIO(data)).load()


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload; None at the end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ValueError("a worker's stream ended inside a frame") from exc
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"a worker sent a frame of {size} bytes")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise ValueError("a worker's stream ended inside a frame") from exc


def share_limit(limit: int, processes: int) -> list[int]:
    """--max-connections shared among the processes, first process first: equal shares
    that add up to the limit, the remainder to the first process."""
    if processes < 1 or limit < processes:
        raise ValueError("every process needs room for one connection")
    each = limit // processes
    return [limit - each * (processes - 1)] + [each] * (processes - 1)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a worker is started with (sent on its stdin, never in argv or the
    environment: it holds --proxy-auth's password)."""

    number: int
    # The settings the first process resolved (ssh_config applied, the demo server
    # filled in), and the command line's as given (route destinations apply their own
    # ssh_config blocks to it).
    config: Config
    given: Config
    descriptors: tuple[int, ...]
    log_level: int


def worker_config(config: Config, share: int) -> Config:
    """A worker's own settings: no ports of its own to bind, no -R (the first process
    has it), its share of the connection limit, and it keeps retrying its login (a
    worker failing for good is reported, not fatal); giving up belongs to the first
    process."""
    return dataclasses.replace(
        config,
        forwards=(),
        reverse_forwards=(),
        workers=1,
        max_connections=share,
        retry_start=True,
        give_up_after=None,
        demo=False,
    )


class Mirror:
    """One worker's events as the first process's: each of its connections gets an id
    from the tunnel's counter and one :class:`~tunnel.events.ConnectionInfo` here that
    its byte counts are copied into; its session's events become ``WorkerState``."""

    def __init__(self, number: int, pid: int, ids: Iterator[int], emit: events.Sink) -> None:
        self.number = number
        self.pid = pid
        self._ids = ids
        self._emit = emit
        self.infos: dict[int, events.ConnectionInfo] = {}
        self.up = False

    def _info(self, theirs: events.ConnectionInfo) -> events.ConnectionInfo:
        mine = self.infos.get(theirs.id)
        if mine is None:
            mine = self.infos[theirs.id] = events.ConnectionInfo(
                id=next(self._ids), client=theirs.client, started=theirs.started
            )
        for field in _COPIED:
            setattr(mine, field, getattr(theirs, field))
        mine.worker = self.number
        return mine

    def event(self, event: events.Event) -> None:
        theirs = getattr(event, "connection", None)
        if isinstance(theirs, events.ConnectionInfo):
            mine = self._info(theirs)
            self._emit(dataclasses.replace(event, connection=mine))  # type: ignore[arg-type]
            return
        match event:
            case events.Ready(server=server):
                self.up = True
                self._state("up", server)
            case events.SessionLost(upstream="", reason=reason):
                self.up = False
                self._state("lost", f"{reason}; it stops accepting until it is back")
            case events.SessionUp(upstream="", outage=outage, server=server) if outage is not None:
                self.up = True
                self._state("up", server)
            case events.Notice(message=message, key=key):
                self._emit(events.Notice(f"worker {self.number}: {message}", key=key))
            case events.IsolatedSession():
                self._emit(event)
            # Its listeners are ours, its session's other steps and its route
            # destinations are its own business, its status line and its stopping are
            # covered by ours.

    def counts(self, changed: Sequence[tuple[int, int, int, int]], gone: Sequence[int]) -> None:
        for number, up, down, dropped in changed:
            mine = self.infos.get(number)
            if mine is not None:
                mine.bytes_up, mine.bytes_down, mine.dropped = up, down, dropped
        for number in gone:
            self.infos.pop(number, None)

    def ended(self, now: float) -> None:
        """The process is gone, and its connections with it: the open ones are closed
        with the counts last heard, so nothing is shown open that is not."""
        infos, self.infos = self.infos, {}
        for info in infos.values():
            if info.open:
                info.open = False
                duration = now - info.started
                self._emit(events.ConnectionClosed(info, info.bytes_up, info.bytes_down, duration))

    def _state(self, state: str, reason: str = "") -> None:
        self._emit(events.WorkerState(self.number, self.pid, state, reason))


# What a worker's connection facts carry over (its id is its own; ``worker`` is set here).
_COPIED = tuple(
    f.name for f in dataclasses.fields(events.ConnectionInfo) if f.name not in ("id", "worker")
)


@dataclasses.dataclass
class _Outcome:
    reason: str
    final: bool = False


class Workers:
    """The worker processes of the first process: started once it is ready, each
    started again after a delay when it ends (unless it failed for a reason a restart
    cannot fix), signalled and stopped with the tunnel."""

    def __init__(
        self,
        count: int,
        config: Config,
        given: Config,
        sockets: Sequence[socket.socket],
        emit: events.Sink,
        ids: Iterator[int],
        *,
        owner: Owner,
        command: Sequence[str] = (sys.executable, "-m", "tunnel.worker"),
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.count = count
        self._shares = share_limit(config.max_connections, count + 1)
        self._config = config
        self._given = given
        self._sockets = list(sockets)
        self._emit = emit
        self._ids = ids
        self._owner = owner
        self._command = tuple(command)
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._drain = config.drain
        self._clock = clock

    def start(self) -> None:
        for number in range(1, self.count + 1):
            self._owner.spawn(self._keep(number))

    async def _keep(self, number: int) -> None:
        loop = asyncio.get_running_loop()
        clock = self._clock or loop.time
        delays = backoff(first=1.0, cap=30.0, random=random.random)
        next(delays)  # a worker that ended waits at least the first delay
        while not self._stopping:
            began = clock()
            pid, outcome = await self._run_once(number)
            if self._stopping:
                return
            if outcome.final:
                self._emit(
                    events.WorkerState(
                        number, pid, "failed", f"{outcome.reason}; it is not started again"
                    )
                )
                return
            if clock() - began >= _STEADY:
                delays = backoff(first=1.0, cap=30.0, random=random.random)
                next(delays)
            delay = next(delays)
            self._emit(
                events.WorkerState(
                    number, pid, "exited", f"{outcome.reason}; starting again in {delay:.1f} s"
                )
            )
            await asyncio.sleep(delay)

    async def _run_once(self, number: int) -> tuple[int, _Outcome]:
        share = self._shares[number]
        setup = Setup(
            number,
            worker_config(self._config, share),
            worker_config(self._given, share),
            tuple(sock.fileno() for sock in self._sockets),
            logging.getLogger("tunnel").getEffectiveLevel(),
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                pass_fds=setup.descriptors,
                # Its own session: Ctrl-C at the terminal reaches the first process, which
                # stops the workers in order.
                start_new_session=True,
            )
        except OSError as exc:
            return 0, _Outcome(f"could not start: {exc.strerror or exc}")
        self._procs[number] = proc
        assert proc.stdin is not None
        assert proc.stdout is not None
        mirror = Mirror(number, proc.pid, self._ids, self._emit)
        outcome = _Outcome("")
        try:
            proc.stdin.write(frame(setup))
            await proc.stdin.drain()
            while (data := await read_frame(proc.stdout)) is not None:
                message = load_from_worker(data)
                outcome = self._handle(mirror, message) or outcome
        except (OSError, ValueError, pickle.UnpicklingError) as exc:
            log.debug("worker %d: %s", number, exc)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        finally:
            returncode = await proc.wait()
            self._procs.pop(number, None)
            # The clock ConnectionInfo.started is on, the same in every process.
            mirror.ended(time.monotonic())
        if not outcome.reason:
            outcome.reason = _exit_text(returncode)
        return proc.pid, outcome

    def _handle(self, mirror: Mirror, message: object) -> _Outcome | None:
        match message:
            case ("events", list() as batch):
                for event in batch:
                    mirror.event(event)
            case ("counts", list() as changed, list() as gone):
                mirror.counts(changed, gone)
            case ("failed", str() as reason, bool() as retryable):
                return _Outcome(reason, final=not retryable)
            case _:
                raise ValueError(f"a worker sent an unknown message: {type(message).__name__}")
        return None

    def signal(self, signum: int) -> None:
        """Pass a signal on (SIGHUP: each worker reconnects as this process does)."""
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def stop(self) -> None:
        """Ask every worker to stop (each drains as --drain says); none is started again."""
        self._stopping = True
        self.signal(signal.SIGTERM)

    async def close(self) -> None:
        """Stop the workers and wait for them, killing what outlives --drain by the grace."""
        self.stop()
        procs = list(self._procs.values())
        waits = [asyncio.ensure_future(proc.wait()) for proc in procs]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self._drain + _GRACE)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


class Forwarder:
    """A worker's sink: its events gathered and written to the first process once per
    pass of the event loop, and every :data:`COUNTS_EVERY` seconds the byte counts of
    its open connections that changed, and the ids of the ones that are gone."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._batch: list[events.Event] = []
        self._seen: dict[int, tuple[int, int, int]] = {}
        self._live: Callable[[], Sequence[events.ConnectionInfo]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.broken = False

    def __call__(self, event: events.Event) -> None:
        if not self._batch:
            asyncio.get_running_loop().call_soon(self.flush)
        self._batch.append(event)
        if isinstance(event, events.ClientAccepted):
            self._seen[event.connection.id] = (0, 0, 0)

    def watch(self, live: Callable[[], Sequence[events.ConnectionInfo]]) -> None:
        """Start sending counts: ``live`` gives the connections open now."""
        self._live = live
        self._timer = asyncio.get_running_loop().call_later(COUNTS_EVERY, self._tick)

    def _tick(self) -> None:
        self.flush()
        assert self._live is not None
        changed: list[tuple[int, int, int, int]] = []
        now_open: set[int] = set()
        for info in self._live():
            now_open.add(info.id)
            counts = (info.bytes_up, info.bytes_down, info.dropped)
            if self._seen.get(info.id) != counts:
                self._seen[info.id] = counts
                changed.append((info.id, *counts))
        gone = [number for number in self._seen if number not in now_open]
        for number in gone:
            del self._seen[number]
        if changed or gone:
            self._write(("counts", changed, gone))
        self._timer = asyncio.get_running_loop().call_later(COUNTS_EVERY, self._tick)

    def flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self._write(("events", batch))

    def failed(self, reason: str, retryable: bool) -> None:
        self._write(("failed", reason, retryable))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    def _write(self, message: object) -> None:
        if self.broken:
            return
        data = memoryview(frame(message))
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            # The first process is gone; the stdin watch stops this one.
            self.broken = True
