"""What the live view costs, measured so that the machine's load does not decide it.

The view draws on a timer (every ``tunnel.live.LiveRenderer.REFRESH`` seconds), not per
byte, so its cost is CPU time per second of wall time. This starts pytunnel twice through
the same private sshd, once with stderr to a file (plain lines) and once on a 120x40
pseudo-terminal (the live view), holds the same connections open through each, and reads
the process's CPU time from /proc over a fixed span. The difference is the view's share of
one core. For a download that pytunnel's one thread limits, the view leaves ``1 - share``
of the rate, so issue 16's "the live view costs at most 5 % on downloads" means a share
of at most 0.05, whatever else the machine is doing. With ``--stream`` one more
connection carries an echo stream at that many MiB/s during the span, so the view draws
a connection whose counts and rate change on every frame.

    .venv/bin/python bench/liveview.py [--rounds 5] [--seconds 10] [--connections 0,50]
        [--stream 0,32]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import run as bench
import socks_client
from subjects import PytunnelLiveSubject, PytunnelSubject, Server

CHUNK = 64 * 1024


def _echo_stream(conn: socket.socket, mib_s: float, stop: threading.Event) -> None:
    """Send CHUNK-sized blocks through the echo target and read them back, paced to
    ``mib_s`` on average, until ``stop``."""
    block = bytes(CHUNK)
    buffer = bytearray(CHUNK)
    interval = CHUNK / (mib_s * 1024 * 1024)
    due = time.monotonic()
    while not stop.is_set():
        conn.sendall(block)
        view, left = memoryview(buffer), CHUNK
        while left:
            got = conn.recv_into(view[CHUNK - left :], left)
            if not got:
                raise socks_client.ClientError("the echo stream ended")
            left -= got
        due += interval
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)


def cpu_per_second(
    live: bool, server: Server, echo: int, connections: int, stream: float, seconds: float
) -> float:
    kind = PytunnelLiveSubject if live else PytunnelSubject
    subject = kind("view" if live else "plain", server, None, echo)
    subject.start()
    held: list[socket.socket] = []
    stop = threading.Event()
    streamer: threading.Thread | None = None
    try:
        for _ in range(connections):
            conn = socks_client.socks_connect(subject.port, echo)
            conn.sendall(b"x")  # a byte each way: every row has counts to show
            if conn.recv(1) != b"x":
                raise socks_client.ClientError("the echo target did not echo")
            held.append(conn)
        if stream > 0:
            conn = socks_client.socks_connect(subject.port, echo)
            held.append(conn)
            streamer = threading.Thread(target=_echo_stream, args=(conn, stream, stop))
            streamer.start()
        time.sleep(1.0)  # the first frames with every row, outside the span
        before = subject.cpu_seconds()
        time.sleep(seconds)
        return (subject.cpu_seconds() - before) / seconds
    finally:
        stop.set()
        if streamer is not None:
            streamer.join()
        for conn in held:
            conn.close()
        subject.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="span of each reading")
    parser.add_argument(
        "--connections", default="0,50", help="open connections held through each subject"
    )
    parser.add_argument(
        "--stream", default="0,32", help="MiB/s of an echo stream during the span (0: none)"
    )
    args = parser.parse_args(argv)
    cases = [
        (int(count), float(stream))
        for count in args.connections.split(",")
        for stream in args.stream.split(",")
    ]
    shares: dict[tuple[int, float], list[float]] = {case: [] for case in cases}
    plain: dict[tuple[int, float], list[float]] = {case: [] for case in cases}
    bench.raise_nofile(4 * max(count for count, _ in cases) + 256)
    with tempfile.TemporaryDirectory(prefix="pytunnel-bench-") as tmp:
        workdir = Path(tmp)
        with bench.targets_process(workdir) as targets, bench.private_sshd(workdir) as server:
            for number in range(args.rounds):
                for count, stream in cases:
                    order = (False, True) if number % 2 == 0 else (True, False)
                    reading = {
                        live: cpu_per_second(
                            live, server, targets["echo"], count, stream, args.seconds
                        )
                        for live in order
                    }
                    shares[count, stream].append(reading[True] - reading[False])
                    plain[count, stream].append(reading[False])
                    bench.log(
                        f"round {number + 1}, {count} connections, stream {stream:g} MiB/s: "
                        f"plain {reading[False]:.4f}, view {reading[True]:.4f} CPU s per s"
                    )
    print(
        f"CPU seconds per second of pytunnel; {args.rounds} round(s) of {args.seconds:g} s, "
        "medians\n"
    )
    print(
        "| connections held open | echo stream (MiB/s) | plain lines "
        "| live view's share of a core (low-high) |"
    )
    print("|--:|--:|--:|--:|")
    for case in cases:
        low, high = min(shares[case]), max(shares[case])
        print(
            f"| {case[0]} | {case[1]:g} | {statistics.median(plain[case]):.4f} | "
            f"{statistics.median(shares[case]):.4f} ({low:.4f}-{high:.4f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
