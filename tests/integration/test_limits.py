"""Limits and shutdown: the connection cap, the handshake and channel-open timeouts, running
out of file descriptors, and what SIGTERM, SIGINT and ``--drain`` do to open connections.

The real console script against the real sshd (and the asyncssh server for a channel that
never opens). Waits are on events, EOFs and exits, each with a deadline.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import resource
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from fixtures.asyncssh_server import PORT_NEVER_ANSWER, AsyncsshServer
from fixtures.net import wait_until
from fixtures.pytunnel_proc import (
    PYTUNNEL,
    PytunnelFactory,
    Running,
    _die_with_parent,
    clean_env,
    client_name,
    closed_by_peer,
    connect_proxy,
    recv_all,
    recv_exact,
    server_args,
    socks4_request,
    socks5_greeting,
    socks5_open,
)
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget, HttpTarget

pytestmark = pytest.mark.timeout(60)

SOCKS5_GENERAL_FAILURE = b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"
SOCKS5_TTL_EXPIRED = b"\x05\x06\x00\x01\x00\x00\x00\x00\x00\x00"
SOCKS4_REJECTED = b"\x00\x5b"
FD_LIMIT = 64  # RLIMIT_NOFILE for the fd-exhaustion test; pytunnel idles at ~15 fds
EXTRA_CLIENTS = 8  # clients beyond what the limit leaves room for
DRAIN = 5


def open_held(tunnel: Running, echo_target: EchoTarget, data: bytes) -> tuple[socket.socket, str]:
    """A tunnelled connection that stays open: the echo target answers only at our EOF."""
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port)
    assert reply == SOCKS5_OK
    sock.sendall(data)
    name = client_name(sock)
    tunnel.wait_event("channel_opened", client=name)
    return sock, name


def finish_held(sock: socket.socket, data: bytes) -> None:
    """End the upload; the target's digest proves every byte arrived."""
    with sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(data)


# -- the connection cap ---------------------------------------------------------------------


def test_max_connections_refuses_the_one_too_many(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    tunnel = pytunnel_factory(["--max-connections", "2", "-D", "127.0.0.1:0", *server_args(sshd)])
    first, first_name = open_held(tunnel, echo_target, b"one")
    second, _ = open_held(tunnel, echo_target, b"two")

    # SOCKS5: a general failure, then closed.
    third, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port)
    with third:
        assert reply == SOCKS5_GENERAL_FAILURE
        assert closed_by_peer(third) == b""
        failed = tunnel.wait_event("channel_failed", client=client_name(third))
    assert failed["reply"] == 0x01
    assert "too many connections" in failed["reason"]
    # SOCKS4: 91, then closed.
    with connect_proxy(tunnel.address) as fourth:
        fourth.sendall(socks4_request("127.0.0.1", echo_target.port))
        assert recv_exact(fourth, 8)[:2] == SOCKS4_REJECTED
        assert closed_by_peer(fourth) == b""
    # The refused ones never reached the server: only the two held channels opened.
    assert len(tunnel.events("channel_opened")) == 2

    # The two held connections were not disturbed; once one ends, there is room again.
    finish_held(first, b"one")
    tunnel.wait_event("connection_closed", client=first_name)
    again, _ = open_held(tunnel, echo_target, b"three")
    finish_held(again, b"three")
    finish_held(second, b"two")


# -- timeouts -------------------------------------------------------------------------------


