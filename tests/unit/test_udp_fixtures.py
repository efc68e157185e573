"""Self-tests for ``fixtures.udp_targets``, without pytunnel.

The SOCKS clients are checked against tiny scripted fake proxies on loopback, so that a
wrong byte in a helper is caught here rather than blamed on the proxy later.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from fixtures.net import LOOPBACK4, LOOPBACK6, ipv6_loopback_available, wait_until
from fixtures.udp_targets import (
    DnsOverTcpServer,
    Socks5Udp,
    UdpEcho,
    build_query,
    frame_tcp,
    parse_response,
    read_name,
    recv_exact,
    recv_tcp_message,
    socks4_bind,
    socks5_bind,
)

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 5.0
needs_ipv6 = pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")

Script = Callable[[socket.socket], None]


@contextmanager
def fake_proxy(script: Script) -> Iterator[int]:
    """Accept one TCP connection on loopback and run ``script`` on it in a thread.

    Yields the port; on exit the script's own assertion errors are re-raised here, so a
    fake that saw the wrong bytes fails the test instead of a vague timeout.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK4, 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            errors.append(exc)
            return
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                script(conn)
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        thread.join(TIMEOUT)
        listener.close()
    if errors:
        raise errors[0]


def dribble(conn: socket.socket, data: bytes) -> None:
    """Send one byte at a time, so readers that assume a whole reply per recv() break."""
    for i in range(len(data)):
        conn.sendall(data[i : i + 1])


# --------------------------------------------------------------------------- UdpEcho


def _echo_round_trip(host: str) -> None:
    echo = UdpEcho(host)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as client:
            client.bind((host, 0))
            client.settimeout(TIMEOUT)
            client.sendto(b"ping", (echo.host, echo.port))
            data, addr = client.recvfrom(1024)
            assert data == b"echo:ping"
            assert addr[:2] == (host, echo.port)
            assert echo.sources == [client.getsockname()[:2]]
    finally:
        echo.stop()


def test_udp_echo_ipv4() -> None:
    _echo_round_trip(LOOPBACK4)


@needs_ipv6
def test_udp_echo_ipv6() -> None:
    _echo_round_trip(LOOPBACK6)


# --------------------------------------------------------------------------- DNS codec


def test_build_query_bytes() -> None:
    query = build_query("Example.COM.", 0x1234)
    assert query[:12] == bytes.fromhex("1234 0100 0001 0000 0000 0000")
    assert query[12:] == b"\x07Example\x03COM\x00" + b"\x00\x01\x00\x01"
    assert build_query("a.b", 7, qtype=28)[-4:] == b"\x00\x1c\x00\x01"


def test_parse_handcrafted_response() -> None:
    response = (
        bytes.fromhex("beef 8180 0001 0002 0000 0000")
        + b"\x03www\x07example\x03org\x00"
        + b"\x00\x01\x00\x01"
        # CNAME www.example.org -> web + pointer to "example.org" (offset 16)
        + b"\xc0\x0c"
        + bytes.fromhex("0005 0001 0000003c 0006")
        + b"\x03web\xc0\x10"
        # A record whose owner is the CNAME target: a pointer to a name ending in a pointer
        + b"\xc0\x2d"
        + bytes.fromhex("0001 0001 0000003c 0004")
        + bytes([192, 0, 2, 7])
    )
    assert read_name(response, 45) == ("web.example.org", 51)
    answer = parse_response(response)
    assert (answer.id, answer.rcode, answer.addresses) == (0xBEEF, 0, ["192.0.2.7"])


def test_parse_response_rejects_pointer_loop() -> None:
    looped = bytes.fromhex("0001 8180 0001 0000 0000 0000") + b"\xc0\x0c\x00\x01\x00\x01"
    with pytest.raises(ValueError, match="backwards"):
        parse_response(looped)


def test_parse_nxdomain_header() -> None:
    answer = parse_response(bytes.fromhex("0042 8183 0000 0000 0000 0000"))
    assert (answer.id, answer.rcode, answer.addresses) == (0x42, 3, [])


# --------------------------------------------------------------------------- DNS server


@pytest.fixture
def dns() -> Iterator[DnsOverTcpServer]:
    server = DnsOverTcpServer({"known.test": "10.1.2.3"}, silent={"quiet.test"})
    yield server
    server.stop()


