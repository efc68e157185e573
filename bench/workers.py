"""Would ``--workers N`` pay on this machine? One pytunnel process against two.

``--workers N`` would be N processes sharing the listening sockets (``SO_REUSEPORT``:
the kernel spreads connections over them), each with its own SSH connection. This
measures what that could give at best, without the parent that would gather the
workers' events: two client processes drive either one pytunnel (both on its port) or
two pytunnels (one each), through the same private sshd, and the figures are totals
over both clients. Each round runs both layouts, in alternating order.

    .venv/bin/python bench/workers.py [--rounds 5] [--setups 500] [--size 32] [--flows 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.pool
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import run as bench
import socks_client
from subjects import PytunnelSubject, Server, SshSubject, Subject


def _setups(args: tuple[int, int, int]) -> float:
    proxy_port, echo_port, count = args
    wall, _ = socks_client.setups(proxy_port, echo_port, count)
    return wall


def _downloads(args: tuple[int, int, int, int]) -> float:
    proxy_port, source_port, flows, size = args
    return socks_client.concurrent_download(proxy_port, source_port, flows, size)


def _both(pool: multiprocessing.pool.Pool, job: Callable[..., float], jobs: list[tuple]) -> float:
    """Run the two clients' jobs at once; the wall time of the pair."""
    started = time.perf_counter()
    pool.map(job, jobs)
    return time.perf_counter() - started


def measure(
    pool: multiprocessing.pool.Pool,
    ports: list[int],
    targets: dict[str, int],
    args: argparse.Namespace,
) -> tuple[float, float]:
    """(setups per second, MiB/s) in total for two clients, the first on ports[0], the
    second on ports[-1]."""
    size = args.size << 20
    warm = [(ports[0], targets["echo"], 20), (ports[-1], targets["echo"], 20)]
    pool.map(_setups, warm)
    wall = _both(pool, _setups, [(p, targets["echo"], args.setups) for p in (ports[0], ports[-1])])
    setups = 2 * args.setups / wall
    jobs = [(p, targets["source"], args.flows, size) for p in (ports[0], ports[-1])]
    pool.map(_downloads, jobs)  # warm-up
    wall = _both(pool, _downloads, jobs)
    return setups, 2 * args.flows * args.size / wall


def run_layout(
    processes: int, server: Server, targets: dict[str, int], pool: multiprocessing.pool.Pool,
    args: argparse.Namespace,
) -> tuple[float, float]:  # fmt: skip
    subjects: list[Subject] = [
        PytunnelSubject(f"pytunnel-{i}", server, None, targets["echo"]) for i in range(processes)
    ]
    if processes == 0:  # the reference: ssh -D, one process
        subjects = [SshSubject("ssh -D", server, None, targets["echo"])]
    try:
        for subject in subjects:
            subject.start()
        return measure(pool, [s.port for s in subjects], targets, args)
    finally:
        for subject in subjects:
            subject.stop()


def _name(processes: int) -> str:
    return "ssh -D" if processes == 0 else f"pytunnel, {processes} process(es)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--setups", type=int, default=500, help="sequential setups per client")
    parser.add_argument("--size", type=int, default=32, help="MiB per download")
    parser.add_argument("--flows", type=int, default=4, help="downloads at once per client")
    args = parser.parse_args(argv)
    figures: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="pytunnel-bench-") as tmp:
        workdir = Path(tmp)
        with (
            bench.targets_process(workdir) as targets,
            bench.private_sshd(workdir) as server,
            multiprocessing.get_context("fork").Pool(2) as pool,
        ):
            for number in range(args.rounds):
                for processes in (0, 1, 2) if number % 2 == 0 else (2, 1, 0):
                    setups, mib = run_layout(processes, server, targets, pool, args)
                    figures[processes].append((setups, mib))
                    bench.log(
                        f"round {number + 1}: {_name(processes)}: "
                        f"{setups:.0f} setups/s, {mib:.0f} MiB/s"
                    )
    print(
        f"two clients at once, {args.setups} sequential setups each, then {args.flows} "
        f"downloads of {args.size} MiB each; {args.rounds} round(s), medians\n"
    )
    print("| subject | setups/s (total) | download MiB/s (total) |")
    print("|---|--:|--:|")
    for processes, rows in figures.items():
        print(
            f"| {_name(processes)} | {statistics.median(r[0] for r in rows):.0f} | "
            f"{statistics.median(r[1] for r in rows):.0f} |"
        )
    for over, under in ((2, 1), (1, 0), (2, 0)):
        setups = [b[0] / a[0] for a, b in zip(figures[under], figures[over], strict=True)]
        mib = [b[1] / a[1] for a, b in zip(figures[under], figures[over], strict=True)]
        print(
            f"\n{_name(over)} / {_name(under)}, same round, median: setups "
            f"{statistics.median(setups):.2f}x, download {statistics.median(mib):.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