def test_silent_client_is_closed_after_the_handshake_timeout(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    tunnel = pytunnel_factory(["--handshake-timeout", "1", "-D", "127.0.0.1:0", *server_args(sshd)])
    with connect_proxy(tunnel.address) as silent, connect_proxy(tunnel.address) as halfway:
        halfway.sendall(socks5_greeting())
        assert recv_exact(halfway, 2) == b"\x05\x00"
        assert closed_by_peer(silent) == b""
        assert closed_by_peer(halfway) == b""
        for sock in (silent, halfway):
            rejected = tunnel.wait_event("client_rejected", client=client_name(sock))
            assert "no complete request within 1 s" in rejected["reason"]
    # Good clients are not affected.
    finish_held(open_held(tunnel, echo_target, b"prompt")[0], b"prompt")


def test_channel_that_never_opens_gets_ttl_expired(
    pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer
) -> None:
    tunnel = pytunnel_factory(
        ["--open-timeout", "1", "-D", "127.0.0.1:0", *server_args(asyncssh_server)]
    )
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", PORT_NEVER_ANSWER)
    with sock:
        assert reply == SOCKS5_TTL_EXPIRED
        assert closed_by_peer(sock) == b""
        failed = tunnel.wait_event("channel_failed", client=client_name(sock))
    assert failed["reply"] == 0x06
    assert "within 1 s" in failed["reason"]
    assert ("127.0.0.1", PORT_NEVER_ANSWER) in asyncssh_server.requests_snapshot()
    assert tunnel.alive


# -- running out of file descriptors --------------------------------------------------------


def _low_fd_limit() -> None:
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.fixture
def starved_tunnel(pytunnel_factory: PytunnelFactory, sshd: SshdServer) -> Running:
    """pytunnel with RLIMIT_NOFILE = FD_LIMIT (set in the child before exec)."""
    args = ["--json", "-D", "127.0.0.1:0", *server_args(sshd)]
    proc = subprocess.Popen(
        [str(PYTUNNEL), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        preexec_fn=_low_fd_limit,
    )
    running = Running(proc, args)
    pytunnel_factory.started.append(running)  # stopped by PID at teardown
    running.wait_ready()
    return running


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_fd_exhaustion_pauses_accepting_then_recovers(
    starved_tunnel: Running, echo_target: EchoTarget
) -> None:
    tunnel = starved_tunnel
    limits = Path(f"/proc/{tunnel.pid}/limits").read_text()
    assert re.search(rf"^Max open files\s+{FD_LIMIT}\s+{FD_LIMIT}\s", limits, re.M), limits
    held, _ = open_held(tunnel, echo_target, b"before the flood")
    idle = open_fds(tunnel.pid)
    room = FD_LIMIT - idle
    assert room > 0, idle

    flood: list[socket.socket] = []
    try:
        # The kernel completes these handshakes (listen backlog) whether or not pytunnel
        # can accept them; only `room` of them fit.
        for _ in range(room + EXTRA_CLIENTS):
            flood.append(socket.create_connection(tunnel.address, timeout=10))
        notice = tunnel.wait_event("notice", key="accept-starved")
        assert "cannot accept connections" in notice["message"]
        assert wait_until(lambda: open_fds(tunnel.pid) >= FD_LIMIT - 1, 10)
        # Free one descriptor (the first client was accepted first): the paused loop takes
        # the next client from the queue and, the queue being longer, pauses again.
        accepted = len(tunnel.events("client_accepted"))
        flood[0].close()
        assert wait_until(lambda: len(tunnel.events("client_accepted")) > accepted, 10)
        # Still alive, and a connection opened before the flood still relays.
        assert tunnel.alive
        finish_held(held, b"before the flood")
    finally:
        for sock in flood:
            sock.close()

    # Descriptors come back as the flood's clients go; the accept loop resumes by itself.
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port, timeout=20)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"after the flood")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"after the flood")
    # Said once, however many times accepting paused: one event, one line on stderr.
    assert len(tunnel.events("notice", key="accept-starved")) == 1
    assert tunnel.stderr_text().count("cannot accept connections") == 1, tunnel.stderr_text()
    assert tunnel.alive
    assert "Traceback" not in tunnel.stderr_text()


# -- signals and drain ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "status", "reason"),
    [(signal.SIGTERM, 0, "terminated"), (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "SIGINT"],
)
def test_signal_exit_status_closes_open_clients(
    pytunnel_factory: PytunnelFactory,
    sshd: SshdServer,
    echo_target: EchoTarget,
    signum: int,
    status: int,
    reason: str,
) -> None:
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(sshd)])
    held, name = open_held(tunnel, echo_target, b"interrupted upload")
    with held:
        tunnel.send_signal(signum)
        assert tunnel.wait() == status
        # Without --drain an open connection is closed at once (no digest: no EOF was sent).
        assert closed_by_peer(held) == b""
    assert tunnel.wait_event("connection_closed", client=name)["bytes_down"] == 0
    [stopping] = tunnel.events("stopping")
    assert stopping["reason"] == reason
    assert "Traceback" not in tunnel.stderr_text()


def _start_slow_download(tunnel: Running, http_target: HttpTarget) -> tuple[socket.socket, bytes]:
    """GET /big with Connection: close, and read only its first part: the rest stays
    in flight until we read on, so the transfer is certainly open at the signal."""
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", http_target.port)
    assert reply == SOCKS5_OK
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: target\r\nConnection: close\r\n\r\n")
    return sock, recv_exact(sock, 256 * 1024)


def _body_of(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n")[0]
    assert status_line.startswith(b"HTTP/1.")
    assert b" 200 " in status_line
    return body


def test_drain_lets_an_open_transfer_finish_then_exits_0(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, http_target: HttpTarget
) -> None:
    tunnel = pytunnel_factory(["--drain", str(DRAIN), "-D", "127.0.0.1:0", *server_args(sshd)])
    sock, start = _start_slow_download(tunnel, http_target)
    with sock:
        tunnel.send_signal(signal.SIGTERM)
        tunnel.wait_event("stopping")
        # No new clients while draining.
        assert wait_until(lambda: _refused(tunnel.address), 5)
        assert tunnel.alive
        rest = recv_all(sock, timeout=DRAIN + 5)
    body = _body_of(start + rest)
    assert len(body) == http_target.big_size
    assert hashlib.sha256(body).hexdigest() == http_target.big_sha256
    assert tunnel.wait() == 0
    closed = tunnel.events("connection_closed")
    assert [e["port"] for e in closed] == [http_target.port]
    assert closed[0]["bytes_down"] >= http_target.big_size


def _refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_second_sigint_exits_at_once_while_draining(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    tunnel = pytunnel_factory(["--drain", "60", "-D", "127.0.0.1:0", *server_args(sshd)])
    held, _ = open_held(tunnel, echo_target, random.Random(3).randbytes(1000))
    with held:
        tunnel.send_signal(signal.SIGINT)
        tunnel.wait_event("stopping")
        assert wait_until(lambda: _refused(tunnel.address), 5)
        assert tunnel.alive  # draining: the held connection keeps it waiting
        tunnel.send_signal(signal.SIGINT)
        assert tunnel.wait(5) == 130  # long before the 60 s drain would be over
        assert closed_by_peer(held) == b""
