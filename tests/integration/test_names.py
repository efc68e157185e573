"""Names from the network, end to end: the real console script, raw SOCKS and HTTP bytes.

Unicode spellings of a denied host (``１２７.０.０.１``, ``127。0。0。1``, ``ｌｏｃａｌｈｏｓｔ``)
are refused by the rules before any channel is asked for, on ``-D`` (the in-process
asyncssh server, which records every destination it is asked for) and on ``-R`` (the real
sshd; there pytunnel itself would connect, with Python's IDNA-mapping resolver). Allowed
names reach the server in their normal form (A-labels, the dotted quad). Names with
control characters are refused, and no raw control byte reaches stderr, an ``-E`` file or
the JSON stream.

No lookup leaves the process: refused names are refused before any, the asyncssh server
answers every name itself (its echo port never resolves), and the ``-R`` tests send only
spellings of 127.0.0.1 and ``localhost`` (in /etc/hosts).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.asyncssh_server import PORT_ECHO, AsyncsshServer
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    Running,
    closed_by_peer,
    connect_proxy,
    recv_all,
    recv_exact,
    server_args,
    socks4_request,
    socks5_greeting,
    socks5_open,
    socks5_request,
)
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget
from fixtures.udp_targets import Socks5Udp, build_query

pytestmark = pytest.mark.timeout(90)

REPLY_NOT_ALLOWED = 0x02
REPLY_HOST_UNREACHABLE = 0x04
SOCKS4_REJECTED = 91
DENY_LOOPBACK = ["--deny", "127.0.0.0/8", "--deny", "localhost"]

# How a client can spell 127.0.0.1 or localhost so that a resolver with IDNA (UTS 46 or
# IDNA 2003 nameprep, as Python's socket module does) still reaches 127.0.0.1.
LOOPBACK_SPELLINGS = [
    ("fullwidth-digits", "１２７.０.０.１", "127.0.0.1"),
    ("ideographic-full-stop", "127。0。0。1", "127.0.0.1"),
    ("fullwidth-full-stop", "１２７．０．０．１", "127.0.0.1"),
    ("fullwidth-hex", "０ｘ７ｆ.１", "127.0.0.1"),
    ("fullwidth-letters", "ｌｏｃａｌｈｏｓｔ", "localhost"),
    ("upper-case-trailing-dot", "LocalHost.", "localhost"),
]
HOSTILE_NAME = "evil\x1b]0;pwned\x07.example\nforged line \x1b[6n"
HOSTILE_USER = "\x1b]0;pwned\x07\nforged user"
RAW_CONTROLS = ("\x1b", "\x07", "\x9b")


def socks5_name_request(name: str, port: int, command: int = 1) -> bytes:
    """A DOMAINNAME request with the name's UTF-8 bytes as they are (no IDNA here)."""
    raw = name.encode("utf-8", "surrogatepass")
    return bytes((5, command, 0, 3, len(raw))) + raw + struct.pack("!H", port)


def socks5_reply_to(proxy: tuple[str, int], request: bytes) -> bytes:
    with connect_proxy(proxy) as sock:
        sock.sendall(socks5_greeting())
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(request)
        reply = recv_exact(sock, 10)
        closed_by_peer(sock)
    return reply


def asked_for(server: AsyncsshServer, since: int) -> list[tuple[str, int]]:
    return server.requests_snapshot()[since:]


def barrier(tunnel: Running, server: AsyncsshServer) -> None:
    """An allowed request after the ones under test: once the server has seen it, it has
    seen everything pytunnel was ever going to ask for before it."""
    sock, reply = socks5_open(tunnel.address, "barrier.example", PORT_ECHO)
    with sock:
        assert reply[1] == 0, tunnel.describe()


@pytest.fixture
def deny_loopback(pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer) -> Running:
    return pytunnel_factory(["-D", "127.0.0.1:0", *DENY_LOOPBACK, *server_args(asyncssh_server)])


@pytest.mark.parametrize(
    ("name", "normal"),
    [case[1:] for case in LOOPBACK_SPELLINGS],
    ids=[case[0] for case in LOOPBACK_SPELLINGS],
)
def test_unicode_spellings_of_a_denied_host_are_refused(
    deny_loopback: Running, asyncssh_server: AsyncsshServer, name: str, normal: str
) -> None:
    since = len(asyncssh_server.requests_snapshot())
    reply = socks5_reply_to(deny_loopback.address, socks5_name_request(name, PORT_ECHO))
    assert reply[1] == REPLY_NOT_ALLOWED, deny_loopback.describe()
    failed = deny_loopback.wait_event("channel_failed", port=PORT_ECHO, host=normal)
    assert failed["reason"].startswith("denied by --deny ")

    with connect_proxy(deny_loopback.address) as sock:
        sock.sendall(socks4_request(name, PORT_ECHO))
        assert recv_exact(sock, 8)[1] == SOCKS4_REJECTED

    barrier(deny_loopback, asyncssh_server)
    assert asked_for(asyncssh_server, since) == [("barrier.example", PORT_ECHO)]


