"""Adversarial protocol, robustness and security cases, end to end against the real
console script and a real OpenSSH sshd (plus the in-process asyncssh server).

Each known bug is an ``xfail(strict=True)`` test whose reason starts with ``BUG:``; the
other tests pin edge cases that work so they keep working. Everything stays on loopback.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from fixtures.net import LOOPBACK4, LOOPBACK6, ipv6_loopback_available
from fixtures.pytunnel_proc import (
    Running,
    closed_by_peer,
    connect_proxy,
    recv_all,
    recv_exact,
    run_pytunnel,
    running_pytunnel,
    server_args,
    socks4_request,
    socks5_greeting,
    socks5_open,
    socks5_request,
)
from fixtures.replies import SOCKS4_FAILED, SOCKS4_OK, SOCKS5_OK, socks5_failure
from fixtures.sshd import SshdServer

pytestmark = pytest.mark.timeout(60)

IO_TIMEOUT = 10.0


class ScriptedTarget:
    """A loopback TCP server running ``handler(conn)`` in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = LOOPBACK4) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.handler = handler
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(IO_TIMEOUT * 3)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            self.handler(conn)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def read_to_eof(conn: socket.socket) -> bytes:
    parts: list[bytes] = []
    while chunk := conn.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


def echo_handler(conn: socket.socket) -> None:
    while chunk := conn.recv(65536):
        conn.sendall(chunk)


@pytest.fixture(scope="module")
def echo4() -> Iterator[ScriptedTarget]:
    target = ScriptedTarget(echo_handler)
    yield target
    target.stop()


@pytest.fixture(scope="module")
def tunnel(sshd: SshdServer) -> Iterator[Running]:
    with running_pytunnel(["-D", "127.0.0.1:0", *server_args(sshd)]) as running:
        yield running


def socks5_connected(tunnel: Running, request: bytes) -> socket.socket:
    sock = connect_proxy(tunnel.address)
    sock.sendall(socks5_greeting())
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(request)
    return sock


# -- SOCKS5 byte by byte ---------------------------------------------------------------


def test_socks5_duplicate_methods(tunnel: Running, echo4: ScriptedTarget) -> None:
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(b"\x05\x05\x02\x00\x00\x02\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(socks5_request(LOOPBACK4, echo4.port) + b"ping")
        assert recv_exact(sock, 10) == SOCKS5_OK
        assert recv_exact(sock, 4) == b"ping"


def test_socks5_255_methods(tunnel: Running, echo4: ScriptedTarget) -> None:
    with connect_proxy(tunnel.address) as sock:
        methods = bytes(range(1, 255)) + b"\x00"
        sock.sendall(b"\x05\xff" + methods)
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(socks5_request(LOOPBACK4, echo4.port) + b"x")
        assert recv_exact(sock, 10) == SOCKS5_OK
        assert recv_exact(sock, 1) == b"x"


def test_socks5_zero_methods_is_no_acceptable(tunnel: Running) -> None:
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(b"\x05\x00")
        assert recv_exact(sock, 2) == b"\x05\xff"
        assert closed_by_peer(sock) == b""


def test_socks5_everything_in_one_segment(tunnel: Running, echo4: ScriptedTarget) -> None:
    # Greeting, request and payload before the method selection reply was read.
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks5_greeting() + socks5_request(LOOPBACK4, echo4.port) + b"early")
        assert recv_exact(sock, 12) == b"\x05\x00" + SOCKS5_OK
        assert recv_exact(sock, 5) == b"early"


def test_socks5_byte_by_byte(tunnel: Running, echo4: ScriptedTarget) -> None:
    with connect_proxy(tunnel.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in socks5_greeting() + socks5_request("localhost", echo4.port):
            sock.send(bytes((byte,)))
        assert recv_exact(sock, 12) == b"\x05\x00" + SOCKS5_OK
        sock.sendall(b"ok")
        assert recv_exact(sock, 2) == b"ok"


def test_socks5_pipelined_second_request_is_payload(tunnel: Running, echo4: ScriptedTarget) -> None:
    second = socks5_request(LOOPBACK4, echo4.port)
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks5_greeting() + socks5_request(LOOPBACK4, echo4.port) + second)
        assert recv_exact(sock, 12) == b"\x05\x00" + SOCKS5_OK
        assert recv_exact(sock, len(second)) == second


