"""The relay, end to end: half-close both ways, pipelined data, flow control, byte counts.

Clients are raw sockets speaking SOCKS by hand through the real console script, against
the real OpenSSH sshd (and the asyncssh server's echo port where a second server helps).
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from fixtures.asyncssh_server import PORT_ECHO, AsyncsshServer
from fixtures.net import wait_until
from fixtures.pytunnel_proc import (
    Running,
    client_name,
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
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget, TalkerTarget

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024
STREAM_SIZE = 64 * MiB  # far more than every buffer on the path put together
BLOCK = random.Random(1928).randbytes(MiB)  # incompressible, so ssh compression cannot hide it
# One SSH window (2 MiB for OpenSSH and asyncssh) plus generous slack for allocator noise.
RSS_GROWTH_LIMIT_KIB = 16 * 1024
STALL_QUIET = 1.0  # the sender made no progress for this long: back-pressure reached it
STALL_DEADLINE = 30.0
TRANSFER_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def shared_tunnel(sshd: SshdServer) -> Iterator[Running]:
    with running_pytunnel(["-D", "127.0.0.1:0", *server_args(sshd)]) as running:
        yield running


@pytest.fixture(scope="module")
def shared_tunnel_asyncssh(asyncssh_server: AsyncsshServer) -> Iterator[Running]:
    with running_pytunnel(["-D", "127.0.0.1:0", *server_args(asyncssh_server)]) as running:
        yield running


def payload_of(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def stream_digest(size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, MiB):
        digest.update(BLOCK[: min(MiB, size - offset)])
    return digest.hexdigest()


# -- half-close ----------------------------------------------------------------------------


def test_client_half_close_still_gets_the_answer(
    shared_tunnel: Running, echo_target: EchoTarget
) -> None:
    payload = payload_of(3 * MiB)
    sock, reply = socks5_open(shared_tunnel.address, "127.0.0.1", echo_target.port)
    with sock:
        assert reply == SOCKS5_OK
        client = client_name(sock)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # our FIN travels as SSH EOF; the answer comes after
        answer = recv_all(sock, TRANSFER_TIMEOUT)
    expected = EchoTarget.expected_reply(payload)
    assert answer == expected
    event = shared_tunnel.wait_event("connection_closed", client=client)
    assert (event["bytes_up"], event["bytes_down"]) == (len(payload), len(expected))


def test_target_half_close_client_can_still_send(
    shared_tunnel: Running, talker_target: TalkerTarget
) -> None:
    done = len(talker_target.received)
    sent = 777_777
    sock, reply = socks5_open(shared_tunnel.address, "127.0.0.1", talker_target.port)
    with sock:
        assert reply == SOCKS5_OK
        client = client_name(sock)
        assert recv_all(sock) == TalkerTarget.greeting  # greeting, then the target's EOF
        sock.sendall(payload_of(sent))  # the other direction is still open
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""
    # Other tests share this target; ours is one of the connections finished since `done`.
    assert wait_until(lambda: sent in talker_target.received[done:], 10), talker_target.received
    event = shared_tunnel.wait_event("connection_closed", client=client)
    assert (event["bytes_up"], event["bytes_down"]) == (sent, len(TalkerTarget.greeting))


def test_half_close_through_asyncssh_echo(shared_tunnel_asyncssh: Running) -> None:
    payload = payload_of(MiB, seed=3)
    sock, reply = socks5_open(shared_tunnel_asyncssh.address, "127.0.0.1", PORT_ECHO)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock, TRANSFER_TIMEOUT) == payload


# -- pipelining ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pipelined:
    name: str
    request: Callable[[int], bytes]
    reply_size: int
    reply_ok: Callable[[bytes], bool]


PIPELINED = [
    Pipelined(
        "socks5-ipv4",
        lambda port: socks5_greeting() + socks5_request("127.0.0.1", port),
        12,
        lambda reply: reply == b"\x05\x00" + SOCKS5_OK,
    ),
    Pipelined(
        "socks5-name",
        lambda port: socks5_greeting() + socks5_request("localhost", port),
        12,
        lambda reply: reply == b"\x05\x00" + SOCKS5_OK,
    ),
    Pipelined(
        "socks4",
        lambda port: socks4_request("127.0.0.1", port, user=b"u"),
        8,
        lambda reply: reply[:2] == b"\x00\x5a",
    ),
    Pipelined(
        "socks4a",
        lambda port: socks4_request("localhost", port),
        8,
        lambda reply: reply[:2] == b"\x00\x5a",
    ),
]


@pytest.mark.parametrize("case", PIPELINED, ids=[case.name for case in PIPELINED])
@pytest.mark.parametrize("eof_at_once", [False, True], ids=["eof-later", "eof-at-once"])
def test_pipelined_request_and_payload_in_one_write(
    shared_tunnel: Running, echo_target: EchoTarget, case: Pipelined, eof_at_once: bool
) -> None:
    payload = payload_of(200_000, seed=11)
    with connect_proxy(shared_tunnel.address) as sock:
        client = client_name(sock)
        # Everything before any reply: greeting, request and payload in one segment.
        sock.sendall(case.request(echo_target.port) + payload)
        if eof_at_once:
            sock.shutdown(socket.SHUT_WR)
        reply = recv_exact(sock, case.reply_size)
        assert case.reply_ok(reply), reply
        if not eof_at_once:
            sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock, TRANSFER_TIMEOUT)
    assert answer == EchoTarget.expected_reply(payload)
    event = shared_tunnel.wait_event("connection_closed", client=client)
    assert event["bytes_up"] == len(payload)


def test_pipelined_through_asyncssh_echo(tunnel_asyncssh: Running) -> None:
    payload = payload_of(100_000, seed=5)
    with connect_proxy(tunnel_asyncssh.address) as sock:
        sock.sendall(socks5_greeting() + socks5_request("127.0.0.1", PORT_ECHO) + payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_exact(sock, 12) == b"\x05\x00" + SOCKS5_OK
        assert recv_all(sock, TRANSFER_TIMEOUT) == payload


# -- full duplex -----------------------------------------------------------------------------


class _LiveEcho:
    """Echoes every chunk as it arrives (unlike EchoTarget, which answers after EOF)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TRANSFER_TIMEOUT)
        self.port = self._listener.getsockname()[1]
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="live-echo")
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(TRANSFER_TIMEOUT)
                while chunk := conn.recv(1 << 16):
                    conn.sendall(chunk)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self._listener.close()
        self._thread.join(TRANSFER_TIMEOUT)


