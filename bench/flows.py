"""Single flows, interleaved: one download and one upload per subject per round, the
subjects taking turns in a rotating order, all of them started once and kept running.

bench/run.py measures each metric for every subject in turn, with a round's other
metrics (setups, concurrency, 1000 open connections) in between. On a small machine
that leaves throughput at the mercy of where the scheduler puts each process for that
one transfer, and its ratios of single flows moved by 15 % from run to run. Here
transfers of the subjects alternate many times in a row, so the ratios are medians of
many same-round pairs.

    .venv/bin/python bench/flows.py --only ssh,pytunnel-master,pytunnel-master-stdio \\
        --rounds 30 --size 64

Prints, per subject, the median download and upload rate and CPU per GiB (every
process of the subject: pytunnel and the master together), then each subject's median
same-round ratio to the first. Everything stays on loopback: the private sshd and the
local targets of bench/run.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import run
import socks_client
import subjects

MIB = 1 << 20
GIB = 1 << 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Single flows, interleaved, subject by subject.")
    parser.add_argument("--only", default="ssh,pytunnel-master,pytunnel-master-stdio")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--size", type=int, default=64, help="MiB per transfer")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(subjects.SUBJECTS)
    if unknown or len(names) < 2:
        parser.error(f"--only: two or more of {sorted(subjects.SUBJECTS)}")
    size = args.size * MIB
    keys = ("down", "up", "down_cpu", "up_cpu")
    samples: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in names}
    with tempfile.TemporaryDirectory(prefix="pytunnel-flows-") as tmp:
        workdir = Path(tmp)
        with run.private_sshd(workdir) as server, run.targets_process(workdir) as ports:
            started: dict[str, subjects.Subject] = {}
            try:
                for name in names:
                    subject = subjects.SUBJECTS[name](name, server, None, ports["echo"])
                    started[name] = subject
                    subject.start()
                for r in range(args.rounds):
                    shift = r % len(names)
                    for name in names[shift:] + names[:shift]:
                        subject = started[name]
                        for key, transfer, target in (
                            ("down", socks_client.download, ports["source"]),
                            ("up", socks_client.upload, ports["sink"]),
                        ):
                            cpu = subject.cpu_seconds()
                            seconds = transfer(subject.port, target, size)
                            cpu = subject.cpu_seconds() - cpu
                            samples[name][key].append(size / MIB / seconds)
                            samples[name][key + "_cpu"].append(cpu * GIB / size)
            finally:
                for subject in started.values():
                    subject.stop()
    median = statistics.median
    print(f"{args.rounds} rounds, {args.size} MiB per transfer, {len(names)} subjects")
    print("| subject | down MiB/s | CPU s/GiB | up MiB/s | CPU s/GiB |")
    print("|---|--:|--:|--:|--:|")
    for name in names:
        s = samples[name]
        print(
            f"| {name} | {median(s['down']):.0f} | {median(s['down_cpu']):.2f} "
            f"| {median(s['up']):.0f} | {median(s['up_cpu']):.2f} |"
        )
    base = samples[names[0]]
    for name in names[1:]:
        s = samples[name]
        ratios = {
            key: median(a / b for a, b in zip(s[key], base[key], strict=True))
            for key in ("down", "up")
        }
        print(f"{name} / {names[0]}: download {ratios['down']:.2f}x, upload {ratios['up']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
