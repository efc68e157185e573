"""Aggregate throughput over several SSH connections: ``pytunnel --connections N``.

Eight downloads run at once through each subject: ``ssh -D`` (one connection, for
reference) and pytunnel with ``--connections`` 1, 2 and 4, alternating round by round
through the same private sshd. Extra connections open as channels need them, so each
subject first runs one warm-up batch (not recorded) that lets the pool grow; the figure
is total MiB moved over wall time, median over rounds, with same-round ratios against
``--connections 1``.

    .venv/bin/python bench/connections.py [--rounds 3] [--size 32] [--flows 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import run as bench
import socks_client
from subjects import PytunnelSubject, Server, SshSubject, Subject


class PooledPytunnel(PytunnelSubject):
    """pytunnel with ``--connections N``."""

    connections: int = 1

    def argv(self) -> list[str]:
        argv = super().argv()
        return [*argv[:-1], "--connections", str(self.connections), argv[-1]]


def make_subjects(server: Server, echo_port: int) -> list[Subject]:
    subjects: list[Subject] = [SshSubject("ssh -D", server, None, echo_port)]
    for n in (1, 2, 4):
        pooled = PooledPytunnel(f"pytunnel --connections {n}", server, None, echo_port)
        pooled.connections = n
        subjects.append(pooled)
    return subjects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="MiB per download")
    parser.add_argument("--flows", type=int, default=8, help="downloads at once")
    args = parser.parse_args(argv)
    size = args.size << 20
    results: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pytunnel-bench-") as tmp:
        workdir = Path(tmp)
        with bench.targets_process(workdir) as ports, bench.private_sshd(workdir) as server:
            for number in range(args.rounds):
                subjects = make_subjects(server, ports["echo"])
                # Rotate the order every round, as run.py does.
                subjects = subjects[number % len(subjects) :] + subjects[: number % len(subjects)]
                speeds: dict[str, float] = {}
                for subject in subjects:
                    subject.start()
                    try:
                        port = subject.port
                        socks_client.concurrent_download(port, ports["source"], args.flows, size)
                        seconds = socks_client.concurrent_download(
                            port, ports["source"], args.flows, size
                        )
                    finally:
                        subject.stop()
                    speeds[subject.name] = args.flows * args.size / seconds
                    bench.log(
                        f"round {number + 1}: {subject.name}: {speeds[subject.name]:.0f} MiB/s"
                    )
                base = speeds["pytunnel --connections 1"]
                for name, speed in speeds.items():
                    results.setdefault(name, []).append(speed)
                    ratios.setdefault(name, []).append(speed / base)
    print(f"{args.flows} downloads at once, {args.size} MiB each, {args.rounds} round(s)\n")
    print("| subject | aggregate MiB/s (median) | / --connections 1 |")
    print("|---|--:|--:|")
    for name, speeds_ in results.items():
        print(
            f"| {name} | {statistics.median(speeds_):.0f} | "
            f"{statistics.median(ratios[name]):.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
