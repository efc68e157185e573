"""SOCKS5 UDP ASSOCIATE through a real OpenSSH sshd, driving the real ``pytunnel`` script.

SSH has no UDP channel, so pytunnel turns datagrams into streams: DNS (port 53) goes as
DNS over TCP on a ``direct-tcpip`` channel, and any other UDP only with ``--udp-helper``
(a small relay that pytunnel starts on the server with ``python3 -c``).

Everything stays on loopback. DNS queries are addressed to ``ADDRESSED``, a loopback
address where nothing listens: with ``--dns-server`` that address is never contacted, it
only has to come back as the source of the answer. The one test without ``--dns-server``
runs its own DNS-over-TCP server on 127.0.0.77:53.

The last test runs the proxy in-process, to shorten the DNS timeout and answer late.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.in_process import EventLog, sshd_config
from fixtures.net import LOOPBACK4, LOOPBACK6, ipv6_loopback_available, wait_until
from fixtures.pytunnel_proc import (
    EVENT_TIMEOUT,
    PytunnelFactory,
    Running,
    client_name,
    closed_by_peer,
    connect_proxy,
    recv_exact,
    server_args,
    socks4_request,
    socks5_open,
)
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget
from fixtures.udp_targets import (
    ECHO_PREFIX,
    RCODE_NXDOMAIN,
    DnsAnswer,
    DnsOverTcpServer,
    Socks5Udp,
    UdpEcho,
    build_query,
    dns_response,
    frame_tcp,
    parse_response,
)

import tunnel.udp as udp_module
from tunnel import events
from tunnel.keeper import SshUpstream
from tunnel.proxy import ProxyServer
from tunnel.rules import Rules
from tunnel.session import Session

pytestmark = pytest.mark.timeout(60)

# Deadline for a datagram that should come back (a round trip through sshd, and for the
# helper, starting python3 on the server first).
RECV_TIMEOUT = 10.0
# Deadline for the "unanswered" report: the relay's own timeout plus the usual margin.
UNANSWERED_TIMEOUT = udp_module.DNS_TIMEOUT + EVENT_TIMEOUT
# Where DNS queries are addressed when --dns-server redirects them: loopback, port 53,
# nothing listening, never contacted. Its only job is to be named in the answers.
ADDRESSED = ("127.0.0.153", 53)
RECORDS = {
    "www.example.test": "192.0.2.10",
    "mail.example.test": "192.0.2.25",
    "ns1.example.test": "198.51.100.53",
    "ns2.example.test": "198.51.100.54",
    "ftp.example.test": "203.0.113.21",
}
KNOWN = "www.example.test"
SILENT = "slow.example.test"
UNKNOWN = "nowhere.example.test"
# The "same destination" DNS server: a free loopback address on the real DNS port.
SAME_DESTINATION = ("127.0.0.77", 53)
JOIN_TIMEOUT = 5.0
MAX_DATAGRAM = 65535
# What the helper's command line carries (its source, packed): see tunnel.udp.helper_command.
HELPER_MARK = b"exec(zlib.decompress(base64.b64decode("


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[DnsOverTcpServer]:
    server = DnsOverTcpServer(records=RECORDS, silent={SILENT})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    echo = UdpEcho()
    try:
        yield echo
    finally:
        echo.stop()


StartTunnel = Callable[..., Running]
OpenAssociation = Callable[..., Socks5Udp]


@pytest.fixture
def start(pytunnel_factory: PytunnelFactory, sshd: SshdServer) -> StartTunnel:
    """``start(*options, server=sshd, listen="127.0.0.1:0")``: a ready pytunnel."""

    def start_tunnel(
        *options: str, server: SshdServer | None = None, listen: str = "127.0.0.1:0"
    ) -> Running:
        return pytunnel_factory(["-D", listen, *options, *server_args(server or sshd)])

    return start_tunnel


@pytest.fixture
def associate() -> Iterator[OpenAssociation]:
    """``associate(running, **kw)``: a granted UDP association, closed at teardown."""
    opened: list[Socks5Udp] = []

    def open_association(running: Running, **kwargs: Any) -> Socks5Udp:
        host, port = running.address
        association = Socks5Udp.open(host, port, **kwargs)
        opened.append(association)
        assert association.reply_code == 0, (association, running.describe())
        return association

    try:
        yield open_association
    finally:
        for association in opened:
            association.close()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Extra sockets a test opens, closed at teardown."""
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for sock in held:
            sock.close()


# -- helpers -----------------------------------------------------------------------------


def dns_via(server: DnsOverTcpServer) -> list[str]:
    return ["--dns-server", f"{server.host}:{server.port}"]