def test_socks5_half_close_after_request(tunnel: Running, echo4: ScriptedTarget) -> None:
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks5_greeting() + socks5_request(LOOPBACK4, echo4.port) + b"bye")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock, IO_TIMEOUT) == b"\x05\x00" + SOCKS5_OK + b"bye"


def test_socks5_domain_255_bytes(tunnel: Running) -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 63])  # 255 bytes
    assert len(name) == 255
    with socks5_connected(tunnel, socks5_request(name, 80)) as sock:
        reply = recv_exact(sock, 10)
        assert reply[:2] in (b"\x05\x04", b"\x05\x01")
        assert closed_by_peer(sock) == b""


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_socks5_ipv6_atyp(tunnel: Running) -> None:
    target = ScriptedTarget(echo_handler, LOOPBACK6)
    try:
        with socks5_connected(tunnel, socks5_request(LOOPBACK6, target.port)) as sock:
            assert recv_exact(sock, 10) == SOCKS5_OK
            sock.sendall(b"six")
            assert recv_exact(sock, 3) == b"six"
    finally:
        target.stop()


def test_socks5_port_zero(tunnel: Running) -> None:
    with socks5_connected(tunnel, socks5_request(LOOPBACK4, 0)) as sock:
        reply = recv_exact(sock, 10)
        assert reply[0] == 5
        assert reply[1] != 0
        assert closed_by_peer(sock) == b""


def test_socks5_unknown_atyp(tunnel: Running) -> None:
    with socks5_connected(tunnel, b"\x05\x01\x00\x09\x7f\x00\x00\x01\x00\x50") as sock:
        assert recv_exact(sock, 10) == socks5_failure(8)
        assert closed_by_peer(sock) == b""


def test_socks5_commands_beyond_the_rfc(tunnel: Running) -> None:
    # RFC 1928 has CONNECT, BIND and UDP ASSOCIATE; anything else is 0x07, then a close.
    for command in (0, 4, 0x7F, 0xFF):
        with socks5_connected(tunnel, socks5_request(LOOPBACK4, 80, command)) as sock:
            assert recv_exact(sock, 10) == socks5_failure(7)
            assert closed_by_peer(sock) == b""


# -- SOCKS4 / 4a ----------------------------------------------------------------------


def test_socks4a_empty_host(tunnel: Running) -> None:
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(b"\x04\x01\x00\x50\x00\x00\x00\x01user\x00\x00")
        assert recv_exact(sock, 8)[:2] == SOCKS4_FAILED
        assert closed_by_peer(sock) == b""


def test_socks4_long_user_id(tunnel: Running, echo4: ScriptedTarget) -> None:
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks4_request(LOOPBACK4, echo4.port, user=b"u" * 255) + b"hi")
        assert recv_exact(sock, 8)[:2] == SOCKS4_OK
        assert recv_exact(sock, 2) == b"hi"
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks4_request(LOOPBACK4, echo4.port, user=b"u" * 300))
        assert recv_exact(sock, 8)[:2] == SOCKS4_FAILED
        assert closed_by_peer(sock) == b""


def test_socks4a_name(tunnel: Running, echo4: ScriptedTarget) -> None:
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks4_request("localhost", echo4.port) + b"4a")
        assert recv_exact(sock, 8)[:2] == SOCKS4_OK
        assert recv_exact(sock, 2) == b"4a"


# -- big transfers ----------------------------------------------------------------------

BIG = 50 * 1024 * 1024