def test_bind_and_udp_associate_meet_the_same_normal_form(deny_loopback: Running) -> None:
    # BIND's DST.ADDR is checked against the rules before the server is asked to listen.
    reply = socks5_reply_to(deny_loopback.address, socks5_name_request("１２７.０.０.１", 0, 2))
    assert reply[1] == REPLY_NOT_ALLOWED
    failed = deny_loopback.wait_event("channel_failed", host="127.0.0.1")
    assert failed["reason"].startswith("denied by --deny ")
    # UDP ASSOCIATE names the client's own address; one with controls is no name either.
    reply = socks5_reply_to(deny_loopback.address, socks5_name_request(HOSTILE_NAME, 0, 3))
    assert reply[1] == REPLY_HOST_UNREACHABLE


def test_an_ipv4_mapped_address_meets_the_ipv4_rules(
    deny_loopback: Running, asyncssh_server: AsyncsshServer
) -> None:
    since = len(asyncssh_server.requests_snapshot())
    reply = socks5_reply_to(deny_loopback.address, socks5_request("::ffff:127.0.0.1", PORT_ECHO))
    assert reply[1] == REPLY_NOT_ALLOWED
    barrier(deny_loopback, asyncssh_server)
    assert asked_for(asyncssh_server, since) == [("barrier.example", PORT_ECHO)]


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        ("１２７.０.０.１", "127.0.0.1"),
        ("Bücher.Example.", "xn--bcher-kva.example"),
        ("ｅｘａｍｐｌｅ。ｔｅｓｔ", "example.test"),
        ("0x7f.1", "127.0.0.1"),
    ],
    ids=["fullwidth-address", "idn", "fullwidth-name", "inet-aton"],
)
def test_allowed_names_reach_the_server_in_normal_form(
    pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer, name: str, normal: str
) -> None:
    tunnel = pytunnel_factory(
        ["-D", "127.0.0.1:0", "--deny", "10.0.0.0/8", *server_args(asyncssh_server)]
    )
    since = len(asyncssh_server.requests_snapshot())
    # The echo port is answered by the server itself, whatever the name: no lookup.
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks5_greeting())
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(socks5_name_request(name, PORT_ECHO))
        assert recv_exact(sock, 10)[1] == 0, tunnel.describe()
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"ping"
    assert asked_for(asyncssh_server, since) == [(normal, PORT_ECHO)]
    assert tunnel.wait_event("request_parsed", port=PORT_ECHO)["host"] == normal


@pytest.mark.parametrize(
    "name",
    [HOSTILE_NAME, "a..example", "bad\u202eexample", "⒈.example"],
    ids=["control-characters", "empty-label", "bidi-override", "idna-disallowed"],
)
def test_names_without_a_normal_form_are_refused(
    deny_loopback: Running, asyncssh_server: AsyncsshServer, name: str
) -> None:
    since = len(asyncssh_server.requests_snapshot())
    reply = socks5_reply_to(deny_loopback.address, socks5_name_request(name, PORT_ECHO))
    assert reply[1] == REPLY_HOST_UNREACHABLE
    with connect_proxy(deny_loopback.address) as sock:
        sock.sendall(socks4_request(name, PORT_ECHO))
        assert recv_exact(sock, 8)[1] == SOCKS4_REJECTED
    failed = deny_loopback.wait_event("channel_failed", port=PORT_ECHO)
    assert failed["reason"].startswith("refused: ")
    for text in (failed["reason"], failed["host"]):
        assert not any(char in text for char in (*RAW_CONTROLS, "\n", "\u202e"))
    barrier(deny_loopback, asyncssh_server)
    assert asked_for(asyncssh_server, since) == [("barrier.example", PORT_ECHO)]


def http_status(proxy: tuple[str, int], request: bytes) -> bytes:
    with connect_proxy(proxy) as sock:
        sock.sendall(request)
        head = recv_all(sock).split(b"\r\n", 1)[0]
    return head


def test_http_requests_meet_the_same_normal_form(
    deny_loopback: Running, asyncssh_server: AsyncsshServer
) -> None:
    since = len(asyncssh_server.requests_snapshot())
    for target in (b"a..example:10", b"LocalHost.:10", b"0x7f.1:10"):
        request = b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n"
        status = http_status(deny_loopback.address, request)
        expected = b"400" if target.startswith(b"a..") else b"403"
        assert status.split(b" ")[1] == expected, (target, status)
    forward = b"GET http://a..example:10/ HTTP/1.1\r\nHost: a..example:10\r\n\r\n"
    assert http_status(deny_loopback.address, forward).split(b" ")[1] == b"400"
    barrier(deny_loopback, asyncssh_server)
    assert asked_for(asyncssh_server, since) == [("barrier.example", PORT_ECHO)]


def raw_datagram(name: str, port: int, payload: bytes) -> bytes:
    raw = name.encode()
    return b"\x00\x00\x00\x03" + bytes((len(raw),)) + raw + struct.pack("!H", port) + payload