def test_dns_pipelined_queries_on_one_connection(dns: DnsOverTcpServer) -> None:
    with socket.create_connection((dns.host, dns.port), timeout=TIMEOUT) as conn:
        conn.sendall(
            frame_tcp(build_query("KNOWN.test.", 11)) + frame_tcp(build_query("nope.test", 12))
        )
        first = recv_tcp_message(conn)
        second = recv_tcp_message(conn)
    known, unknown = parse_response(first), parse_response(second)
    assert (known.id, known.rcode, known.addresses) == (11, 0, ["10.1.2.3"])
    assert (unknown.id, unknown.rcode, unknown.addresses) == (12, 3, [])
    assert dns.connections == 1
    assert dns.queries == 2

    # Byte-level shape of the positive answer: flags, counts, echoed question, pointer.
    qid, flags, qd, an, ns, ar = struct.unpack_from("!6H", first)
    assert (qid, flags, qd, an, ns, ar) == (11, 0x8180, 1, 1, 0, 0)
    question = build_query("KNOWN.test.", 11)[12:]
    assert first[12 : 12 + len(question)] == question
    record = first[12 + len(question) :]
    assert record == b"\xc0\x0c" + bytes.fromhex("0001 0001 0000003c 0004 0a010203")


def test_dns_silent_name_times_out_but_connection_stays(dns: DnsOverTcpServer) -> None:
    with socket.create_connection((dns.host, dns.port), timeout=TIMEOUT) as conn:
        conn.sendall(frame_tcp(build_query("quiet.test", 1)))
        conn.settimeout(0.5)
        with pytest.raises(TimeoutError):
            conn.recv(2)
        conn.settimeout(TIMEOUT)
        conn.sendall(frame_tcp(build_query("known.test", 2)))
        answer = parse_response(recv_tcp_message(conn))
    assert (answer.id, answer.addresses) == (2, ["10.1.2.3"])
    assert dns.connections == 1
    assert dns.queries == 2


def test_dns_query_split_across_writes(dns: DnsOverTcpServer) -> None:
    with socket.create_connection((dns.host, dns.port), timeout=TIMEOUT) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dribble(conn, frame_tcp(build_query("known.test", 99)))
        assert parse_response(recv_tcp_message(conn)).addresses == ["10.1.2.3"]


def test_dns_stop_closes_idle_connections() -> None:
    server = DnsOverTcpServer({})
    try:
        conn = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
        assert wait_until(lambda: server.connections == 1, TIMEOUT)
    finally:
        server.stop()
    with conn:
        assert conn.recv(1) == b""


# --------------------------------------------------------------------------- Socks5Udp