def full_duplex(address: tuple[str, int], port: int, size: int) -> None:
    """Write ``size`` bytes while reading the echo; both directions loaded at once."""
    data = payload_of(size, seed=size)
    sock, reply = socks5_open(address, "127.0.0.1", port, timeout=TRANSFER_TIMEOUT)
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            for start in range(0, size, 1 << 18):
                sock.sendall(data[start : start + (1 << 18)])
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            failure.append(exc)

    with sock:
        assert reply == SOCKS5_OK
        thread = threading.Thread(target=writer, daemon=True, name="duplex-writer")
        thread.start()
        echoed = recv_all(sock, TRANSFER_TIMEOUT)
        thread.join(TRANSFER_TIMEOUT)
    assert not failure, failure
    assert len(echoed) == size
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()


def test_full_duplex_through_sshd(shared_tunnel: Running) -> None:
    echo = _LiveEcho()
    try:
        full_duplex(shared_tunnel.address, echo.port, 16 * MiB)
    finally:
        echo.close()
    assert echo.error is None, echo.error


def test_full_duplex_through_asyncssh(shared_tunnel_asyncssh: Running) -> None:
    full_duplex(shared_tunnel_asyncssh.address, PORT_ECHO, 16 * MiB)


# -- byte counts -----------------------------------------------------------------------------


def test_byte_counts_match_both_directions(shared_tunnel: Running, echo_target: EchoTarget) -> None:
    sizes = [1, 4096, 65_537, 1_000_003]
    for size in sizes:
        payload = payload_of(size, seed=size)
        sock, reply = socks5_open(shared_tunnel.address, "127.0.0.1", echo_target.port)
        with sock:
            assert reply == SOCKS5_OK
            client = client_name(sock)
            # Several writes, so the count is a sum, not one chunk.
            for start in range(0, size, 300_000):
                sock.sendall(payload[start : start + 300_000])
            sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock, TRANSFER_TIMEOUT)
        assert answer == EchoTarget.expected_reply(payload)
        event = shared_tunnel.wait_event("connection_closed", client=client)
        assert (event["bytes_up"], event["bytes_down"]) == (size, len(answer)), size
        assert event["duration"] >= 0


# -- flow control ----------------------------------------------------------------------------