def resolve(
    association: Socks5Udp, name: str, qid: int, via: tuple[str, int] = ADDRESSED
) -> DnsAnswer:
    """One A query sent to ``via``; the answer must come back as if from ``via``."""
    association.send(*via, build_query(name, qid))
    host, port, payload = association.recv(RECV_TIMEOUT)
    assert (host, port) == via
    return parse_response(payload)


def assert_resolves(association: Socks5Udp, name: str, qid: int) -> None:
    """A known name resolves; also a barrier: everything sent before was handled."""
    assert resolve(association, name, qid) == DnsAnswer(qid, 0, [RECORDS[name]])


def echo_round_trip(association: Socks5Udp, echo: UdpEcho, payload: bytes) -> None:
    association.send(echo.host, echo.port, payload)
    assert association.recv(RECV_TIMEOUT) == (echo.host, echo.port, ECHO_PREFIX + payload)


def association_id(running: Running, association: Socks5Udp) -> int:
    opened = running.wait_event("channel_opened", client=client_name(association.control))
    return int(opened["id"])


def close_association(running: Running, association: Socks5Udp, ident: int) -> dict[str, Any]:
    """Close the control connection (which ends the association); its closing event."""
    association.control.close()
    return running.wait_event("connection_closed", id=ident)


def nothing_waiting(sock: socket.socket) -> bool:
    """True if no datagram is queued on ``sock`` right now (does not wait)."""
    sock.setblocking(False)
    try:
        sock.recv(MAX_DATAGRAM)
    except BlockingIOError:
        return True
    return False


def udp_socket(sockets: list[socket.socket], host: str = LOOPBACK4) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sockets.append(sock)
    sock.bind((host, 0))
    return sock


