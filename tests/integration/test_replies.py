"""Honest SOCKS replies, end to end: the real console script, raw SOCKS bytes on sockets.

pytunnel answers only once the SSH channel-open result is known, with the reply code that
matches the failure (DESIGN.md, "Honest SOCKS replies"), then closes the client. These tests
send requests by hand, read the exact reply bytes, and check the JSON event stream.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Iterator

import pytest
from fixtures.asyncssh_server import (
    FAILURES,
    PORT_DROP_CONNECTION,
    PORT_ECHO,
    PORT_NEVER_ANSWER,
    AsyncsshServer,
)
from fixtures.net import free_port, ipv6_loopback_available
from fixtures.pytunnel_proc import (
    Running,
    client_name,
    closed_by_peer,
    connect_proxy,
    recv_all,
    recv_exact,
    running_pytunnel,
    server_args,
    socks4_request,
    socks5_greeting,
    socks5_open,
    socks5_request,
)
from fixtures.replies import SOCKS4_FAILED, SOCKS4_OK, SOCKS5_OK, socks5_failure
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget, TalkerTarget

pytestmark = pytest.mark.timeout(60)

# A name getaddrinfo rejects without asking any DNS server (the empty label cannot be
# encoded in a query), so the test stays on loopback; sshd answers "Name or service not
# known", exactly as for a name that does not exist.
UNRESOLVABLE = "nonexistent..invalid"
OPEN_TIMEOUT = 1  # --open-timeout for the asyncssh tunnel (the never-answer port)
UNUSED_PORT = 65001  # never opened by the asyncssh fixture unless pytunnel asks for it
QUIET_WINDOW = 1.0  # how long we listen for a premature reply (none may ever come)
SOCKS_WAIT = 20.0  # SYN retransmission backs off (1 s, 2 s, 4 s ...)


@pytest.fixture(scope="module")
def sshd_tunnel(sshd: SshdServer) -> Iterator[Running]:
    with running_pytunnel(["-D", "127.0.0.1:0", *server_args(sshd)]) as running:
        yield running


@pytest.fixture(scope="module")
def magic_tunnel(asyncssh_server: AsyncsshServer) -> Iterator[Running]:
    args = ["--open-timeout", str(OPEN_TIMEOUT), "-D", "127.0.0.1:0"]
    with running_pytunnel([*args, *server_args(asyncssh_server)]) as running:
        yield running


def socks5_exchange(
    tunnel: Running, request: bytes, reply_size: int = 10
) -> tuple[bytes, bytes, str]:
    """Greeting + one request; returns (reply, what came after it until close, client)."""
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks5_greeting())
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(request)
        reply = recv_exact(sock, reply_size)
        rest = closed_by_peer(sock)
        return reply, rest, client_name(sock)


def socks4_exchange(tunnel: Running, request: bytes) -> tuple[bytes, bytes, str]:
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(request)
        reply = recv_exact(sock, 8)
        rest = closed_by_peer(sock)
        return reply, rest, client_name(sock)


# -- the real OpenSSH sshd -----------------------------------------------------------------


def test_sshd_closed_port_socks5_is_connection_refused(
    sshd_tunnel: Running, closed_port: int
) -> None:
    reply, rest, client = socks5_exchange(sshd_tunnel, socks5_request("127.0.0.1", closed_port))
    assert reply == socks5_failure(0x05)
    assert rest == b""  # closed by pytunnel, nothing after the reply
    event = sshd_tunnel.wait_event("channel_failed", client=client)
    assert (event["host"], event["port"], event["reply"]) == ("127.0.0.1", closed_port, 5)
    # OpenSSH's own strerror() text, kept as the server sent it.
    assert event["reason"] == "Connection refused"


def test_sshd_closed_port_socks4_is_rejected(sshd_tunnel: Running, closed_port: int) -> None:
    reply, rest, client = socks4_exchange(sshd_tunnel, socks4_request("127.0.0.1", closed_port))
    assert reply[:2] == SOCKS4_FAILED
    assert rest == b""
    event = sshd_tunnel.wait_event("channel_failed", client=client)
    assert event["reply"] == 5
    assert "refused" in event["reason"].lower()


def test_sshd_closed_port_socks4a_name_is_rejected(sshd_tunnel: Running, closed_port: int) -> None:
    reply, rest, client = socks4_exchange(sshd_tunnel, socks4_request("localhost", closed_port))
    assert reply[:2] == SOCKS4_FAILED
    assert rest == b""
    event = sshd_tunnel.wait_event("channel_failed", client=client)
    assert (event["host"], event["reply"]) == ("localhost", 5)


def test_sshd_unresolvable_name_is_host_unreachable(sshd_tunnel: Running) -> None:
    reply, rest, client = socks5_exchange(sshd_tunnel, socks5_request(UNRESOLVABLE, 80))
    assert reply == socks5_failure(0x04)
    assert rest == b""
    event = sshd_tunnel.wait_event("channel_failed", client=client)
    assert (event["host"], event["reply"]) == (UNRESOLVABLE, 4)
    assert event["reason"]  # the server's gai_strerror() text, whatever its wording


def test_sshd_unresolvable_name_socks4a(sshd_tunnel: Running) -> None:
    reply, rest, _ = socks4_exchange(sshd_tunnel, socks4_request(UNRESOLVABLE, 80))
    assert reply[:2] == SOCKS4_FAILED
    assert rest == b""


def _connect_nowait(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        sock.connect(("127.0.0.1", port))
    return sock


def _connected(sock: socket.socket, timeout: float) -> bool:
    _, writable, _ = select.select([], [sock], [], timeout)
    return bool(writable) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


@pytest.mark.slow
def test_sshd_success_reply_only_after_the_target_accepted(sshd_tunnel: Running) -> None:
    # A target whose accept queue is full drops SYNs, so sshd's connect() hangs and the
    # channel stays unconfirmed: an honest proxy says nothing until we make room.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        filler = _connect_nowait(port)
        probe = _connect_nowait(port)
        try:
            assert _connected(filler, SOCKS_WAIT), "could not fill the accept queue"
            if _connected(probe, 0.5):
                pytest.skip("this kernel does not hold SYNs back on a full accept queue")
        finally:
            probe.close()
        with connect_proxy(sshd_tunnel.address) as sock:
            client = client_name(sock)
            sock.sendall(socks5_greeting() + socks5_request("127.0.0.1", port))
            assert recv_exact(sock, 2) == b"\x05\x00"
            sshd_tunnel.wait_event("request_parsed", client=client)
            sock.settimeout(QUIET_WINDOW)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # sshd is still connecting: no reply of any kind yet
            assert not sshd_tunnel.events("channel_opened", client=client)
            # Make room: sshd's next SYN gets in, the channel opens, the reply follows.
            listener.accept()[0].close()
            filler.close()
            assert recv_exact(sock, 10, timeout=SOCKS_WAIT) == SOCKS5_OK
            listener.settimeout(SOCKS_WAIT)
            peer, _ = listener.accept()
            with peer:
                peer.sendall(b"ping")
                assert recv_exact(sock, 4) == b"ping"
                sock.sendall(b"pong")
                assert recv_exact(peer, 4) == b"pong"
    event = sshd_tunnel.wait_event("channel_opened", client=client)
    assert (event["host"], event["port"]) == ("127.0.0.1", port)


def test_sshd_nothing_overtakes_the_success_reply(
    sshd_tunnel: Running, talker_target: TalkerTarget
) -> None:
    # The target speaks first; its greeting must come after the reply, never before it.
    with connect_proxy(sshd_tunnel.address) as sock:
        sock.sendall(socks5_greeting() + socks5_request("127.0.0.1", talker_target.port))
        data = recv_all(sock)
    assert data == b"\x05\x00" + SOCKS5_OK + TalkerTarget.greeting


def test_sshd_socks4_success_then_data(sshd_tunnel: Running, echo_target: EchoTarget) -> None:
    with connect_proxy(sshd_tunnel.address) as sock:
        sock.sendall(socks4_request("127.0.0.1", echo_target.port, user=b"someone"))
        assert recv_exact(sock, 8)[:2] == SOCKS4_OK
        sock.sendall(b"socks4 payload")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"socks4 payload")


# -- the asyncssh server's magic ports -------------------------------------------------------

# destination port -> SOCKS5 REP (DESIGN.md's table)
MAGIC_REPLIES = {1: 0x05, 2: 0x02, 5: 0x04, 6: 0x03, 7: 0x06, 8: 0x04, 9: 0x01}


@pytest.mark.parametrize(("port", "rep"), sorted(MAGIC_REPLIES.items()))
def test_magic_port_socks5_reply(
    magic_tunnel: Running, asyncssh_server: AsyncsshServer, port: int, rep: int
) -> None:
    reply, rest, client = socks5_exchange(magic_tunnel, socks5_request("127.0.0.1", port))
    assert reply == socks5_failure(rep)
    assert rest == b""
    event = magic_tunnel.wait_event("channel_failed", client=client)
    assert (event["host"], event["port"], event["reply"]) == ("127.0.0.1", port, rep)
    assert event["reason"] == FAILURES[port][1]  # the server's own text, untouched
    assert event["reply_label"]
    assert ("127.0.0.1", port) in asyncssh_server.requests_snapshot()


@pytest.mark.parametrize("port", sorted(MAGIC_REPLIES))
def test_magic_port_socks4_reply(magic_tunnel: Running, port: int) -> None:
    reply, rest, client = socks4_exchange(magic_tunnel, socks4_request("127.0.0.1", port))
    assert reply[:2] == SOCKS4_FAILED
    assert rest == b""
    event = magic_tunnel.wait_event("channel_failed", client=client)
    assert event["reply"] == MAGIC_REPLIES[port]
    assert event["reason"] == FAILURES[port][1]


def test_magic_port_with_a_name_socks5(magic_tunnel: Running) -> None:
    reply, rest, client = socks5_exchange(magic_tunnel, socks5_request("localhost", 1))
    assert reply == socks5_failure(0x05)
    assert rest == b""
    event = magic_tunnel.wait_event("channel_failed", client=client)
    assert (event["host"], event["reply"]) == ("localhost", 5)


def test_never_answered_open_times_out_with_ttl_expired(magic_tunnel: Running) -> None:
    # The first thing after the method selection is the failure: no early "succeeded".
    reply, rest, client = socks5_exchange(
        magic_tunnel, socks5_request("127.0.0.1", PORT_NEVER_ANSWER)
    )
    assert reply == socks5_failure(0x06)
    assert rest == b""
    event = magic_tunnel.wait_event("channel_failed", client=client)
    assert (event["port"], event["reply"]) == (PORT_NEVER_ANSWER, 6)
    assert str(OPEN_TIMEOUT) in event["reason"]


def test_never_answered_open_socks4(magic_tunnel: Running) -> None:
    reply, rest, _ = socks4_exchange(magic_tunnel, socks4_request("127.0.0.1", PORT_NEVER_ANSWER))
    assert reply[:2] == SOCKS4_FAILED
    assert rest == b""


def test_session_dropped_during_open_is_general_failure(
    tunnel_asyncssh: Running, echo_target: EchoTarget
) -> None:
    # Port 4 makes the server abort the whole SSH connection instead of answering.
    reply, rest, client = socks5_exchange(
        tunnel_asyncssh, socks5_request("127.0.0.1", PORT_DROP_CONNECTION)
    )
    assert reply == socks5_failure(0x01)
    assert rest == b""
    event = tunnel_asyncssh.wait_event("channel_failed", client=client)
    assert event["reply"] == 1
    # The tunnel survives the loss: the next request is served once it is back.
    sock, reply = socks5_open(tunnel_asyncssh.address, "127.0.0.1", echo_target.port, timeout=30)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"again")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"again")


def test_magic_echo_port_succeeds(magic_tunnel: Running) -> None:
    sock, reply = socks5_open(magic_tunnel.address, "127.0.0.1", PORT_ECHO)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"echo me")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"echo me"


def test_socks5_bind_refused_by_the_server(
    magic_tunnel: Running, asyncssh_server: AsyncsshServer
) -> None:
    # The asyncssh test server refuses tcpip-forward, as AllowTcpForwarding local does:
    # the first BIND reply says "not allowed" (0x02), and the reason says what to check.
    request = socks5_request("127.0.0.1", UNUSED_PORT, command=2)
    reply, rest, client = socks5_exchange(magic_tunnel, request)
    assert reply == socks5_failure(0x02)
    assert rest == b""
    event = magic_tunnel.wait_event("channel_failed", client=client)
    assert event["reply"] == 2
    assert "AllowTcpForwarding" in event["reason"]
    # Nothing was asked of the peer's address: only a listener was requested.
    assert ("127.0.0.1", UNUSED_PORT) not in asyncssh_server.requests_snapshot()


def test_socks5_udp_associate_gets_a_relay(magic_tunnel: Running) -> None:
    with connect_proxy(magic_tunnel.address) as sock:
        sock.sendall(b"\x05\x01\x00" + socks5_request("0.0.0.0", 0, command=3))
        assert recv_exact(sock, 2) == b"\x05\x00"
        reply = recv_exact(sock, 10)
        assert reply[:4] == b"\x05\x00\x00\x01"
        assert reply[4:8] == bytes([127, 0, 0, 1])
        assert int.from_bytes(reply[8:10]) != 0


def test_socks5_unknown_command(magic_tunnel: Running) -> None:
    reply, rest, _ = socks5_exchange(
        magic_tunnel, socks5_request("127.0.0.1", UNUSED_PORT, command=0x09)
    )
    assert reply == socks5_failure(0x07)
    assert rest == b""


def test_socks4_bind_refused_by_the_server(
    magic_tunnel: Running, asyncssh_server: AsyncsshServer
) -> None:
    reply, rest, _ = socks4_exchange(
        magic_tunnel, socks4_request("127.0.0.1", UNUSED_PORT, command=2)
    )
    assert reply[:2] == SOCKS4_FAILED
    assert rest == b""
    assert ("127.0.0.1", UNUSED_PORT) not in asyncssh_server.requests_snapshot()


def test_socks5_unknown_address_type(magic_tunnel: Running) -> None:
    request = b"\x05\x01\x00\x05" + b"\x7f\x00\x00\x01" + UNUSED_PORT.to_bytes(2)
    reply, rest, client = socks5_exchange(magic_tunnel, request)
    assert reply == socks5_failure(0x08)
    assert rest == b""
    event = magic_tunnel.wait_event("client_rejected", client=client)
    assert "address type" in event["reason"]


MALFORMED = {
    "empty-name": b"\x05\x01\x00\x03\x00" + UNUSED_PORT.to_bytes(2),
    "nul-in-name": b"\x05\x01\x00\x03\x03a\x00b" + UNUSED_PORT.to_bytes(2),
    "reserved-not-zero": b"\x05\x01\x07\x01\x7f\x00\x00\x01" + UNUSED_PORT.to_bytes(2),
    "wrong-request-version": b"\x04\x01\x00\x01\x7f\x00\x00\x01" + UNUSED_PORT.to_bytes(2),
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
def test_socks5_malformed_request_is_general_failure(
    magic_tunnel: Running, asyncssh_server: AsyncsshServer, request_bytes: bytes
) -> None:
    reply, rest, client = socks5_exchange(magic_tunnel, request_bytes)
    assert reply == socks5_failure(0x01)
    assert rest == b""
    magic_tunnel.wait_event("client_rejected", client=client)
    assert ("127.0.0.1", UNUSED_PORT) not in asyncssh_server.requests_snapshot()


def test_sshd_closed_port_ipv6_destination(sshd_tunnel: Running) -> None:
    if not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback")
    reply, rest, client = socks5_exchange(sshd_tunnel, socks5_request("::1", free_port("::1")))
    assert reply == socks5_failure(0x05)
    assert rest == b""
    event = sshd_tunnel.wait_event("channel_failed", client=client)
    assert (event["host"], event["reply"]) == ("::1", 5)


def test_socks5_no_acceptable_method(magic_tunnel: Running) -> None:
    with connect_proxy(magic_tunnel.address) as sock:
        sock.sendall(socks5_greeting(b"\x02\x01"))  # username/password and GSSAPI only
        assert recv_exact(sock, 2) == b"\x05\xff"
        assert closed_by_peer(sock) == b""
        client = client_name(sock)
    event = magic_tunnel.wait_event("client_rejected", client=client)
    assert "method" in event["reason"]


def test_failures_leave_the_tunnel_working(magic_tunnel: Running, echo_target: EchoTarget) -> None:
    # After every failure above (module scope), a good request still goes through.
    sock, reply = socks5_open(magic_tunnel.address, "127.0.0.1", echo_target.port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"still fine")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"still fine")
    assert magic_tunnel.alive
