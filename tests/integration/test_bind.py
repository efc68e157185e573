"""SOCKS BIND (SOCKS5 and SOCKS4) through the real OpenSSH sshd, with the real console script.

A BIND makes sshd listen (``tcpip-forward`` on a port it picks); a plain socket, "the peer",
stands for the far side of a protocol such as active FTP and connects to the address of the
first reply. Only the peer the request named is taken. Every wait is on an event (a reply,
an EOF, a refused connect, a log line) with a deadline; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import random
import select
import socket
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fixtures.net import wait_until
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    Running,
    client_name,
    closed_by_peer,
    recv_all,
    recv_exact,
    running_pytunnel,
    server_args,
    socks5_open,
)
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget
from fixtures.udp_targets import SocksBind, socks4_bind, socks5_bind

pytestmark = pytest.mark.timeout(60)

SOCKS5_SUCCEEDED = 0x00
SOCKS5_NOT_ALLOWED = 0x02
SOCKS4_GRANTED = 90
SOCKS4_REFUSED = 91
IO_TIMEOUT = 10.0
# Deadline for the server to stop listening after pytunnel cancelled the forward.
GONE_DEADLINE = 5.0
# How long the client socket must stay silent, checked only after the positive event (the
# server closed the stranger), by which time pytunnel had already decided about it.
SILENCE = 0.2
PEER_HOST = "127.0.0.1"
OTHER_LOOPBACK = "127.0.0.2"  # all of 127/8 is loopback on Linux: a second peer address
UNROUTED = "192.0.2.1"  # TEST-NET-1: a DST.ADDR outside 127.0.0.0/8, never connected to
DOWN = random.Random(1).randbytes(1 << 20)  # peer -> client
UP = random.Random(2).randbytes(1 << 20)  # client -> peer
TAIL = b"sent by the client after the peer's EOF"
# What sshd (LogLevel DEBUG1) logs for every global request asking it to listen.
FORWARD_REQUEST_LOG = "rtype tcpip-forward"

Binder = Callable[..., SocksBind]
VERSIONS: dict[str, tuple[Binder, int]] = {
    "socks5": (socks5_bind, SOCKS5_SUCCEEDED),
    "socks4": (socks4_bind, SOCKS4_GRANTED),
}


@pytest.fixture(scope="module")
def bind_tunnel(sshd: SshdServer) -> Iterator[Running]:
    """One tunnel for the tests that need nothing special; each matches its own client."""
    with running_pytunnel(["-D", "127.0.0.1:0", *server_args(sshd)]) as running:
        yield running


def digest(data: bytes) -> str:
    # Compared instead of the bytes, so a failure does not print two MiB.
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"


def connect_peer(address: tuple[str, int], source: str = PEER_HOST) -> socket.socket:
    return socket.create_connection(address, timeout=IO_TIMEOUT, source_address=(source, 0))


def refuses(address: tuple[str, int]) -> bool:
    """True once nothing listens on ``address``. A connection that the server accepts and
    closes (a peer pytunnel turned away) still counts as listening."""
    try:
        probe = connect_peer(address)
    except ConnectionRefusedError:
        return True
    probe.close()
    return False


def send_and_half_close(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def relay_both_ways_with_half_close(client: socket.socket, peer: socket.socket) -> None:
    """1 MiB each way at once; the peer then half-closes: the client reads to EOF and can
    still send, and its own EOF reaches the peer."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="bind-relay") as pool:
        down = pool.submit(send_and_half_close, peer, DOWN)
        up = pool.submit(client.sendall, UP)  # the client keeps its side open
        assert digest(recv_all(client, IO_TIMEOUT)) == digest(DOWN)
        assert digest(recv_exact(peer, len(UP), IO_TIMEOUT)) == digest(UP)
        down.result(IO_TIMEOUT)
        up.result(IO_TIMEOUT)
    client.sendall(TAIL)
    client.shutdown(socket.SHUT_WR)
    assert recv_all(peer, IO_TIMEOUT) == TAIL


