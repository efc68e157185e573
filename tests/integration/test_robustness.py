"""Bad clients never hurt good ones: garbage, truncation, silence, resets, crowds.

A good transfer is kept open across the whole abuse (its first half sent before, its
second half after), so the overlap is certain rather than a matter of timing.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import socket
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from fixtures.asyncssh_server import PORT_NEVER_ANSWER, AsyncsshServer
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    Running,
    clean_env,
    client_name,
    closed_by_peer,
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
from fixtures.targets import EchoTarget, HttpTarget

pytestmark = pytest.mark.timeout(90)

HANDSHAKE_TIMEOUT = 1
CURL_TIMEOUT = 60.0


@pytest.fixture
def guarded_tunnel(pytunnel_factory: PytunnelFactory, sshd: SshdServer) -> Running:
    args = ["--handshake-timeout", str(HANDSHAKE_TIMEOUT), "-D", "127.0.0.1:0"]
    return pytunnel_factory([*args, *server_args(sshd)])


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed")
    return path


@dataclass(frozen=True)
class BadClient:
    name: str
    send: bytes
    half_close: bool = False
    expect_reply: bytes = b""  # what pytunnel says before closing (a prefix of it)
    reason: str | None = ""  # a word of the client_rejected reason; None: no such event


def _tls_client_hello() -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + b"\x00\x00"
    handshake = b"\x01" + len(body).to_bytes(3) + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def _random_garbage() -> bytes:
    data = bytearray(random.Random(4242).randbytes(4096))
    data[0] = 0x8F  # not a SOCKS version, whatever the seed gave
    return bytes(data)


BAD_CLIENTS = [
    # The port speaks HTTP too: a request for pytunnel itself gets an error status.
    BadClient(
        "http",
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        expect_reply=b"HTTP/1.1 4",
        reason=None,
    ),
    BadClient("http-garbage", b"GET \x00\x01 HTTP/9.9\r\n\r\n", expect_reply=b"HTTP/1.1 4"),
    BadClient("tls", _tls_client_hello(), reason="SOCKS"),
    BadClient("random", _random_garbage(), reason="SOCKS"),
    BadClient(
        "truncated-socks5",
        socks5_greeting() + b"\x05\x01\x00\x03\x20only-part-of-a-name",
        half_close=True,
        expect_reply=b"\x05\x00",
    ),
    BadClient(
        "socks5-greeting-then-eof", socks5_greeting(), half_close=True, expect_reply=b"\x05\x00"
    ),
    BadClient(
        "socks4-endless-user-id",
        b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"U" * 2000,
        expect_reply=b"\x00\x5b" + bytes(6),
    ),
    BadClient("silent", b"", reason="no complete request"),
    BadClient(
        "socks5-greeting-then-silence",
        socks5_greeting(),
        expect_reply=b"\x05\x00",
        reason="no complete request",
    ),
]


def run_bad_client(tunnel: Running, bad: BadClient) -> tuple[bytes, str]:
    """Play one bad client; returns what pytunnel sent before closing, and the client."""
    with connect_proxy(tunnel.address) as sock:
        name = client_name(sock)
        if bad.send:
            sock.sendall(bad.send)
        if bad.half_close:
            sock.shutdown(socket.SHUT_WR)
        # Closed by pytunnel within a few seconds, with at most the short reply.
        return closed_by_peer(sock, timeout=HANDSHAKE_TIMEOUT + 5), name


def reset_mid_handshake(tunnel: Running) -> None:
    sock = connect_proxy(tunnel.address)
    sock.sendall(b"\x05\x01")  # half a greeting
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST


def curl_big(tunnel: Running, http_target: HttpTarget) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [need("curl"), "--silent", "--show-error", "--fail", "--max-time", str(CURL_TIMEOUT),
         "--socks5-hostname", tunnel.netloc, f"http://localhost:{http_target.port}/big"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )  # fmt: skip


@pytest.mark.slow
def test_garbage_clients_never_hurt_a_running_transfer(
    guarded_tunnel: Running, echo_target: EchoTarget, http_target: HttpTarget
) -> None:
    tunnel = guarded_tunnel
    payload = random.Random(1).randbytes(4 * 1024 * 1024)
    good, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port)
    curl = curl_big(tunnel, http_target)
    try:
        with good:
            assert reply == SOCKS5_OK
            good.sendall(payload[: len(payload) // 2])

            with ThreadPoolExecutor(max_workers=len(BAD_CLIENTS)) as pool:
                results = list(pool.map(lambda bad: run_bad_client(tunnel, bad), BAD_CLIENTS))
            for _ in range(20):
                reset_mid_handshake(tunnel)

            good.sendall(payload[len(payload) // 2 :])
            good.shutdown(socket.SHUT_WR)
            assert recv_all(good, CURL_TIMEOUT) == EchoTarget.expected_reply(payload)
        out, err = curl.communicate(timeout=CURL_TIMEOUT)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait(10)
    assert curl.returncode == 0, err
    assert hashlib.sha256(out).hexdigest() == http_target.big_sha256

    for bad, (answer, client) in zip(BAD_CLIENTS, results, strict=True):
        assert answer.startswith(bad.expect_reply), (bad.name, answer)
        if bad.expect_reply[:1] in (b"\x00", b"\x05"):  # SOCKS replies have exact sizes
            assert answer == bad.expect_reply, (bad.name, answer)
        if bad.reason is not None:
            event = tunnel.wait_event("client_rejected", client=client)
            assert bad.reason in event["reason"], (bad.name, event)

    # And afterwards a new good request still works.
    sock, reply = socks5_open(tunnel.address, "localhost", echo_target.port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"after the storm")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"after the storm")
    assert tunnel.alive
    assert "Traceback" not in tunnel.stderr_text()


def test_silent_client_is_closed_after_the_handshake_timeout(guarded_tunnel: Running) -> None:
    with connect_proxy(guarded_tunnel.address) as sock:
        client = client_name(sock)
        assert closed_by_peer(sock, timeout=HANDSHAKE_TIMEOUT + 5) == b""
    event = guarded_tunnel.wait_event("client_rejected", client=client)
    assert "no complete request" in event["reason"]


@pytest.mark.slow
def test_open_request_is_not_cut_by_the_handshake_timeout(
    guarded_tunnel: Running, echo_target: EchoTarget
) -> None:
    # The handshake deadline covers the SOCKS exchange only, never an open connection.
    sock, reply = socks5_open(guarded_tunnel.address, "127.0.0.1", echo_target.port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"first")
        sock.settimeout(HANDSHAKE_TIMEOUT * 2 + 1)
        # The target answers only after our EOF, so nothing can arrive meanwhile; a recv
        # that times out proves the connection outlived the handshake timeout.
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.sendall(b" second")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"first second")


def test_client_reset_during_download_is_contained(
    tunnel: Running, http_target: HttpTarget, echo_target: EchoTarget
) -> None:
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", http_target.port)
    client = client_name(sock)
    assert reply == SOCKS5_OK
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    assert recv_exact(sock, 65536).startswith(b"HTTP/1.")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST in the middle of 8 MiB
    event = tunnel.wait_event("connection_closed", client=client)
    assert 65536 <= event["bytes_down"] <= http_target.big_size + 1024
    good, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port)
    with good:
        assert reply == SOCKS5_OK
        good.sendall(b"x")
        good.shutdown(socket.SHUT_WR)
        assert recv_all(good) == EchoTarget.expected_reply(b"x")


def test_client_gone_while_the_open_is_pending(
    pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer
) -> None:
    running = pytunnel_factory(
        ["--open-timeout", "30", "-D", "127.0.0.1:0", *server_args(asyncssh_server)]
    )
    for _ in range(5):
        with connect_proxy(running.address) as sock:
            sock.sendall(socks5_greeting() + socks5_request("127.0.0.1", PORT_NEVER_ANSWER))
            assert recv_exact(sock, 2) == b"\x05\x00"
            client = client_name(sock)
        running.wait_event("request_parsed", client=client)
    # The tunnel is unharmed: a request right after still gets its honest answer.
    sock, reply = socks5_open(running.address, "127.0.0.1", 1)
    with sock:
        assert reply[:2] == b"\x05\x05"
    assert running.alive


def test_many_concurrent_clients(tunnel: Running, echo_target: EchoTarget) -> None:
    count = 60

    def one(index: int) -> bool:
        data = random.Random(index).randbytes(10_000 + index * 997)
        sock, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port, timeout=30)
        with sock:
            assert reply == SOCKS5_OK
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock, 30) == EchoTarget.expected_reply(data)

    with ThreadPoolExecutor(max_workers=count) as pool:
        assert all(pool.map(one, range(count)))