def helper_processes(server: SshdServer) -> list[int]:
    """PIDs of UDP helpers (``python3 -c`` with pytunnel's packed source) under ``server``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    assert server.pid is not None, "sshd is not running"
    below = {server.pid}
    changed = True
    while changed:
        more = {pid for pid, parent in parents.items() if parent in below} - below
        below |= more
        changed = bool(more)
    found = []
    for pid in sorted(below - {server.pid}):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"python3") and any(HELPER_MARK in arg for arg in argv):
                found.append(pid)
    return found


def udp_port_free(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((host, port))
    except OSError:
        return False
    return True


# -- DNS over TCP --------------------------------------------------------------------------


def test_dns_query_is_answered_as_if_from_where_it_was_sent(
    start: StartTunnel, associate: OpenAssociation, dns_server: DnsOverTcpServer
) -> None:
    running = start(*dns_via(dns_server))
    association = associate(running)
    ident = association_id(running, association)
    # The relay is on the listener's address, and that is what the events name.
    assert association.relay[0] == LOOPBACK4
    parsed = running.wait_event("request_parsed", id=ident)
    assert parsed["protocol"] == "socks5-udp"
    opened = running.wait_event("channel_opened", id=ident)
    assert (opened["host"], opened["port"]) == association.relay

    answer = resolve(association, KNOWN, 0x2A01)
    assert answer == DnsAnswer(0x2A01, 0, [RECORDS[KNOWN]])
    assert dns_server.connections == 1
    assert dns_server.queries == 1


def test_dns_addressed_by_name_is_answered_in_that_name(
    start: StartTunnel, associate: OpenAssociation, dns_server: DnsOverTcpServer
) -> None:
    # ATYP 3: the answer's header carries the name back. (With --dns-server it is never
    # looked up; "localhost" keeps even a wrong lookup on this machine.)
    association = associate(start(*dns_via(dns_server)))
    answer = resolve(association, KNOWN, 0x3A3E, via=("localhost", 53))
    assert answer == DnsAnswer(0x3A3E, 0, [RECORDS[KNOWN]])


def test_dns_server_option_takes_every_resolver_over_one_channel(
    start: StartTunnel, associate: OpenAssociation, dns_server: DnsOverTcpServer
) -> None:
    # A client that alternates between two resolvers: with --dns-server both go to the
    # same server over one channel, and each answer comes back as from the resolver
    # its query was sent to.
    association = associate(start(*dns_via(dns_server)))
    other = ("127.0.0.154", 53)
    for qid in range(300, 306):
        via = ADDRESSED if qid % 2 else other
        assert resolve(association, KNOWN, qid, via) == DnsAnswer(qid, 0, [RECORDS[KNOWN]])
    assert dns_server.connections == 1


def test_dns_unknown_name_is_nxdomain(
    start: StartTunnel, associate: OpenAssociation, dns_server: DnsOverTcpServer
) -> None:
    association = associate(start(*dns_via(dns_server)))
    assert resolve(association, UNKNOWN, 0x0BAD) == DnsAnswer(0x0BAD, RCODE_NXDOMAIN, [])


def test_dns_queries_share_one_channel(
    start: StartTunnel, associate: OpenAssociation, dns_server: DnsOverTcpServer
) -> None:
    association = associate(start(*dns_via(dns_server)))
    names = list(RECORDS)
    # Back to back: the first opens the channel, the others wait for it in the queue.
    for qid, name in enumerate(names, start=100):
        association.send(*ADDRESSED, build_query(name, qid))
    answers = {}
    for _ in names:
        host, port, payload = association.recv(RECV_TIMEOUT)
        assert (host, port) == ADDRESSED
        answer = parse_response(payload)
        answers[answer.id] = answer
    expected = {qid: DnsAnswer(qid, 0, [RECORDS[name]]) for qid, name in enumerate(names, 100)}
    assert answers == expected
    # And once the channel is open, later queries go over it too.
    for qid, name in enumerate(names, start=200):
        assert_resolves(association, name, qid)
    assert dns_server.connections == 1
    assert dns_server.queries == 2 * len(names)


def test_dns_goes_to_the_addressed_server_without_dns_server(
    start: StartTunnel, associate: OpenAssociation
) -> None:
    try:
        server = DnsOverTcpServer(RECORDS, host=SAME_DESTINATION[0], port=SAME_DESTINATION[1])
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EPERM):
            pytest.skip(f"cannot listen on {SAME_DESTINATION}: {exc}")
        raise
    try:
        association = associate(start())
        answer = resolve(association, "mail.example.test", 0x5353, via=SAME_DESTINATION)
        assert answer == DnsAnswer(0x5353, 0, [RECORDS["mail.example.test"]])
        assert resolve(association, UNKNOWN, 0x5354, via=SAME_DESTINATION).rcode == RCODE_NXDOMAIN
        assert server.connections == 1
        assert server.queries == 2
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_dns_unanswered_query_is_reported_and_the_channel_stays(
    start: StartTunnel, associate: OpenAssociation, dns_server: DnsOverTcpServer
) -> None:
    running = start(*dns_via(dns_server))
    association = associate(running)
    ident = association_id(running, association)
    association.send(*ADDRESSED, build_query(SILENT, 0x51E7))
    dropped = running.wait_event("datagrams_dropped", timeout=UNANSWERED_TIMEOUT, id=ident)
    assert "unanswered" in dropped["reason"], running.describe()
    assert dropped["destination"] == "{}:{}".format(*ADDRESSED)
    # The query did reach the server (a timeout, not a failure to connect), and no
    # answer came back.
    assert dns_server.queries == 1, running.describe()
    assert nothing_waiting(association.udp)
    # The same channel still carries the next query.
    assert_resolves(association, KNOWN, 0x51E8)
    assert dns_server.connections == 1, running.describe()
    closed = close_association(running, association, ident)
    assert closed["dropped"] == 1, running.describe()


@pytest.mark.parametrize(
    ("hang_ups", "answered"),
    [(1, True), (2, False)],
    ids=["resent-once-on-a-new-channel", "given-up-after-the-second-hang-up"],
)
def test_dns_server_hanging_up_before_answering(
    start: StartTunnel, associate: OpenAssociation, hang_ups: int, answered: bool
) -> None:
    server = DnsOverTcpServer(RECORDS, hang_ups=hang_ups)
    try:
        running = start("--dns-server", f"{server.host}:{server.port}")
        association = associate(running)
        ident = association_id(running, association)
        association.send(*ADDRESSED, build_query(KNOWN, 0x4A06))
        if answered:
            host, port, payload = association.recv(RECV_TIMEOUT)
            assert (host, port) == ADDRESSED
            assert parse_response(payload) == DnsAnswer(0x4A06, 0, [RECORDS[KNOWN]])
        else:
            dropped = running.wait_event("datagrams_dropped", id=ident)
            assert "could not reach" in dropped["reason"]
        assert server.connections == 2
        assert server.queries == 2
        closed = close_association(running, association, ident)
        assert closed.get("dropped", 0) == (0 if answered else 1)
        assert (running.events("datagrams_dropped", id=ident) == []) is answered
    finally:
        server.stop()


def test_dns_server_that_refuses_drops_the_query(
    start: StartTunnel, associate: OpenAssociation, closed_port: int
) -> None:
    running = start("--dns-server", f"{LOOPBACK4}:{closed_port}")
    association = associate(running)
    ident = association_id(running, association)
    association.send(*ADDRESSED, build_query(KNOWN, 0x0DED))
    dropped = running.wait_event("datagrams_dropped", id=ident)
    assert "could not reach" in dropped["reason"]
    assert nothing_waiting(association.udp)


# -- bounds on DNS channels ---------------------------------------------------------------


@pytest.fixture
def resolvers() -> Iterator[Callable[[int], list[DnsOverTcpServer]]]:
    """``resolvers(n)``: n DNS-over-TCP servers on port 53 of distinct loopback addresses
    (127.0.0.60 and up), as a client naming n resolvers reaches them."""
    started: list[DnsOverTcpServer] = []

    def start_resolvers(count: int) -> list[DnsOverTcpServer]:
        for number in range(count):
            try:
                started.append(DnsOverTcpServer(RECORDS, host=f"127.0.0.{60 + number}", port=53))
            except OSError as exc:
                pytest.skip(f"cannot listen on 127.0.0.{60 + number}:53: {exc}")
        return started

    try:
        yield start_resolvers
    finally:
        for server in started:
            server.stop()


def test_dns_links_per_association_are_capped_and_the_rest_counted_as_dropped(
    start: StartTunnel,
    associate: OpenAssociation,
    resolvers: Callable[[int], list[DnsOverTcpServer]],
) -> None:
    cap = udp_module.MAX_DNS_LINKS
    servers = resolvers(cap + 2)
    running = start()
    association = associate(running)
    ident = association_id(running, association)
    for qid, server in enumerate(servers[:cap], start=1):
        answer = resolve(association, KNOWN, qid, via=server.address)
        assert answer == DnsAnswer(qid, 0, [RECORDS[KNOWN]])
    # One more resolver: no channel for it, the query is dropped, counted and reported.
    association.send(*servers[cap].address, build_query(KNOWN, 0x0F00))
    dropped = running.wait_event("datagrams_dropped", id=ident)
    assert f"more than {cap} servers" in dropped["reason"]
    assert dropped["destination"] == f"{servers[cap].host}:53"
    association.send(*servers[cap + 1].address, build_query(KNOWN, 0x0F01))
    # The links it has still serve (and answer after the two drops were handled).
    assert resolve(association, KNOWN, 0x0F02, via=servers[0].address).id == 0x0F02
    assert all(server.connections >= 1 for server in servers[:cap])
    assert [server.connections for server in servers[cap:]] == [0, 0]
    closed = close_association(running, association, ident)
    assert closed["dropped"] == 2


def test_dns_channels_count_toward_the_connection_limit(
    start: StartTunnel,
    associate: OpenAssociation,
    resolvers: Callable[[int], list[DnsOverTcpServer]],
    echo_target: EchoTarget,
) -> None:
    # A limit of 3: the association's control connection and two DNS channels.
    servers = resolvers(3)
    running = start("--max-connections", "3")
    association = associate(running)
    ident = association_id(running, association)
    for qid, server in enumerate(servers[:2], start=1):
        assert resolve(association, KNOWN, qid, via=server.address).rcode == 0
    association.send(*servers[2].address, build_query(KNOWN, 3))
    dropped = running.wait_event("datagrams_dropped", id=ident)
    assert "connection limit" in dropped["reason"]
    assert servers[2].connections == 0
    # Nor is there room for another client: it gets SOCKS5 general failure.
    sock, reply = socks5_open(running.address, LOOPBACK4, echo_target.port)
    with sock:
        assert reply[:2] == b"\x05\x01"


# -- other UDP: the helper ---------------------------------------------------------------


def test_other_udp_without_helper_is_dropped_and_counted(
    start: StartTunnel,
    associate: OpenAssociation,
    dns_server: DnsOverTcpServer,
    udp_echo: UdpEcho,
) -> None:
    running = start(*dns_via(dns_server))
    association = associate(running)
    ident = association_id(running, association)
    for number in range(3):
        association.send(udp_echo.host, udp_echo.port, b"lost %d" % number)
    dropped = running.wait_event("datagrams_dropped", id=ident)
    assert "--udp-helper" in dropped["reason"]
    assert dropped["destination"] == f"{udp_echo.host}:{udp_echo.port}"
    # DNS still works, and its answer means the three datagrams before it were handled.
    assert_resolves(association, KNOWN, 1)
    assert udp_echo.sources == []
    closed = close_association(running, association, ident)
    assert closed["dropped"] == 3
    # Only the first drop for a reason is reported; the rest are only counted.
    assert len(running.events("datagrams_dropped", id=ident)) == 1


def test_udp_helper_relays_other_udp(
    start: StartTunnel,
    associate: OpenAssociation,
    dns_server: DnsOverTcpServer,
    udp_echo: UdpEcho,
) -> None:
    running = start("--udp-helper", *dns_via(dns_server))
    association = associate(running)
    ident = association_id(running, association)
    echo_round_trip(association, udp_echo, b"ping")

    # Several back to back (any order back), then big ones.
    payloads = [b"datagram %02d " % number * (number + 1) for number in range(20)]
    for payload in payloads:
        association.send(udp_echo.host, udp_echo.port, payload)
    received = []
    for _ in payloads:
        host, port, data = association.recv(RECV_TIMEOUT)
        assert (host, port) == (udp_echo.host, udp_echo.port)
        received.append(data)
    assert sorted(received) == sorted(ECHO_PREFIX + payload for payload in payloads)
    echo_round_trip(association, udp_echo, bytes(range(256)) * 32)  # 8 KiB
    echo_round_trip(association, udp_echo, b"L" * 60000)

    # DNS in the same association still goes as DNS over TCP, not through the helper.
    assert_resolves(association, KNOWN, 0x0E1F)
    assert dns_server.connections == 1

    # The echo server saw the helper on the server, one socket for everything, and
    # never the client's own socket.
    sources = set(udp_echo.sources)
    assert len(udp_echo.sources) == 1 + len(payloads) + 2
    assert len(sources) == 1
    assert association.local_address not in sources
    closed = close_association(running, association, ident)
    assert "dropped" not in closed
    assert running.events("datagrams_dropped", id=ident) == []
    assert running.events("notice", key="udp-helper") == []


@pytest.mark.skipif(not ipv6_loopback_available(), reason="IPv6 loopback (::1) not available")
def test_udp_helper_relays_to_ipv6(start: StartTunnel, associate: OpenAssociation) -> None:
    # The relay is IPv4 (the listener's family); the datagram and its answer name ::1.
    with UdpEcho(LOOPBACK6) as echo6:
        association = associate(start("--udp-helper"))
        echo_round_trip(association, echo6, b"over six")
        assert len(echo6.sources) == 1


def test_udp_helper_runs_per_association_and_ends_with_it(
    start: StartTunnel,
    associate: OpenAssociation,
    make_sshd: Callable[..., SshdServer],
    udp_echo: UdpEcho,
) -> None:
    server = make_sshd()
    running = start("--udp-helper", server=server)
    assert helper_processes(server) == []
    first, second = associate(running), associate(running)
    first_id, second_id = association_id(running, first), association_id(running, second)
    echo_round_trip(first, udp_echo, b"one")
    echo_round_trip(second, udp_echo, b"two")
    # Each association has its own helper; the echo server saw two different sockets.
    assert len(set(udp_echo.sources)) == 2
    assert len(helper_processes(server)) == 2
    close_association(running, first, first_id)
    assert wait_until(lambda: len(helper_processes(server)) == 1, EVENT_TIMEOUT)
    echo_round_trip(second, udp_echo, b"still here")
    close_association(running, second, second_id)
    assert wait_until(lambda: helper_processes(server) == [], EVENT_TIMEOUT)
    assert running.events("notice", key="udp-helper") == []


def test_udp_helper_that_dies_is_started_anew(
    start: StartTunnel,
    associate: OpenAssociation,
    make_sshd: Callable[..., SshdServer],
    udp_echo: UdpEcho,
) -> None:
    server = make_sshd()
    running = start("--udp-helper", server=server)
    association = associate(running)
    echo_round_trip(association, udp_echo, b"first helper")
    (helper,) = helper_processes(server)
    os.kill(helper, signal.SIGKILL)  # a helper under this test's own private sshd
    assert wait_until(lambda: helper_processes(server) == [], EVENT_TIMEOUT)
    # Nothing tells the client when pytunnel has noticed, and a datagram written to the
    # dying channel is lost, as UDP may be: probe until one comes back (bounded).
    deadline = time.monotonic() + RECV_TIMEOUT
    answer = None
    number = 0
    while answer is None and time.monotonic() < deadline:
        number += 1
        association.send(udp_echo.host, udp_echo.port, b"probe %d" % number)
        with contextlib.suppress(TimeoutError):
            answer = association.recv(1.0)
    assert answer is not None, running.describe()
    host, port, payload = answer
    assert (host, port) == (udp_echo.host, udp_echo.port)
    assert payload.startswith(ECHO_PREFIX + b"probe ")
    assert len(helpers := helper_processes(server)) == 1
    assert helpers[0] != helper
    assert running.events("notice", key="udp-helper") == []


@pytest.mark.parametrize("force_command", ["/bin/false", "echo nope"])
def test_udp_helper_that_cannot_start_leaves_dns_working(
    start: StartTunnel,
    associate: OpenAssociation,
    make_sshd: Callable[..., SshdServer],
    dns_server: DnsOverTcpServer,
    udp_echo: UdpEcho,
    force_command: str,
) -> None:
    # ForceCommand replaces every exec and shell; direct-tcpip (DNS) is not affected.
    server = make_sshd(ForceCommand=force_command)
    running = start("--udp-helper", *dns_via(dns_server), server=server)
    first = associate(running)
    first_id = association_id(running, first)
    first.send(udp_echo.host, udp_echo.port, b"starts the helper")
    notice = running.wait_event("notice", key="udp-helper")
    assert "--udp-helper" in notice["message"]
    # The datagram that waited for the helper is dropped, counted and named.
    dropped = running.wait_event("datagrams_dropped", id=first_id)
    assert "helper" in dropped["reason"]
    assert dropped["destination"] == f"{udp_echo.host}:{udp_echo.port}"
    # Now the helper is known to be down: the next one is dropped at once.
    first.send(udp_echo.host, udp_echo.port, b"while it is down")
    assert_resolves(first, KNOWN, 0x0001)

    # Another association: dropped at once, reported for it too, DNS fine.
    second = associate(running)
    second_id = association_id(running, second)
    second.send(udp_echo.host, udp_echo.port, b"also dropped")
    assert "helper" in running.wait_event("datagrams_dropped", id=second_id)["reason"]
    assert_resolves(second, "ftp.example.test", 0x0002)

    assert close_association(running, second, second_id)["dropped"] == 1
    assert close_association(running, first, first_id)["dropped"] == 2
    assert len(running.events("datagrams_dropped", id=first_id)) == 1
    assert udp_echo.sources == []
    # Said once per run, however many associations try.
    assert len(running.events("notice", key="udp-helper")) == 1


def test_udp_helper_failure_counts_the_datagram_that_started_it(
    start: StartTunnel,
    associate: OpenAssociation,
    make_sshd: Callable[..., SshdServer],
    dns_server: DnsOverTcpServer,
    udp_echo: UdpEcho,
) -> None:
    server = make_sshd(ForceCommand="/bin/false")
    running = start("--udp-helper", *dns_via(dns_server), server=server)
    association = associate(running)
    ident = association_id(running, association)
    association.send(udp_echo.host, udp_echo.port, b"starts the helper")
    running.wait_event("notice", key="udp-helper")
    assert_resolves(association, KNOWN, 0x0003)
    closed = close_association(running, association, ident)
    assert closed.get("dropped", 0) == 1, running.events()


# -- who may send, and what ----------------------------------------------------------------


@pytest.mark.parametrize("foreign_host", [LOOPBACK4, "127.0.0.2"], ids=["other-port", "other-host"])
def test_datagrams_from_a_foreign_source_are_dropped(
    start: StartTunnel,
    associate: OpenAssociation,
    dns_server: DnsOverTcpServer,
    udp_echo: UdpEcho,
    sockets: list[socket.socket],
    foreign_host: str,
) -> None:
    running = start("--udp-helper", *dns_via(dns_server))
    association = associate(running)
    ident = association_id(running, association)
    # DST.PORT was 0: the first datagram locks the client's port in.
    assert_resolves(association, KNOWN, 0x0F01)
    stranger = udp_socket(sockets, foreign_host)
    relay = association.relay
    stranger.sendto(association.datagram(udp_echo.host, udp_echo.port, b"foreign"), relay)
    stranger.sendto(association.datagram(*ADDRESSED, build_query(KNOWN, 0x0F02)), relay)
    dropped = running.wait_event("datagrams_dropped", id=ident)
    assert "other than the association's client" in dropped["reason"]
    # Where it was going, and who sent it.
    assert dropped["destination"] == f"{udp_echo.host}:{udp_echo.port}"
    assert f"from {foreign_host}:{stranger.getsockname()[1]}" in dropped["reason"]
    echo_round_trip(association, udp_echo, b"mine")
    # Had the stranger's query been relayed, its answer (ID 0x0F02) would come first on
    # the same channel, and the server would count it.
    assert_resolves(association, KNOWN, 0x0F03)
    assert dns_server.queries == 2
    assert len(udp_echo.sources) == 1
    assert nothing_waiting(stranger)


def test_request_port_is_the_only_port_accepted(
    start: StartTunnel,
    associate: OpenAssociation,
    dns_server: DnsOverTcpServer,
    sockets: list[socket.socket],
) -> None:
    running = start(*dns_via(dns_server))
    # Pick a port for the client, then let the association's socket take it.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as picker:
        picker.bind((LOOPBACK4, 0))
        port = int(picker.getsockname()[1])
    association = associate(running, expected_source=(LOOPBACK4, port), local_port=port)
    ident = association_id(running, association)
    # A stranger sending first does not get its port locked in.
    stranger = udp_socket(sockets)
    query = association.datagram(*ADDRESSED, build_query(KNOWN, 0x0F03))
    stranger.sendto(query, association.relay)
    dropped = running.wait_event("datagrams_dropped", id=ident)
    assert "other than the association's client" in dropped["reason"]
    assert_resolves(association, KNOWN, 0x0F04)
    assert nothing_waiting(stranger)
    assert dns_server.queries == 1


def test_fragmented_and_malformed_datagrams_are_dropped(
    start: StartTunnel,
    associate: OpenAssociation,
    dns_server: DnsOverTcpServer,
    udp_echo: UdpEcho,
) -> None:
    running = start("--udp-helper", *dns_via(dns_server))
    association = associate(running)
    ident = association_id(running, association)
    echo_round_trip(association, udp_echo, b"before")
    association.send(udp_echo.host, udp_echo.port, b"fragment", frag=1)
    dropped = running.wait_event("datagrams_dropped", id=ident)
    assert "FRAG" in dropped["reason"]
    # Reserved bytes not zero, and a header cut short.
    bad = b"\x00\x01" + association.datagram(udp_echo.host, udp_echo.port, b"rsv")[2:]
    association.udp.sendto(bad, association.relay)
    association.udp.sendto(b"\x00\x00\x00\x01\x7f", association.relay)
    running.wait_events("datagrams_dropped", 2, id=ident)
    echo_round_trip(association, udp_echo, b"after")
    # Nothing but "before" and "after" reached the echo server.
    assert len(udp_echo.sources) == 2
    closed = close_association(running, association, ident)
    assert closed["dropped"] == 3


def test_deny_rules_apply_to_each_datagram(
    start: StartTunnel,
    associate: OpenAssociation,
    dns_server: DnsOverTcpServer,
    udp_echo: UdpEcho,
) -> None:
    running = start("--udp-helper", "--deny", "127.0.0.0/8", *dns_via(dns_server))
    association = associate(running)
    ident = association_id(running, association)
    association.send(udp_echo.host, udp_echo.port, b"denied")
    dropped = running.wait_event("datagrams_dropped", id=ident)
    assert "rules" in dropped["reason"]
    assert dropped["destination"] == f"{udp_echo.host}:{udp_echo.port}"
    # A DNS query addressed to a denied address is refused the same way; one addressed
    # elsewhere (::1, which --dns-server means is never contacted) is answered.
    association.send(*ADDRESSED, build_query(KNOWN, 0x0D01))
    answer = resolve(association, KNOWN, 0x0D02, via=(LOOPBACK6, 53))
    assert answer == DnsAnswer(0x0D02, 0, [RECORDS[KNOWN]])
    assert dns_server.queries == 1
    assert udp_echo.sources == []
    assert close_association(running, association, ident)["dropped"] == 2


# -- the association's life ----------------------------------------------------------------


def test_closing_the_control_connection_ends_the_association(
    start: StartTunnel, associate: OpenAssociation, dns_server: DnsOverTcpServer
) -> None:
    running = start(*dns_via(dns_server))
    association = associate(running)
    ident = association_id(running, association)
    assert_resolves(association, KNOWN, 0x0C01)
    relay_host, relay_port = association.relay
    assert not udp_port_free(relay_host, relay_port)
    closed = close_association(running, association, ident)
    assert (closed["host"], closed["port"]) == association.relay
    # The relay socket goes with it (closing a transport completes on a later loop pass).
    assert wait_until(lambda: udp_port_free(relay_host, relay_port), EVENT_TIMEOUT)
    # The tunnel itself carries on.
    assert_resolves(associate(running), KNOWN, 0x0C02)


def test_association_outlives_the_handshake_timeout(
    start: StartTunnel, associate: OpenAssociation, dns_server: DnsOverTcpServer
) -> None:
    running = start("--handshake-timeout", "0.5", *dns_via(dns_server))
    association = associate(running)
    ident = association_id(running, association)
    # A client that never sends a request is closed by the handshake timeout...
    with connect_proxy(running.address) as idle:
        running.wait_event("client_rejected", client=client_name(idle))
        assert closed_by_peer(idle) == b""
    # ...by which time the association, whose control connection is just as quiet, has
    # long passed its own: it must still be there.
    assert_resolves(association, KNOWN, 0x7111)
    assert running.events("connection_closed", id=ident) == []


def test_socks4_has_no_udp_associate(start: StartTunnel) -> None:
    running = start()
    with connect_proxy(running.address) as sock:
        client = client_name(sock)
        sock.sendall(socks4_request(LOOPBACK4, 53, command=3))
        reply = recv_exact(sock, 8)
        assert reply[:2] == b"\x00\x5b"  # VN 0, CD 91: rejected or failed
        assert closed_by_peer(sock) == b""
    rejected = running.wait_event("client_rejected", client=client)
    assert "command" in rejected["reason"]
    assert running.events("request_parsed", client=client) == []


@pytest.mark.skipif(not ipv6_loopback_available(), reason="IPv6 loopback (::1) not available")
def test_ipv6_listener_relays_on_ipv6(
    start: StartTunnel, associate: OpenAssociation, dns_server: DnsOverTcpServer
) -> None:
    running = start(*dns_via(dns_server), listen=f"[{LOOPBACK6}]:0")
    association = associate(running)
    assert association.relay[0] == LOOPBACK6
    assert association.udp.family == socket.AF_INET6
    assert_resolves(association, KNOWN, 0x0601)


# -- in-process: a DNS answer that comes after its query timed out -------------------------


class HeldDnsServer:
    """DNS over TCP in the test's event loop that answers only when told to."""

    def __init__(self) -> None:
        self.queries: asyncio.Queue[tuple[asyncio.StreamWriter, bytes]] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, LOOPBACK4, 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                self.queries.put_nowait((writer, await reader.readexactly(size)))

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), JOIN_TIMEOUT)


