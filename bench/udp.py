"""DNS and UDP through SOCKS5 UDP ASSOCIATE, next to what ``ssh -D`` users do instead.

``ssh -D`` has no UDP, so the way to ask a resolver on the far side is DNS over TCP
through a SOCKS5 CONNECT (``proxychains dig +tcp``, one connection per query). This
measures, through the same private sshd, sequential query round trips for:

- ``ssh -D``, TCP: a CONNECT per query (what those tools do);
- ``pytunnel -D``, TCP: the same, through pytunnel;
- ``pytunnel UDP``: a plain UDP query to the association's relay (pytunnel carries it
  as DNS over TCP on one reused channel);
- ``pytunnel UDP helper``: a UDP echo through ``--udp-helper`` (no DNS: any UDP).

Medians of each round's p50, with same-round ratios against ``ssh -D``. The DNS server
and the echo server are loopback test servers; nothing leaves this machine.

    .venv/bin/python bench/udp.py [--rounds 3] [--queries 300]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import run as bench
import socks_client
from subjects import PytunnelSubject, Server, SshSubject, Subject

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures.udp_targets import (
    DnsOverTcpServer,
    Socks5Udp,
    UdpEcho,
    build_query,
    frame_tcp,
    parse_response,
    recv_tcp_message,
)

NAME = "www.example.test"
RECORDS = {NAME: "192.0.2.10"}
# Queries are addressed here; --dns-server sends them to the test server instead.
ADDRESSED = ("127.0.0.153", 53)


class UdpPytunnel(PytunnelSubject):
    """pytunnel with the UDP options."""

    extra: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        argv = super().argv()
        return [*argv[:-1], *self.extra, argv[-1]]


def timed(count: int, one: Callable[[int], None]) -> list[float]:
    """``count`` sequential round trips, in milliseconds."""
    samples = []
    for index in range(count):
        started = time.perf_counter()
        one(index)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def tcp_dns(proxy_port: int, dns_port: int, count: int) -> list[float]:
    def one(index: int) -> None:
        with socks_client.socks_connect(proxy_port, dns_port) as sock:
            sock.sendall(frame_tcp(build_query(NAME, index & 0xFFFF)))
            answer = parse_response(recv_tcp_message(sock))
            assert answer.addresses == [RECORDS[NAME]], answer

    return timed(count, one)


def udp_dns(proxy_port: int, count: int) -> list[float]:
    with Socks5Udp.open("127.0.0.1", proxy_port) as association:

        def one(index: int) -> None:
            association.send(*ADDRESSED, build_query(NAME, index & 0xFFFF))
            answer = parse_response(association.recv(10.0)[2])
            assert answer.addresses == [RECORDS[NAME]], answer

        one(0)  # the first opens the channel: not a round trip of the steady state
        return timed(count, one)


def udp_echo(proxy_port: int, echo: UdpEcho, count: int) -> list[float]:
    with Socks5Udp.open("127.0.0.1", proxy_port) as association:

        def one(index: int) -> None:
            payload = index.to_bytes(4)
            association.send(echo.host, echo.port, payload)
            assert association.recv(10.0)[2] == b"echo:" + payload

        one(0)  # starts the helper on the server
        return timed(count, one)


def measure(subject: Subject, kind: str, dns: DnsOverTcpServer, echo: UdpEcho, n: int) -> float:
    subject.start()
    try:
        if kind == "tcp":
            samples = tcp_dns(subject.port, dns.port, n)
        elif kind == "udp":
            samples = udp_dns(subject.port, n)
        else:
            samples = udp_echo(subject.port, echo, n)
    finally:
        subject.stop()
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=300, help="round trips per subject")
    args = parser.parse_args(argv)
    medians: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pytunnel-bench-") as tmp:
        workdir = Path(tmp)
        dns = DnsOverTcpServer(records=RECORDS)
        echo = UdpEcho()
        try:
            with bench.targets_process(workdir) as ports, bench.private_sshd(workdir) as server:
                for number in range(args.rounds):
                    round_medians = one_round(server, ports["echo"], dns, echo, args.queries)
                    base = round_medians["ssh -D, DNS over TCP, CONNECT per query"]
                    for name, value in round_medians.items():
                        medians.setdefault(name, []).append(value)
                        ratios.setdefault(name, []).append(value / base)
                        bench.log(f"round {number + 1}: {name}: p50 {value:.3f} ms")
        finally:
            dns.stop()
            echo.stop()
    print(f"{args.queries} sequential round trips per subject, {args.rounds} round(s)\n")
    print("| subject | p50 round trip, ms (median of rounds) | / ssh -D |")
    print("|---|--:|--:|")
    for name, values in medians.items():
        print(
            f"| {name} | {statistics.median(values):.3f} | {statistics.median(ratios[name]):.2f}x |"
        )
    return 0


def one_round(
    server: Server, echo_port: int, dns: DnsOverTcpServer, echo: UdpEcho, queries: int
) -> dict[str, float]:
    udp = UdpPytunnel("pytunnel", server, None, echo_port)
    udp.extra = ("--dns-server", f"127.0.0.1:{dns.port}", "--udp-helper")
    ssh = SshSubject("ssh", server, None, echo_port)
    tcp = PytunnelSubject("pytunnel", server, None, echo_port)
    plan: list[tuple[str, Subject, str]] = [
        ("ssh -D, DNS over TCP, CONNECT per query", ssh, "tcp"),
        ("pytunnel -D, DNS over TCP, CONNECT per query", tcp, "tcp"),
        ("pytunnel UDP ASSOCIATE, DNS (one channel)", udp, "udp"),
        ("pytunnel UDP ASSOCIATE, echo via --udp-helper", udp, "echo"),
    ]
    return {name: measure(subject, kind, dns, echo, queries) for name, subject, kind in plan}


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    sys.exit(main())