def assert_silent(sock: socket.socket) -> None:
    readable, _, _ = select.select([sock], [], [], SILENCE)
    assert readable == [], "the client got something (a second reply?) for a refused peer"


# -- the whole exchange ---------------------------------------------------------------


@pytest.mark.parametrize("version", list(VERSIONS))
def test_bind_relays_both_ways_with_half_close(bind_tunnel: Running, version: str) -> None:
    bind, ok = VERSIONS[version]
    with bind(*bind_tunnel.address, PEER_HOST, 0, timeout=IO_TIMEOUT) as waiting:
        name = client_name(waiting.sock)
        assert waiting.first_code == ok
        host, port = waiting.first_address
        assert host == "127.0.0.1"
        assert port != 0
        parsed = bind_tunnel.wait_event("request_parsed", client=name)
        assert (parsed["protocol"], parsed["command"]) == (f"{version}-bind", "BIND")
        assert parsed["host"] == PEER_HOST

        with connect_peer(waiting.first_address) as peer:
            # The second reply names the peer exactly as it connected.
            assert waiting.second_reply(IO_TIMEOUT) == (ok, *peer.getsockname())
            bind_tunnel.wait_event("channel_opened", client=name)
            relay_both_ways_with_half_close(waiting.sock, peer)
        closed = bind_tunnel.wait_event("connection_closed", client=name)
    assert (closed["bytes_up"], closed["bytes_down"]) == (len(UP) + len(TAIL), len(DOWN))


def test_server_stops_listening_once_the_peer_came(bind_tunnel: Running) -> None:
    with socks5_bind(*bind_tunnel.address, PEER_HOST, 0, timeout=IO_TIMEOUT) as waiting:
        assert waiting.first_code == SOCKS5_SUCCEEDED
        with connect_peer(waiting.first_address) as peer:
            assert waiting.second_reply(IO_TIMEOUT)[0] == SOCKS5_SUCCEEDED
            # One peer per BIND: the forward is cancelled, a second connection is refused.
            assert wait_until(lambda: refuses(waiting.first_address), GONE_DEADLINE)
            # ... and the one peer is still served.
            peer.sendall(b"ping")
            assert recv_exact(waiting.sock, 4, IO_TIMEOUT) == b"ping"
            waiting.sock.sendall(b"pong")
            assert recv_exact(peer, 4, IO_TIMEOUT) == b"pong"


# -- who may connect ------------------------------------------------------------------


def test_only_the_named_peer_is_accepted(bind_tunnel: Running) -> None:
    with socks5_bind(*bind_tunnel.address, OTHER_LOOPBACK, 0, timeout=IO_TIMEOUT) as waiting:
        name = client_name(waiting.sock)
        assert waiting.first_code == SOCKS5_SUCCEEDED
        assert waiting.first_address[0] == "127.0.0.1"

        with connect_peer(waiting.first_address, source=PEER_HOST) as stranger:
            # sshd accepted it, pytunnel refused the channel, sshd closed it.
            assert closed_by_peer(stranger) == b""
        assert_silent(waiting.sock)
        assert bind_tunnel.events("channel_opened", client=name) == []

        # The BIND kept waiting: the peer it named is taken.
        with connect_peer(waiting.first_address, source=OTHER_LOOPBACK) as peer:
            assert peer.getsockname()[0] == OTHER_LOOPBACK
            assert waiting.second_reply(IO_TIMEOUT) == (SOCKS5_SUCCEEDED, *peer.getsockname())
            bind_tunnel.wait_event("channel_opened", client=name)
            peer.sendall(b"from the right peer")
            assert recv_exact(waiting.sock, 19, IO_TIMEOUT) == b"from the right peer"
            send_and_half_close(waiting.sock, b"welcome")
            assert recv_all(peer, IO_TIMEOUT) == b"welcome"