@contextlib.asynccontextmanager
async def in_process_udp_proxy(
    sshd: SshdServer, log: EventLog, dns_server: tuple[str, int]
) -> AsyncIterator[tuple[udp_module.UdpSettings, events.Listener]]:
    """pytunnel's UDP ASSOCIATE in this event loop, through the real sshd, with its DNS
    sent to ``dns_server``: the settings (to look at its links) and the listener."""
    session = Session(sshd_config(sshd), log)
    proxy: ProxyServer | None = None
    try:
        await asyncio.wait_for(session.connect(), RECV_TIMEOUT)
        settings = udp_module.UdpSettings(
            upstream=SshUpstream(session),
            runner=session,
            rules=Rules(),
            emit=log,
            dns_server=dns_server,
        )
        proxy = ProxyServer(SshUpstream(session), log, udp=settings)
        yield settings, (await proxy.listen([(LOOPBACK4, 0)]))[0]
    finally:
        if proxy is not None:
            await proxy.close()
        await session.close()


async def test_in_process_late_dns_answer_is_still_passed_on(
    sshd: SshdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short, so the query surely times out before the test lets the server answer.
    monkeypatch.setattr(udp_module, "DNS_TIMEOUT", 0.2)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    log = EventLog()
    held = HeldDnsServer()
    try:
        dns_address = await held.start()
        async with in_process_udp_proxy(sshd, log, dns_address) as (_, listener):
            association = await asyncio.to_thread(Socks5Udp.open, listener.host, listener.port)
            try:
                assert association.reply_code == 0
                association.send(*ADDRESSED, build_query(KNOWN, 0x1A7E))
                writer, query = await asyncio.wait_for(held.queries.get(), RECV_TIMEOUT)
                dropped = await log.first(events.DatagramsDropped, UNANSWERED_TIMEOUT)
                assert dropped.reason == udp_module.Drop.DNS_TIMEOUT
                assert dropped.connection.dropped == 1

                # Now answer: the client's resolver may still want it, so it is passed on.
                writer.write(frame_tcp(dns_response(query, RECORDS) or b""))
                host, port, payload = await asyncio.to_thread(association.recv, RECV_TIMEOUT)
                assert (host, port) == ADDRESSED
                assert parse_response(payload) == DnsAnswer(0x1A7E, 0, [RECORDS[KNOWN]])
                assert dropped.connection.bytes_down == len(payload)
            finally:
                association.close()
            closed = await log.first(events.ConnectionClosed, EVENT_TIMEOUT)
            assert closed.connection.dropped == 1
    finally:
        await held.close()


class AnsweringDnsServer:
    """DNS over TCP in the test's event loop that answers at once and reports each
    connection's end."""

    def __init__(self) -> None:
        self.opened = 0
        self.ended: asyncio.Queue[None] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, LOOPBACK4, 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self._writers.append(writer)
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    query = await reader.readexactly(size)
                    writer.write(frame_tcp(dns_response(query, RECORDS) or b""))
        finally:
            self.ended.put_nowait(None)

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), JOIN_TIMEOUT)


async def test_in_process_idle_dns_link_is_closed_and_opened_again_when_needed(
    sshd: SshdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short, so the test need not wait the real 30 s; the waits below are on events.
    monkeypatch.setattr(udp_module, "LINK_IDLE", 0.2)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    log = EventLog()
    server = AnsweringDnsServer()
    try:
        dns_address = await server.start()
        async with in_process_udp_proxy(sshd, log, dns_address) as (settings, listener):
            association = await asyncio.to_thread(Socks5Udp.open, listener.host, listener.port)
            try:
                assert association.reply_code == 0
                for qid in (0x1D1E, 0x1D1F):
                    association.send(*ADDRESSED, build_query(KNOWN, qid))
                    where = await asyncio.to_thread(association.recv, RECV_TIMEOUT)
                    assert where[:2] == ADDRESSED
                    assert parse_response(where[2]) == DnsAnswer(qid, 0, [RECORDS[KNOWN]])
                    # Quiet now: pytunnel closes the channel, and the server sees it end.
                    await asyncio.wait_for(server.ended.get(), EVENT_TIMEOUT)
                    assert settings.links == 0
                # Each query after a quiet spell came over a channel of its own.
                assert server.opened == 2
            finally:
                association.close()
    finally:
        await server.close()