class _StreamTarget:
    """Loopback TCP server for one connection at a time.

    ``mode="send"``: sends ``size`` bytes (BLOCK repeated) then closes. ``mode="sink"``:
    waits for ``gate`` before reading, then reads to EOF and answers sha256 and count.
    ``progress`` counts what the kernel accepted (send) or what was read (sink)."""

    def __init__(self, mode: str, size: int = STREAM_SIZE) -> None:
        self.mode = mode
        self.size = size
        self.progress = 0
        self.gate = threading.Event()
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TRANSFER_TIMEOUT)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"stream-{mode}")
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(TRANSFER_TIMEOUT)
                self._send(conn) if self.mode == "send" else self._sink(conn)
        except BaseException as exc:  # reported by the test, never lost in a thread
            self.error = exc
        finally:
            self.done.set()

    def _send(self, conn: socket.socket) -> None:
        view = memoryview(BLOCK)
        while self.progress < self.size:
            offset = self.progress % MiB
            end = min(MiB, offset + (self.size - self.progress))
            self.progress += conn.send(view[offset:end])

    def _sink(self, conn: socket.socket) -> None:
        if not self.gate.wait(TRANSFER_TIMEOUT):
            raise TimeoutError("gate never opened")
        digest = hashlib.sha256()
        while chunk := conn.recv(1 << 18):
            digest.update(chunk)
            self.progress += len(chunk)
        conn.sendall(f"{digest.hexdigest()}\n{self.progress}\n".encode())

    def close(self) -> None:
        self.gate.set()
        self._listener.close()
        self._thread.join(TRANSFER_TIMEOUT)


@pytest.fixture
def stream_target(request: pytest.FixtureRequest) -> Iterator[_StreamTarget]:
    target = _StreamTarget(request.param)
    try:
        yield target
    finally:
        target.close()


def wait_for_stall(progress: Callable[[], int], tunnel: Running) -> tuple[int, int]:
    """Wait until ``progress`` stops moving; returns (progress, peak RSS KiB seen)."""
    deadline = time.monotonic() + STALL_DEADLINE
    last, since, peak = progress(), time.monotonic(), tunnel.rss_kib()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        peak = max(peak, tunnel.rss_kib())
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= STALL_QUIET:
            return now, peak
    raise AssertionError(f"the transfer never stalled (progress {last} bytes)")


def small_buffer_socket(tunnel: Running) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Small kernel buffers on our side, so the stall shows up in pytunnel, not in the kernel.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.settimeout(TRANSFER_TIMEOUT)
    sock.connect(tunnel.address)
    return sock


def socks5_connect_on(sock: socket.socket, port: int) -> None:
    sock.sendall(socks5_greeting() + socks5_request("127.0.0.1", port))
    assert recv_exact(sock, 12) == b"\x05\x00" + SOCKS5_OK


@pytest.mark.slow
@pytest.mark.parametrize("stream_target", ["send"], indirect=True)
def test_flow_control_slow_reader_bounds_memory(
    tunnel: Running, stream_target: _StreamTarget
) -> None:
    with small_buffer_socket(tunnel) as sock:
        socks5_connect_on(sock, stream_target.port)
        client = client_name(sock)
        baseline = tunnel.rss_kib()
        # We read nothing: the target must end up blocked, pytunnel's memory flat.
        stalled_at, peak = wait_for_stall(lambda: stream_target.progress, tunnel)
        assert stalled_at < STREAM_SIZE, "the whole stream was buffered somewhere"
        growth = peak - baseline
        assert growth <= RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB while stalled"
        # Resume: every byte arrives, in order.
        digest = hashlib.sha256()
        received = 0
        while chunk := sock.recv(1 << 18):
            digest.update(chunk)
            received += len(chunk)
    assert stream_target.done.wait(TRANSFER_TIMEOUT)
    assert stream_target.error is None, stream_target.error
    assert received == STREAM_SIZE
    assert digest.hexdigest() == stream_digest(STREAM_SIZE)
    event = tunnel.wait_event("connection_closed", client=client)
    assert (event["bytes_up"], event["bytes_down"]) == (0, STREAM_SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("stream_target", ["sink"], indirect=True)
def test_flow_control_slow_target_bounds_memory(
    tunnel: Running, stream_target: _StreamTarget
) -> None:
    with small_buffer_socket(tunnel) as sock:
        socks5_connect_on(sock, stream_target.port)
        client = client_name(sock)
        baseline = tunnel.rss_kib()
        sent = [0]
        failure: list[BaseException] = []

        def writer() -> None:
            view = memoryview(BLOCK)
            try:
                while sent[0] < STREAM_SIZE:
                    sent[0] += sock.send(view[sent[0] % MiB :])
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=writer, daemon=True, name="slow-target-writer")
        thread.start()
        try:
            stalled_at, peak = wait_for_stall(lambda: sent[0], tunnel)
            assert stalled_at < STREAM_SIZE, "the whole upload was buffered somewhere"
            growth = peak - baseline
            assert growth <= RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB while stalled"
        finally:
            stream_target.gate.set()
            thread.join(TRANSFER_TIMEOUT)
        assert not failure, failure
        answer = recv_all(sock, TRANSFER_TIMEOUT)
    assert answer == f"{stream_digest(STREAM_SIZE)}\n{STREAM_SIZE}\n".encode()
    event = tunnel.wait_event("connection_closed", client=client)
    assert (event["bytes_up"], event["bytes_down"]) == (STREAM_SIZE, len(answer))