# -- refusals -------------------------------------------------------------------------


def test_server_refusing_remote_forwarding_fails_the_bind(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    server = make_sshd(AllowTcpForwarding="local")
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(server)])

    with socks5_bind(*tunnel.address, PEER_HOST, 0, timeout=IO_TIMEOUT) as refused:
        name = client_name(refused.sock)
        assert refused.first_code == SOCKS5_NOT_ALLOWED
        assert closed_by_peer(refused.sock) == b""
    failed = tunnel.wait_event("channel_failed", client=name)
    assert failed["reply"] == SOCKS5_NOT_ALLOWED
    assert "AllowTcpForwarding" in failed["reason"]
    assert tunnel.events("request_parsed", client=name)[0]["protocol"] == "socks5-bind"

    with socks4_bind(*tunnel.address, PEER_HOST, 0, timeout=IO_TIMEOUT) as refused4:
        name4 = client_name(refused4.sock)
        assert refused4.first_code == SOCKS4_REFUSED
        assert closed_by_peer(refused4.sock) == b""
    assert "AllowTcpForwarding" in tunnel.wait_event("channel_failed", client=name4)["reason"]

    # Only remote forwarding is off: CONNECT still goes through the same session.
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port)
    with sock:
        assert reply[1] == SOCKS5_SUCCEEDED
        send_and_half_close(sock, b"still connects")
        assert recv_all(sock) == EchoTarget.expected_reply(b"still connects")


def test_deny_rule_refuses_bind_without_asking_the_server(
    sshd: SshdServer, pytunnel_factory: PytunnelFactory
) -> None:
    tunnel = pytunnel_factory(["--deny", "127.0.0.0/8", "-D", "127.0.0.1:0", *server_args(sshd)])
    mark = sshd.log_mark()

    with socks5_bind(*tunnel.address, PEER_HOST, 0, timeout=IO_TIMEOUT) as denied:
        name = client_name(denied.sock)
        assert denied.first_code == SOCKS5_NOT_ALLOWED
        assert closed_by_peer(denied.sock) == b""
    failed = tunnel.wait_event("channel_failed", client=name)
    assert failed["reply"] == SOCKS5_NOT_ALLOWED
    assert failed["reason"] == "denied by --deny 127.0.0.0/8"

    # A BIND the rule lets through does reach sshd, which logs the request. The denied one
    # was answered first on the same SSH connection: had pytunnel asked, that line would
    # be in the log before this one.
    with socks5_bind(*tunnel.address, UNROUTED, 0, timeout=IO_TIMEOUT) as allowed:
        assert allowed.first_code == SOCKS5_SUCCEEDED
        assert sshd.wait_log(FORWARD_REQUEST_LOG, since=mark), sshd.log_text(mark)
    assert sshd.log_text(mark).count(FORWARD_REQUEST_LOG) == 1, sshd.log_text(mark)


# -- a client that gives up -----------------------------------------------------------


def give_up(waiting: SocksBind, how: str) -> None:
    if how == "reset":
        # Linger 0: close() sends RST instead of FIN.
        waiting.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    waiting.close()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_giving_up_cancels_the_server_listener(bind_tunnel: Running, how: str) -> None:
    # The BIND names 127.0.0.2, so the probes below (from 127.0.0.1) are turned away and
    # can never become its peer, which would end the wait by themselves.
    waiting = socks5_bind(*bind_tunnel.address, OTHER_LOOPBACK, 0, timeout=IO_TIMEOUT)
    address = waiting.first_address
    with waiting:
        assert waiting.first_code == SOCKS5_SUCCEEDED
        assert not refuses(address), "the server should be listening while the BIND waits"
        give_up(waiting, how)
    assert wait_until(lambda: refuses(address), GONE_DEADLINE), (
        f"sshd still listens on {address} after the client went away"
    )