def _udp_associate_script(
    relay: socket.socket, seen: list[bytes], reply: bytes | None = None
) -> Script:
    """Answer the greeting and UDP ASSOCIATE, then hold the control connection open."""

    def script(conn: socket.socket) -> None:
        seen.append(recv_exact(conn, 3))
        dribble(conn, b"\x05\x00")
        seen.append(recv_exact(conn, 10))
        port = relay.getsockname()[1]
        dribble(conn, reply or b"\x05\x00\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
        conn.recv(1)  # until the client closes

    return script


def test_socks5_udp_send_and_recv_bytes() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as relay:
        relay.bind((LOOPBACK4, 0))
        relay.settimeout(TIMEOUT)
        seen: list[bytes] = []
        with (
            fake_proxy(_udp_associate_script(relay, seen)) as port,
            Socks5Udp.open(LOOPBACK4, port, timeout=TIMEOUT) as client,
        ):
            assert client.reply_code == 0
            assert client.relay == relay.getsockname()
            assert client.udp.family == socket.AF_INET

            client.send("192.0.2.1", 53, b"v4")
            data, source = relay.recvfrom(1024)
            assert data == bytes.fromhex("0000 00 01 c0000201 0035") + b"v4"
            assert source == client.udp.getsockname()

            client.send("2001:db8::1", 443, b"v6", frag=0)
            data, _ = relay.recvfrom(1024)
            v6 = bytes.fromhex("20010db8000000000000000000000001")
            assert data == b"\x00\x00\x00\x04" + v6 + b"\x01\xbb" + b"v6"

            client.send("dns.example", 5353, b"name", frag=1)
            data, _ = relay.recvfrom(1024)
            assert data == b"\x00\x00\x01\x03\x0bdns.example\x14\xe9name"

            reply = b"\x00\x00\x00\x01" + bytes([198, 51, 100, 9]) + b"\x00\x35" + b"pong"
            relay.sendto(reply, source)
            assert client.recv(TIMEOUT) == ("198.51.100.9", 53, b"pong")

            named = b"\x00\x00\x00\x03\x04echo\x1f\x90" + b"hi"
            relay.sendto(named, source)
            assert client.recv(TIMEOUT) == ("echo", 8080, b"hi")

            with pytest.raises(TimeoutError):
                client.recv(0.2)
    assert seen == [b"\x05\x01\x00", b"\x05\x03\x00\x01" + bytes(6)]


def test_socks5_udp_refused_still_returns() -> None:
    refused = b"\x05\x07\x00\x01" + bytes(6)
    seen: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as relay:
        relay.bind((LOOPBACK4, 0))
        with fake_proxy(_udp_associate_script(relay, seen, refused)) as port:
            client = Socks5Udp.open(LOOPBACK4, port, timeout=TIMEOUT)
            client.close()
    assert (client.reply_code, client.relay) == (7, ("0.0.0.0", 0))


@needs_ipv6
def test_socks5_udp_expected_source_and_ipv6_relay() -> None:
    seen: list[bytes] = []

    def script(conn: socket.socket) -> None:
        seen.append(recv_exact(conn, 3))
        conn.sendall(b"\x05\x00")
        seen.append(recv_exact(conn, 22))
        conn.sendall(b"\x05\x00\x00\x04" + bytes(15) + b"\x01" + b"\x30\x39")
        conn.recv(1)

    with (
        fake_proxy(script) as port,
        Socks5Udp.open(LOOPBACK4, port, expected_source=("::1", 4242)) as client,
    ):
        assert client.relay == ("::1", 12345)
        assert client.udp.family == socket.AF_INET6
    assert seen[1] == b"\x05\x03\x00\x04" + bytes(15) + b"\x01" + b"\x10\x92"


def test_socks5_udp_eof_mid_reply() -> None:
    def script(conn: socket.socket) -> None:
        recv_exact(conn, 3)
        conn.sendall(b"\x05\x00")
        recv_exact(conn, 10)
        conn.sendall(b"\x05\x00\x00\x01\x7f")  # then EOF

    with fake_proxy(script) as port, pytest.raises(ConnectionError):
        Socks5Udp.open(LOOPBACK4, port, timeout=TIMEOUT)


# --------------------------------------------------------------------------- BIND


def test_socks5_bind_two_replies() -> None:
    seen: list[bytes] = []

    def script(conn: socket.socket) -> None:
        seen.append(recv_exact(conn, 3))
        dribble(conn, b"\x05\x00")
        seen.append(recv_exact(conn, 4 + 1 + 9 + 2))
        dribble(conn, b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40")
        dribble(conn, b"\x05\x00\x00\x03\x09localhost\x04\xd2")

    with (
        fake_proxy(script) as port,
        socks5_bind(LOOPBACK4, port, "peer.test", 80, timeout=TIMEOUT) as bind,
    ):
        assert (bind.first_code, bind.first_address) == (0, ("127.0.0.1", 40000))
        assert bind.second_reply(TIMEOUT) == (0, "localhost", 1234)
    assert seen == [b"\x05\x01\x00", b"\x05\x02\x00\x03\x09peer.test\x00\x50"]


def test_socks4_bind_two_replies() -> None:
    seen: list[bytes] = []

    def script(conn: socket.socket) -> None:
        seen.append(recv_exact(conn, 9))
        dribble(conn, b"\x00\x5a\x9c\x40\x7f\x00\x00\x01")
        dribble(conn, b"\x00\x5b\x00\x00\x00\x00\x00\x00")

    with (
        fake_proxy(script) as port,
        socks4_bind(LOOPBACK4, port, "192.0.2.5", 21, timeout=TIMEOUT) as bind,
    ):
        assert (bind.first_code, bind.first_address) == (90, ("127.0.0.1", 40000))
        assert bind.second_reply(TIMEOUT) == (91, "0.0.0.0", 0)
    assert seen == [b"\x04\x02\x00\x15\xc0\x00\x02\x05\x00"]