def blast_and_close(conn: socket.socket) -> None:
    chunk = bytes(range(256)) * 256
    for _ in range(BIG // len(chunk)):
        conn.sendall(chunk)


def test_target_sends_50mib_and_closes(tunnel: Running) -> None:
    target = ScriptedTarget(blast_and_close)
    try:
        sock, reply = socks5_open(tunnel.address, LOOPBACK4, target.port)
        with sock:
            assert reply == SOCKS5_OK
            data = recv_all(sock, 30)
        assert len(data) == BIG
    finally:
        target.stop()


# -- HTTP proxy ---------------------------------------------------------------------------


def read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """Head and the rest (whatever followed the blank line in the same reads)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def http_exchange(tunnel: Running, raw: bytes, timeout: float = IO_TIMEOUT) -> bytes:
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(raw)
        return recv_all(sock, timeout)


def test_http_request_line_70k_in_one_read_is_answered(tunnel: Running) -> None:
    # A complete 70 KiB request line arriving in one read: answered (here 502 from the
    # closed port), never a crash or a hang.
    raw = b"GET http://127.0.0.1:1/" + b"a" * 70 * 1024 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = http_exchange(tunnel, raw)
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]


def test_http_conflicting_content_lengths_rejected(tunnel: Running) -> None:
    raw = (
        b"POST http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Content-Length: 4\r\n\r\nabcd"
    )
    assert http_exchange(tunnel, raw).startswith(b"HTTP/1.1 400 ")


class RecordingOrigin:
    """A keep-alive HTTP/1.1 origin that frames request bodies by Content-Length first
    (as many naive servers do) and records every request head and body it parsed."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []
        self.target = ScriptedTarget(self._serve)
        self.port = self.target.port

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            fields = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(b":") for line in lines[1:])
            }
            body = b""
            if b"content-length" in fields:
                size = int(fields[b"content-length"])
                while len(buf) < size:
                    buf += conn.recv(65536)
                body, buf = buf[:size], buf[size:]
            elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    while b"\r\n" not in buf:
                        buf += conn.recv(65536)
                    size_line, _, buf = buf.partition(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    while len(buf) < size + 2:
                        buf += conn.recv(65536)
                    body, buf = body + buf[:size], buf[size + 2 :]
                    if size == 0:
                        break
            self.requests.append((head, body))
            target = lines[0].split(b" ")[1] if len(lines[0].split(b" ")) > 1 else b"?"
            if target == b"/204":
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
                continue
            if target == b"/304":
                conn.sendall(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
                continue
            if target == b"/half":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
                return
            if target == b"/eof":
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 1000)
                return
            answer = b"body=" + body + b" target=" + target
            length = b"Content-Length: %d\r\n\r\n" % len(answer)
            if lines[0].startswith(b"HEAD "):
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + length)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + length + answer)

    def heads(self) -> list[bytes]:
        return [head for head, _ in self.requests]

    def stop(self) -> None:
        self.target.stop()


@pytest.fixture
def origin() -> Iterator[RecordingOrigin]:
    server = RecordingOrigin()
    yield server
    server.stop()


def absolute(
    origin: RecordingOrigin, path: str, extra: bytes = b"", method: bytes = b"GET"
) -> bytes:
    host = b"127.0.0.1:%d" % origin.port
    return (
        method
        + b" http://"
        + host
        + path.encode()
        + b" HTTP/1.1\r\nHost: "
        + host
        + b"\r\n"
        + extra
    )


