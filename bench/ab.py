"""Interleaved A/B of two pytunnel source trees through one private sshd.

    git archive OLD tunnel | tar -x -C /tmp/a;  git archive NEW tunnel | tar -x -C /tmp/b
    .venv/bin/python bench/ab.py --a /tmp/a --b /tmp/b --pairs 5

Each pair starts both subjects fresh (``PYTHONPATH`` puts the tree first), then runs every
metric for A and B back to back, the order swapped every pair, so load drifts hit both
alike. Figures that do not depend on load: CPU seconds (utime+stime of the pytunnel process
from /proc) per GiB and per setup, RSS; wall-clock ones are shown for reference. With
``--strace`` the system calls of one download and one upload per subject are counted
(``strace -c -f``) in a last pass, outside the timed pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run
import socks_client
import subjects

MIB = 1024 * 1024


class TreeSubject(subjects.PytunnelSubject):
    """pytunnel with the ``tunnel`` package of ``tree`` first on the path."""

    tree: Path = Path()

    def start(self) -> None:
        env = {"PYTHONPATH": str(self.tree)}
        self.proc, out = subjects.spawn(
            self.argv(), self.server.workdir, f"{self.name}-{time.time_ns()}", env=env
        )
        self._ready(out)


def _subject(
    name: str, tree: Path, server: subjects.Server, cipher: str | None, echo: int
) -> TreeSubject:
    subject = TreeSubject(name, server, cipher, echo)
    subject.tree = tree
    return subject


def measure(
    subject: TreeSubject, ports: dict[str, int], size: int, setups: int
) -> dict[str, float]:
    pid = subject.pid
    out: dict[str, float] = {"rss_idle": subjects.memory_kib(pid)["VmRSS"] / 1024}
    for what, port, fn in (
        ("down", ports["source"], socks_client.download),
        ("up", ports["sink"], socks_client.upload),
    ):
        cpu = subjects.cpu_seconds(pid)
        wall = fn(subject.port, port, size)
        out[f"{what}_cpu_per_gib"] = (subjects.cpu_seconds(pid) - cpu) * 1024 * MIB / size
        out[f"{what}_mib_s"] = size / MIB / wall
    out["hwm_after_transfers"] = subjects.memory_kib(pid)["VmHWM"] / 1024
    cpu = subjects.cpu_seconds(pid)
    _, latencies = socks_client.setups(subject.port, ports["echo"], setups)
    out["setup_cpu_us"] = (subjects.cpu_seconds(pid) - cpu) / setups * 1e6
    out["setup_p50_ms"] = statistics.median(latencies) * 1e3
    return out


def strace_counts(
    subject: TreeSubject, ports: dict[str, int], size: int
) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for what, port, fn in (
        ("down", ports["source"], socks_client.download),
        ("up", ports["sink"], socks_client.upload),
    ):
        report = Path(tempfile.mktemp(prefix="ab-strace-"))
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-o", str(report), "-p", str(subject.pid)],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # strace attaches
        fn(subject.port, port, size)
        tracer.terminate()
        tracer.wait(30)
        calls: dict[str, int] = {}
        for line in report.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[3].isdigit():
                calls[parts[-1]] = int(parts[3])
        report.unlink()
        counts[what] = calls
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--a", type=Path, required=True, help="tree holding tunnel/ (A)")
    parser.add_argument("--b", type=Path, required=True, help="tree holding tunnel/ (B)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="MiB per download and upload")
    parser.add_argument("--setups", type=int, default=300)
    parser.add_argument("--cipher", default=None, help="e.g. aes128-gcm@openssh.com")
    parser.add_argument("--strace", action="store_true")
    args = parser.parse_args()
    size = args.size * MIB
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="pytunnel-ab-") as tmp:
        work = Path(tmp)
        with run.private_sshd(work) as server, run.targets_process(work) as ports:
            trees = {"A": args.a.resolve(), "B": args.b.resolve()}
            for pair in range(args.pairs):
                order = ["A", "B"] if pair % 2 == 0 else ["B", "A"]
                for name in order:
                    subject = _subject(name, trees[name], server, args.cipher, ports["echo"])
                    subject.start()
                    try:
                        time.sleep(1.0)
                        results[name].append(measure(subject, ports, size, args.setups))
                    finally:
                        subject.stop()
                load.append(os.getloadavg()[0])
                print(f"pair {pair + 1}/{args.pairs} done, load {load[-1]:.2f}", file=sys.stderr)
            traces = {}
            if args.strace:
                for name in ("A", "B"):
                    subject = _subject(name, trees[name], server, args.cipher, ports["echo"])
                    subject.start()
                    try:
                        traces[name] = strace_counts(subject, ports, size)
                    finally:
                        subject.stop()
    print(
        f"A = {args.a}, B = {args.b}, cipher {args.cipher or 'default'}, {args.pairs} pairs, "
        f"{args.size} MiB, {args.setups} setups; load average {min(load):.2f}-{max(load):.2f}\n"
    )
    print("| metric | A (median) | B (median) | B/A (median of pairs) | B/A low-high |")
    print("|---|--:|--:|--:|--:|")
    for key in results["A"][0]:
        a = [r[key] for r in results["A"]]
        b = [r[key] for r in results["B"]]
        ratios = [y / x for x, y in zip(a, b, strict=True) if x]
        print(
            f"| {key} | {statistics.median(a):.3g} | {statistics.median(b):.3g} | "
            f"{statistics.median(ratios):.3f}x | {min(ratios):.3f}-{max(ratios):.3f} |"
        )
    for name, per in traces.items():
        for what, calls in per.items():
            top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
            per_mib = ", ".join(f"{call} {n / args.size:.1f}" for call, n in top)
            print(f"\n{name} {what}: syscalls per MiB: {per_mib}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
