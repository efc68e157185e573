"""How long after the SSH server comes back is a client served again?

Three subjects run side by side through one private sshd, each on its own fixed loopback
SOCKS port: pytunnel, autossh + ``ssh -D`` (``AUTOSSH_GATETIME=0``, ``-M 0``,
``ServerAliveInterval``), and ``ssh -D`` restarted by a shell loop (``sleep 1`` between
runs). For each outage length, sshd is stopped with its sessions (the listener and every
per-connection process), left down for the outage, and started again on the same port.
From the start of the outage a client starts a SOCKS5 CONNECT + echo round trip through
each subject every 100 ms (each attempt waits up to 30 s); the figure is the time from
sshd's restart to the end of the first round trip that worked.

sshd's restart is the moment the benchmark launches it; sshd's own start-up (until it
accepts) is in every figure alike. Loopback only. A tool, not a
test: nothing asserts a time.

    .venv/bin/python bench/recovery.py                    # outages 2, 10, 60 s; 2 rounds
    .venv/bin/python bench/recovery.py --outages 2 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import subjects
from run import targets_process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fixtures.keys import make_keys  # noqa: E402
from fixtures.sshd import SshdServer, sshd_available  # noqa: E402

INTERVAL = 0.1  # a new client attempt this often
ATTEMPT_TIMEOUT = 30.0
GIVE_UP = 180.0  # after the restart, a subject that serves nobody by then is "never"
ALIVE = 5  # ServerAliveInterval for the ssh subjects (pytunnel keeps its default)


@dataclasses.dataclass
class Subject:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int


def ssh_args(sshd: SshdServer) -> list[str]:
    return [
        "-F", "/dev/null", "-i", sshd.client_key, "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", f"ServerAliveInterval={ALIVE}",
        "-o", "ServerAliveCountMax=3", "-o", "ExitOnForwardFailure=yes",
        "-p", str(sshd.port), f"{getpass.getuser()}@{sshd.host}",
    ]  # fmt: skip


def make_subjects(sshd: SshdServer, only: list[str]) -> list[Subject]:
    made: list[Subject] = []
    for name in only:
        port = subjects.free_port()
        if name == "pytunnel":
            argv = [
                subjects.PYTUNNEL, "-D", f"127.0.0.1:{port}", "--json", "-F", "none",
                "-i", sshd.client_key, "-o", f"UserKnownHostsFile={sshd.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-p", str(sshd.port),
                f"{getpass.getuser()}@{sshd.host}",
            ]  # fmt: skip
            made.append(Subject(name, argv, {}, port))
        elif name == "autossh":
            argv = ["autossh", "-M", "0", "-N", "-D", f"127.0.0.1:{port}", *ssh_args(sshd)]
            made.append(Subject(name, argv, {"AUTOSSH_GATETIME": "0"}, port))
        elif name == "ssh-loop":
            line = " ".join(["ssh", "-N", "-D", f"127.0.0.1:{port}", *ssh_args(sshd)])
            argv = ["sh", "-c", f"while :; do {line}; sleep 1; done"]
            made.append(Subject(name, argv, {}, port))
        else:
            raise SystemExit(f"unknown subject {name!r} (pytunnel, autossh, ssh-loop)")
    return made


async def round_trip(port: int, echo_port: int) -> None:
    """SOCKS5 CONNECT to the echo target, one ping and its echo."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\x05\x01\x00")
        if await reader.readexactly(2) != b"\x05\x00":
            raise ConnectionError("no SOCKS5")
        writer.write(b"\x05\x01\x00\x01" + bytes([127, 0, 0, 1]) + struct.pack("!H", echo_port))
        reply = await reader.readexactly(10)
        if reply[1] != 0:
            raise ConnectionError(f"reply {reply[1]}")
        writer.write(b"ping")
        if await reader.readexactly(4) != b"ping":
            raise ConnectionError("bad echo")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def first_served(port: int, echo_port: int, stop: asyncio.Event) -> float:
    """A new attempt every INTERVAL; the monotonic time the first one succeeded."""
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    tasks: set[asyncio.Task[None]] = set()

    async def attempt() -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            await asyncio.wait_for(round_trip(port, echo_port), ATTEMPT_TIMEOUT)
            if not done.done():
                done.set_result(time.monotonic())

    try:
        while not done.done() and not stop.is_set():
            task = asyncio.ensure_future(attempt())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), INTERVAL)
        return done.result() if done.done() else float("inf")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def one_outage(
    sshd: SshdServer, made: list[Subject], echo_port: int, outage: float
) -> tuple[dict[str, float], float]:
    """Stop sshd, probe every subject from then on, restart after ``outage``; seconds
    from the restart to each subject's first served request, and sshd's start-up."""
    stop = asyncio.Event()
    sshd.stop(kill_sessions=True)
    probes = {s.name: asyncio.ensure_future(first_served(s.port, echo_port, stop)) for s in made}
    await asyncio.sleep(outage)
    restart = time.monotonic()
    await asyncio.to_thread(sshd.start)
    startup = time.monotonic() - restart
    try:
        await asyncio.wait(probes.values(), timeout=GIVE_UP)
    finally:
        stop.set()
    results = {}
    for name, probe in probes.items():
        served = await probe
        results[name] = served - restart
    return results, startup


