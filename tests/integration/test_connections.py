"""``--connections N``: channels spread over up to N SSH connections, opened as needed.

Each SSH connection is one per-connection process under the (private) sshd, so the
count of its children is the count of connections pytunnel holds.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest
from fixtures.net import wait_until
from fixtures.pytunnel_proc import Running, recv_exact, server_args, socks5_open, start_pytunnel
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget


@pytest.fixture
def private_sshd(make_sshd: Callable[..., SshdServer]) -> SshdServer:
    return make_sshd()


def _hold(tunnel: Running, target: EchoTarget, count: int) -> list[socket.socket]:
    """Open ``count`` tunnelled connections and keep them open."""
    held = []
    for _ in range(count):
        sock, reply = socks5_open(tunnel.address, target.host, target.port)
        assert reply[1] == 0x00, reply
        held.append(sock)
    return held


@pytest.fixture
def closer() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def _echo_round_trip(sock: socket.socket, payload: bytes, target: EchoTarget) -> None:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    expected = target.expected_reply(payload)
    assert recv_exact(sock, len(expected)) == expected


@pytest.mark.slow
def test_channels_spread_over_two_connections(
    private_sshd: SshdServer, echo_target: EchoTarget, closer: list[socket.socket]
) -> None:
    with start_pytunnel(["-D", "127.0.0.1:0", "--json", "--connections", "2",
                         *server_args(private_sshd)]) as tunnel:  # fmt: skip
        assert len(private_sshd.children()) == 1
        # The second channel finds the first connection busy: a second one opens.
        closer.extend(_hold(tunnel, echo_target, 2))
        assert wait_until(lambda: len(private_sshd.children()) == 2, timeout=10)
        # More channels never open more than N connections, and all of them work.
        closer.extend(_hold(tunnel, echo_target, 4))
        time.sleep(0.5)  # a third connection, if one were wrongly opened, would show by now
        assert len(private_sshd.children()) == 2
        for number, sock in enumerate(closer):
            _echo_round_trip(sock, b"flow %d " % number * 1000, echo_target)


def test_one_connection_by_default(
    private_sshd: SshdServer, echo_target: EchoTarget, closer: list[socket.socket]
) -> None:
    with start_pytunnel(["-D", "127.0.0.1:0", "--json", *server_args(private_sshd)]) as tunnel:
        closer.extend(_hold(tunnel, echo_target, 3))
        for sock in closer:
            _echo_round_trip(sock, b"x" * 5000, echo_target)
        assert len(private_sshd.children()) == 1