def test_http_chunked_post_is_forwarded(tunnel: Running, origin: RecordingOrigin) -> None:
    raw = absolute(
        origin, "/c", b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n", b"POST"
    )
    answer = http_exchange(tunnel, raw + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert answer.endswith(b"\r\n\r\nbody=hello world target=/c")


def test_http_pipelined_keepalive_head_204_304(tunnel: Running, origin: RecordingOrigin) -> None:
    raw = (
        absolute(origin, "/h", b"\r\n", b"HEAD")
        + absolute(origin, "/204", b"\r\n")
        + absolute(origin, "/304", b"Proxy-Connection: keep-alive\r\n\r\n")
        + absolute(origin, "/p", b"Content-Length: 3\r\n\r\nabc", b"POST")
        + absolute(origin, "/last", b"Connection: close\r\n\r\n")
    )
    answer = http_exchange(tunnel, raw)
    assert answer.count(b"HTTP/1.1 ") == 5
    assert b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 " in answer
    assert answer.endswith(b"body= target=/last")
    assert b"body=abc target=/p" in answer
    # One upstream connection carried them all, without the hop-by-hop header.
    assert len(origin.requests) == 5
    assert all(b"proxy-connection" not in head.lower() for head in origin.heads())


def test_http10_client(tunnel: Running, origin: RecordingOrigin) -> None:
    host = b"127.0.0.1:%d" % origin.port
    answer = http_exchange(tunnel, b"GET http://" + host + b"/old HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"body= target=/old")


def test_http_origin_closes_mid_response(tunnel: Running, origin: RecordingOrigin) -> None:
    answer = http_exchange(tunnel, absolute(origin, "/half", b"\r\n"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-length: 100" in head.lower()
    assert body == b"x" * 50  # then closed: the client sees a short body, not a hang


def test_http_close_delimited_response_is_rechunked(
    tunnel: Running, origin: RecordingOrigin
) -> None:
    raw = absolute(origin, "/eof", b"\r\n") + absolute(origin, "/n", b"Connection: close\r\n\r\n")
    answer = http_exchange(tunnel, raw)
    assert b"transfer-encoding: chunked" in answer.lower()
    assert b"3e8\r\n" + b"y" * 1000 + b"\r\n0\r\n\r\nHTTP/1.1 200 " in answer
    assert answer.endswith(b"target=/n")


def test_http_connect_pipelined_and_half_closed(tunnel: Running, origin: RecordingOrigin) -> None:
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % origin.port
            + b"GET /in HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock, IO_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
    assert answer.endswith(b"target=/in")


def test_http_cl_te_request_is_not_smuggled(tunnel: Running, origin: RecordingOrigin) -> None:
    raw = absolute(
        origin,
        "/x",
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        b"POST",
    )
    answer = http_exchange(tunnel, raw + b"3\r\nabc\r\n0\r\n\r\n")
    if answer.startswith(b"HTTP/1.1 400 "):
        return  # rejecting it is fine too
    # The origin (Content-Length first) must see exactly one request with body "abc".
    assert origin.requests == [(origin.requests[0][0], b"abc")]
    assert b"content-length" not in origin.requests[0][0].lower()


def test_http_absolute_form_host_header_is_replaced(
    tunnel: Running, origin: RecordingOrigin
) -> None:
    raw = (
        b"GET http://127.0.0.1:%d/v HTTP/1.1\r\nHost: secret.internal\r\n"
        b"Connection: close\r\n\r\n" % origin.port
    )
    assert http_exchange(tunnel, raw).startswith(b"HTTP/1.1 200 ")
    head = origin.requests[0][0].lower()
    assert b"host: 127.0.0.1:%d" % origin.port in head
    assert b"secret.internal" not in head


# -- --allow / --deny ------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo6() -> Iterator[ScriptedTarget]:
    if not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback")
    target = ScriptedTarget(echo_handler, LOOPBACK6)
    yield target
    target.stop()


@pytest.fixture(scope="module")
def ruled(sshd: SshdServer, echo4: ScriptedTarget, echo6: ScriptedTarget) -> Iterator[Running]:
    rules = ["--deny", "::1", "--deny", f"127.0.0.0/8:{echo4.port}"]
    with running_pytunnel(["-D", "127.0.0.1:0", *rules, *server_args(sshd)]) as running:
        yield running


def socks5_name_reply(tunnel: Running, name: str, port: int) -> bytes:
    name_bytes = name.encode()
    request = b"\x05\x01\x00\x03" + bytes((len(name_bytes),)) + name_bytes + struct.pack("!H", port)
    with socks5_connected(tunnel, request) as sock:
        return recv_exact(sock, 10)


@pytest.mark.parametrize("name", ["::1", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "127.1"])
def test_deny_rules_catch_numeric_spellings(
    ruled: Running, echo4: ScriptedTarget, echo6: ScriptedTarget, name: str
) -> None:
    port = echo4.port if "." in name else echo6.port
    assert socks5_name_reply(ruled, name, port) == socks5_failure(2)


def test_deny_exact_ipv6_with_scope_id(ruled: Running, echo6: ScriptedTarget) -> None:
    assert socks5_name_reply(ruled, "::1%1", echo6.port) == socks5_failure(2)


def test_deny_loopback_block_catches_unspecified_address(
    ruled: Running, echo4: ScriptedTarget
) -> None:
    assert socks5_name_reply(ruled, "0.0.0.0", echo4.port) == socks5_failure(2)


# -- listeners, load, shutdown ------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_port_in_use_on_one_family_exits_3(sshd: SshdServer, family: str) -> None:
    host = LOOPBACK6 if family == "ipv6" else LOOPBACK4
    if family == "ipv6" and not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback")
    blocker = socket.socket(socket.AF_INET6 if family == "ipv6" else socket.AF_INET)
    with blocker:
        blocker.bind((host, 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        finished = run_pytunnel(["-D", str(port), *server_args(sshd)], timeout=30)
    assert finished.returncode == 3
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert where in finished.stderr
    assert "Traceback" not in finished.stderr


def test_300_clients_some_misbehaving(tunnel: Running, echo4: ScriptedTarget) -> None:
    held: list[socket.socket] = []
    try:
        for index in range(300):
            sock = connect_proxy(tunnel.address)
            if index % 3 == 0:  # stalls mid-greeting
                sock.sendall(b"\x05\x02")
                held.append(sock)
            elif index % 3 == 1:  # garbage
                sock.sendall(b"\x16\x03\x01\x00")
                held.append(sock)
            else:  # RST right after the first byte
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(b"\x05")
                sock.close()
        good: list[socket.socket] = []
        for _ in range(50):
            sock = connect_proxy(tunnel.address)
            good.append(sock)
            sock.sendall(socks5_greeting() + socks5_request("localhost", echo4.port) + b"ok")
        held.extend(good)
        for sock in good:
            assert recv_exact(sock, 14) == b"\x05\x00" + SOCKS5_OK + b"ok"
    finally:
        for sock in held:
            sock.close()
    assert tunnel.alive
    assert "Traceback" not in tunnel.stderr_text()


def test_client_rst_mid_transfer(tunnel: Running) -> None:
    target = ScriptedTarget(blast_and_close)
    try:
        for _ in range(5):
            sock, reply = socks5_open(tunnel.address, LOOPBACK4, target.port)
            assert reply == SOCKS5_OK
            recv_exact(sock, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        sock, reply = socks5_open(tunnel.address, LOOPBACK4, target.port)
        with sock:
            assert reply == SOCKS5_OK
            assert len(recv_exact(sock, 1 << 20)) == 1 << 20
    finally:
        target.stop()
    assert tunnel.alive
    assert "Traceback" not in tunnel.stderr_text()


def test_sigterm_during_heavy_traffic(sshd: SshdServer) -> None:
    target = ScriptedTarget(blast_and_close)
    socks: list[socket.socket] = []
    try:
        with running_pytunnel(["-D", "127.0.0.1:0", *server_args(sshd)]) as running:
            for _ in range(4):
                sock, reply = socks5_open(running.address, LOOPBACK4, target.port)
                socks.append(sock)
                assert reply == SOCKS5_OK
                recv_exact(sock, 1 << 20)
            assert running.stop() == 0
            assert "Traceback" not in running.stderr_text()
    finally:
        for sock in socks:
            sock.close()
        target.stop()