@contextlib.contextmanager
def running(made: list[Subject], workdir: Path, echo_port: int) -> Iterator[None]:
    procs = []
    try:
        for subject in made:
            proc, _ = subjects.spawn(subject.argv, workdir, subject.name, env=subject.env)
            procs.append(proc)
            deadline = time.monotonic() + subjects.READY_TIMEOUT
            while True:
                try:
                    asyncio.run(round_trip(subject.port, echo_port))
                    break
                except (OSError, asyncio.IncompleteReadError) as exc:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit(f"{subject.name} never served: {exc}") from exc
                    time.sleep(0.1)
        yield
    finally:
        for proc in procs:
            # The shell loop's ssh is its child: its process group goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            subjects.stop_process(proc)


def seconds(value: float) -> str:
    return "never" if value == float("inf") else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outages", default="2,10,60", help="outage lengths, seconds")
    parser.add_argument("--rounds", type=int, default=2, help="outages of each length")
    parser.add_argument("--only", default="pytunnel,autossh,ssh-loop", help="subjects")
    args = parser.parse_args()
    if not sshd_available():
        raise SystemExit("needs /usr/sbin/sshd")
    only = args.only.split(",")
    if "autossh" in only and shutil.which("autossh") is None:
        raise SystemExit("needs autossh (apt-get install autossh), or --only without it")
    outages = [float(x) for x in args.outages.split(",")]
    load = subjects.machine_load()
    results: dict[tuple[float, str], list[float]] = {}
    startups: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pytunnel-recovery-") as tmp:
        workdir = Path(tmp)
        sshd = SshdServer(make_keys(workdir / "keys"), workdir / "sshd", LogLevel="INFO")
        sshd.start()
        try:
            with targets_process(workdir) as ports:
                made = make_subjects(sshd, only)
                with running(made, workdir, ports["echo"]):
                    for round_ in range(args.rounds):
                        for outage in outages:
                            figures, startup = asyncio.run(
                                one_outage(sshd, made, ports["echo"], outage)
                            )
                            startups.append(startup)
                            for name, value in figures.items():
                                results.setdefault((outage, name), []).append(value)
                            sys.stderr.write(
                                f"round {round_ + 1}, outage {outage:g} s: "
                                + ", ".join(f"{n} {seconds(v)}" for n, v in figures.items())
                                + "\n"
                            )
        finally:
            sshd.stop()
    print(
        f"Seconds from sshd's restart to the first served request (a new attempt every "
        f"{INTERVAL * 1000:.0f} ms); median of {args.rounds} (each value in brackets). "
        f"Machine busy {load['busy'] * 100:.0f} % before the run. The clock starts as sshd "
        f"is launched; the fixture's start() (until sshd accepts, and its probe's child "
        f"has left) took {statistics.median(startups):.2f} s (median).\n"
    )
    print("| outage | " + " | ".join(only) + " |")
    print("|---|" + "---|" * len(only))
    for outage in outages:
        cells = []
        for name in only:
            values = results[(outage, name)]
            each = ", ".join(seconds(v) for v in values)
            cells.append(f"{seconds(statistics.median(values))} ({each})")
        print(f"| {outage:g} s | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