def test_udp_datagrams_meet_the_same_normal_form(
    deny_loopback: Running, asyncssh_server: AsyncsshServer
) -> None:
    since = len(asyncssh_server.requests_snapshot())
    host, port = deny_loopback.address
    with Socks5Udp.open(host, port) as association:
        assert association.reply_code == 0
        relay = (host, association.relay[1])
        query = build_query("www.example.test", 0x4E01)
        association.udp.sendto(raw_datagram("１２７.０.０.１", 53, query), relay)
        dropped = deny_loopback.wait_event("datagrams_dropped")
        assert "rules" in dropped["reason"]
        assert dropped["destination"] == "127.0.0.1:53"
        association.udp.sendto(raw_datagram(HOSTILE_NAME, 53, query), relay)
        bad = deny_loopback.wait_event("datagrams_dropped", destination="?")
        assert "not a valid host name" in bad["reason"]
        # An allowed name goes to the server as its A-label; the server refuses it
        # without a lookup, so the query is reported undeliverable.
        association.udp.sendto(raw_datagram("Bücher.Example", 53, query), relay)
        failed = deny_loopback.wait_event(
            "datagrams_dropped", destination="xn--bcher-kva.example:53"
        )
        assert "DNS over TCP" in failed["reason"]
    assert asked_for(asyncssh_server, since) == [("xn--bcher-kva.example", 53)]


@pytest.mark.parametrize("where", ["stderr", "log-file"])
def test_hostile_text_reaches_no_output_raw(
    pytunnel_factory: PytunnelFactory,
    asyncssh_server: AsyncsshServer,
    tmp_path: Path,
    where: str,
) -> None:
    log_file = tmp_path / "pytunnel.log"
    extra = ["-E", str(log_file)] if where == "log-file" else []
    tunnel = pytunnel_factory(
        [
            "-v",
            "-D",
            "127.0.0.1:0",
            "--proxy-auth",
            "tester",
            *extra,
            *server_args(asyncssh_server),
        ],
        env={"PYTUNNEL_PROXY_PASSWORD": "secret"},
    )
    # A SOCKS5 user name with controls (and the wrong password)...
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks5_greeting(b"\x02"))
        assert recv_exact(sock, 2) == b"\x05\x02"
        user = HOSTILE_USER.encode()
        sock.sendall(bytes((1, len(user))) + user + b"\x05wrong")
        assert recv_exact(sock, 2)[1] != 0
    # ...and a destination name with controls, from a client that logged in.
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks5_greeting(b"\x02"))
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01\x06tester\x06secret")
        assert recv_exact(sock, 2) == b"\x01\x00"
        sock.sendall(socks5_name_request(HOSTILE_NAME, PORT_ECHO))
        assert recv_exact(sock, 10)[1] == REPLY_HOST_UNREACHABLE
    tunnel.wait_event("client_rejected")
    tunnel.wait_event("channel_failed", port=PORT_ECHO)
    tunnel.stop()

    human = log_file.read_text("utf-8") if where == "log-file" else tunnel.stderr_text()
    assert "control character in host name" in human, human
    assert "\\x1b]0;pwned\\x07" in human  # shown, escaped
    lines = [tunnel.stdout_text(), human]
    for text in lines:
        for raw in RAW_CONTROLS:
            assert raw not in text, (raw, text)
        assert not any(line.startswith("forged") for line in text.splitlines())
    # JSON escapes every control character: a line is one event, printable ASCII.
    for line in tunnel.stdout_text().splitlines():
        assert all(0x20 <= ord(char) < 0x7F for char in line), line


# -- -R: pytunnel itself connects, with a resolver that maps Unicode ---------------------


@pytest.fixture
def reverse_denying(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer
) -> Callable[..., tuple[Running, tuple[str, int]]]:
    def start(*rules: str) -> tuple[Running, tuple[str, int]]:
        tunnel = pytunnel_factory([*rules, "-R", "0", *server_args(sshd)])
        [remote] = [item for item in tunnel.ready["listeners"] if item["remote"]]
        return tunnel, (str(remote["host"]), int(remote["port"]))

    return start


def test_reverse_refuses_unicode_spellings_of_a_denied_host(
    reverse_denying: Callable[..., tuple[Running, tuple[str, int]]], echo_target: EchoTarget
) -> None:
    tunnel, address = reverse_denying(*DENY_LOOPBACK)
    # Only spellings that an unfixed pytunnel would have resolved without DNS (literals
    # and "localhost", in /etc/hosts): this test must not leak a lookup even then.
    spellings = [case for case in LOOPBACK_SPELLINGS if not case[1].endswith(".")]
    for _, name, normal in spellings:
        reply = socks5_reply_to(address, socks5_name_request(name, echo_target.port))
        assert reply[1] == REPLY_NOT_ALLOWED, (name, tunnel.describe())
        failed = tunnel.wait_event("channel_failed", host=normal, port=echo_target.port)
        assert failed["reason"].startswith("denied by --deny ")
    # The listener serves what the rules allow (the echo target is on 127.0.0.1 too).
    allowed, address = reverse_denying("--deny", "localhost")
    sock, reply = socks5_open(address, "１２７.０.０.１", echo_target.port)
    with sock:
        assert reply[1] == 0, allowed.describe()
        sock.sendall(b"allowed")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"allowed")
