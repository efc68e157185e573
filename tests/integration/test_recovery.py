"""Back in seconds (issue 15): a request while the server is away starts an attempt at
once; SIGHUP makes a new session while open connections finish on the old one; SIGUSR1
writes a status line; --give-up-after ends an outage with exit 255. A real OpenSSH sshd
and the real console script; every wait is on an event or a log line, with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable

import pytest
from fixtures.net import wait_until
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    Running,
    client_name,
    connect_proxy,
    recv_all,
    recv_exact,
    server_args,
    socks5_greeting,
    socks5_open,
    socks5_request,
)
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget

pytestmark = pytest.mark.timeout(90)

DEADLINE = 30.0
# sshd logs one of these per authenticated connection.
ACCEPTED = "Accepted publickey"


def echo_through(tunnel: Running, port: int, data: bytes) -> None:
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(data)


def position(tunnel: Running, predicate: Callable[[dict[str, object]], bool]) -> int:
    for index, event in enumerate(tunnel.events()):
        if predicate(event):
            return index
    raise AssertionError(f"no such event:\n{tunnel.describe()}")


def test_a_request_after_the_server_returns_is_served_by_an_attempt_on_demand(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["--reconnect-wait", "60", "-D", "127.0.0.1:0", *server_args(server)])
    server.stop()
    tunnel.wait_event("session_lost")
    # Until the backoff has grown to seconds: the next attempt nobody asks for is that
    # far off, so the one that serves the request below is the one it asked for.
    assert wait_until(
        lambda: any(e["delay"] >= 3.0 for e in tunnel.events("reconnect_scheduled")), DEADLINE
    ), tunnel.describe()
    waiting = len(tunnel.events("reconnect_scheduled"))
    server.start()  # same port
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks5_greeting())
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(socks5_request("127.0.0.1", echo_target.port))
        name = client_name(sock)
        assert recv_exact(sock, 10, timeout=DEADLINE) == SOCKS5_OK
        sock.sendall(b"on demand")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"on demand")
    asked = position(tunnel, lambda e: e["event"] == "request_parsed" and e["client"] == name)
    attempt = position(tunnel, lambda e: e["event"] == "session_connecting" and e["demand"])
    up = position(tunnel, lambda e: e["event"] == "session_up")
    assert asked < attempt < up, tunnel.describe()
    # No attempt the backoff scheduled came between: the demand cut its wait short.
    assert len(tunnel.events("reconnect_scheduled")) == waiting
    [back] = tunnel.events("session_up")
    assert back["cause"] == "lost"
    assert back["outage"] > 0


def test_sighup_makes_a_new_session_and_open_connections_finish_on_the_old_one(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(server)])
    assert wait_until(lambda: len(server.children()) == 1, DEADLINE), server.children()
    # A connection in the middle of an upload, on the first session.
    held, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port)
    with held:
        assert reply == SOCKS5_OK
        first = b"before the signal; "
        held.sendall(first)
        mark = server.log_mark()
        os.kill(tunnel.pid, signal.SIGHUP)
        lost = tunnel.wait_event("session_lost")
        assert lost["cause"] == "sighup"
        up = tunnel.wait_event("session_up", timeout=DEADLINE)
        assert up["cause"] == "sighup"
        # The server saw a second connection, and both are there now.
        assert server.wait_log(ACCEPTED, timeout=DEADLINE, since=mark), server.log_text(mark)
        assert len(server.children()) == 2
        # New requests use the new session at once.
        echo_through(tunnel, echo_target.port, b"on the new session")
        # The old connection keeps transferring to its end.
        second = b"after the signal"
        held.sendall(second)
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held) == EchoTarget.expected_reply(first + second)
    # Its last channel closed, the old session is closed too.
    assert wait_until(lambda: len(server.children()) == 1, DEADLINE), server.children()
    assert tunnel.alive


def test_sigusr1_writes_a_status_line(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(server)])
    echo_through(tunnel, echo_target.port, b"x" * 1000)
    tunnel.wait_event("connection_closed")
    os.kill(tunnel.pid, signal.SIGUSR1)
    status = tunnel.wait_event("status")
    assert status["state"] == "up"
    assert (status["served"], status["open"], status["reconnects"]) == (1, 0, 0)
    assert status["bytes_up"] == 1000
    assert status["bytes_down"] == len(EchoTarget.expected_reply(b"x" * 1000))
    assert tunnel.wait_stderr("status: "), tunnel.describe()
    assert tunnel.alive


def test_give_up_after_ends_an_outage_with_exit_255(
    make_sshd: Callable[..., SshdServer], pytunnel_factory: PytunnelFactory
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["--give-up-after", "2", "-D", "127.0.0.1:0", *server_args(server)])
    server.stop()
    try:
        status = tunnel.proc.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after the outage limit:\n{tunnel.describe()}")
    assert status == 255, tunnel.describe()
    error = tunnel.events("error")
    assert len(error) == 1, tunnel.describe()
    assert error[0]["exit_status"] == 255
    assert "--give-up-after" in error[0]["message"]
    assert "Traceback" not in tunnel.stderr_text()
