"""The measuring client: SOCKS5 spoken by hand on raw sockets.

The same few system calls for every subject, reads straight into one preallocated
buffer, no library between the socket and the clock: what is measured is the proxy, not
the client. Loopback only.

Protocols of the targets (see ``targets.py``): the source wants an 8-byte big-endian
count and sends that many bytes; the sink counts until EOF and answers with the count;
the echo echoes.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from dataclasses import dataclass

HOST = "127.0.0.1"
COUNT = struct.Struct("!Q")
RECV_BUFFER = 1024 * 1024
SEND_CHUNK = 1024 * 1024
GREETING = b"\x05\x01\x00"  # SOCKS5, one method: no authentication
GREETING_REPLY = b"\x05\x00"

_recv_buffer = bytearray(RECV_BUFFER)
_recv_view = memoryview(_recv_buffer)
_send_block = memoryview(bytes(SEND_CHUNK))


class ClientError(RuntimeError):
    """The proxy or a target did not do what the protocol says."""


def connect_request(target_port: int) -> bytes:
    """CONNECT to 127.0.0.1:target_port, the address as IPv4 (no name lookup anywhere)."""
    return b"\x05\x01\x00\x01" + socket.inet_aton(HOST) + struct.pack("!H", target_port)


def reply_length(head: bytes | bytearray) -> int | None:
    """Length of the whole SOCKS5 reply that starts with ``head``; None if more bytes are
    needed to tell. Raises ClientError for a refusal or garbage."""
    if len(head) < 2:
        return None
    if head[0] != 5:
        raise ClientError(f"not a SOCKS5 reply: {bytes(head[:4]).hex()}")
    if head[1] != 0:
        raise ClientError(f"proxy refused the request: reply code 0x{head[1]:02x}")
    if len(head) < 5:
        return None
    atyp = head[3]
    if atyp == 1:
        return 4 + 4 + 2
    if atyp == 4:
        return 4 + 16 + 2
    if atyp == 3:
        return 4 + 1 + head[4] + 2
    raise ClientError(f"unknown address type in reply: {atyp}")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ClientError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def socks_connect(proxy_port: int, target_port: int, timeout: float = 30.0) -> socket.socket:
    """A blocking socket through the proxy to 127.0.0.1:target_port, reply consumed."""
    sock = socket.create_connection((HOST, proxy_port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(GREETING)
        if _recv_exact(sock, 2) != GREETING_REPLY:
            raise ClientError("proxy did not accept 'no authentication'")
        sock.sendall(connect_request(target_port))
        head = _recv_exact(sock, 5)
        length = reply_length(head)
        assert length is not None
        _recv_exact(sock, length - len(head))
    except BaseException:
        sock.close()
        raise
    return sock


def echo_once(proxy_port: int, echo_port: int, timeout: float = 5.0) -> None:
    """One connection, one byte there and back: proves the proxy works end to end."""
    with socks_connect(proxy_port, echo_port, timeout) as sock:
        sock.sendall(b"x")
        if _recv_exact(sock, 1) != b"x":
            raise ClientError("echo answered something else")


def download(proxy_port: int, source_port: int, size: int) -> float:
    """Seconds to receive ``size`` bytes from the source (handshake excluded)."""
    with socks_connect(proxy_port, source_port) as sock:
        started = time.perf_counter()
        sock.sendall(COUNT.pack(size))
        got = 0
        recv_into = sock.recv_into
        while got < size:
            n = recv_into(_recv_view)
            if not n:
                raise ClientError(f"download ended after {got} of {size} bytes")
            got += n
        elapsed = time.perf_counter() - started
        if sock.recv(1):
            raise ClientError("source sent more than asked")
    return elapsed


def upload(proxy_port: int, sink_port: int, size: int) -> float:
    """Seconds to send ``size`` bytes to the sink until the sink confirms the count."""
    with socks_connect(proxy_port, sink_port) as sock:
        started = time.perf_counter()
        left = size
        sendall = sock.sendall
        while left > 0:
            n = min(SEND_CHUNK, left)
            sendall(_send_block[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        (count,) = COUNT.unpack(_recv_exact(sock, COUNT.size))
        elapsed = time.perf_counter() - started
    if count != size:
        raise ClientError(f"sink counted {count} bytes, sent {size}")
    return elapsed


def setups(proxy_port: int, echo_port: int, count: int) -> tuple[float, list[float]]:
    """``count`` sequential setups (connect, SOCKS5 handshake, 1-byte echo, close).
    Returns the wall time and the latency of each."""
    latencies: list[float] = []
    request = connect_request(echo_port)
    wall = time.perf_counter()
    for _ in range(count):
        started = time.perf_counter()
        sock = socket.create_connection((HOST, proxy_port), timeout=30.0)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(GREETING)
            if _recv_exact(sock, 2) != GREETING_REPLY:
                raise ClientError("proxy did not accept 'no authentication'")
            sock.sendall(request)
            head = _recv_exact(sock, 5)
            length = reply_length(head)
            assert length is not None
            _recv_exact(sock, length - len(head))
            sock.sendall(b"x")
            if _recv_exact(sock, 1) != b"x":
                raise ClientError("echo answered something else")
        finally:
            sock.close()
        latencies.append(time.perf_counter() - started)
    return time.perf_counter() - wall, latencies


# -- many connections at once: one selector, one state machine per connection ------------

_CONNECTING, _GREETING, _REPLY, _BODY, _HELD = range(5)


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    state: int = _CONNECTING
    buffer: bytes = b""
    want: int = 0
    got: int = 0
    index: int = 0


class _Many:
    """Drives ``total`` connections through the proxy; at most ``max_pending`` are in
    the handshake at once, so no listener's accept queue (ssh's is 128) overflows and
    the figure is the relay's, not the kernel's SYN retry timer's."""

    def __init__(
        self,
        proxy_port: int,
        target_port: int,
        total: int,
        *,
        payload: bytes,
        expect: int,
        hold: bool,
        max_pending: int,
        timeout: float,
    ) -> None:
        self.proxy_port = proxy_port
        self.request = connect_request(target_port)
        self.total = total
        self.payload = payload
        self.expect = expect
        self.hold = hold
        self.max_pending = max_pending
        self.deadline = time.monotonic() + timeout
        self.selector = selectors.DefaultSelector()
        self.started = 0
        self.pending = 0
        self.finished = 0
        self.held: list[socket.socket] = []
        self.live: list[_Conn] = []

    def _start_more(self) -> None:
        while self.started < self.total and self.pending < self.max_pending:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((HOST, self.proxy_port))
            if err not in (0, 115):  # 115: EINPROGRESS
                sock.close()
                raise ClientError(f"connect to the proxy failed: errno {err}")
            conn = _Conn(sock, index=self.started)
            self.live.append(conn)
            self.selector.register(sock, selectors.EVENT_WRITE, conn)
            self.started += 1
            self.pending += 1

    def run(self) -> list[socket.socket]:
        try:
            self._start_more()
            while self.finished < self.total:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise ClientError(
                        f"timed out: {self.finished} of {self.total} connections done, "
                        f"{self.pending} in the handshake"
                    )
                for key, _ in self.selector.select(min(left, 1.0)):
                    self._step(key.data)
                self._start_more()
        except BaseException:
            for conn in self.live:
                conn.sock.close()
            raise
        finally:
            self.selector.close()
        return self.held

    def _step(self, conn: _Conn) -> None:
        sock = conn.sock
        if conn.state == _CONNECTING:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise ClientError(f"connection {conn.index} to the proxy failed: errno {err}")
            self._send(sock, GREETING)
            conn.state = _GREETING
            self.selector.modify(sock, selectors.EVENT_READ, conn)
            return
        if conn.state == _BODY:
            n = sock.recv_into(_recv_view)
            if n == 0:
                if conn.got != self.expect:
                    raise ClientError(f"connection {conn.index}: EOF after {conn.got} bytes")
                self._done(conn)
                return
            conn.got += n
            if self.hold and conn.got >= self.expect:
                self.selector.unregister(sock)
                conn.state = _HELD
                self.held.append(sock)
                self.finished += 1
            return
        data = sock.recv(256)
        if not data:
            raise ClientError(f"connection {conn.index}: closed by the proxy in the handshake")
        conn.buffer += data
        if conn.state == _GREETING:
            if len(conn.buffer) < 2:
                return
            if conn.buffer[:2] != GREETING_REPLY:
                raise ClientError("proxy did not accept 'no authentication'")
            conn.buffer = conn.buffer[2:]
            self._send(sock, self.request)
            conn.state = _REPLY
        if conn.state == _REPLY:
            length = reply_length(conn.buffer)
            if length is None or len(conn.buffer) < length:
                return
            surplus = len(conn.buffer) - length
            conn.buffer = b""
            conn.state = _BODY
            conn.got = surplus
            self.pending -= 1
            self._send(sock, self.payload)

    def _done(self, conn: _Conn) -> None:
        self.selector.unregister(conn.sock)
        conn.sock.close()
        self.finished += 1

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> None:
        # A few bytes into an empty socket buffer: always all of them at once.
        if sock.send(data) != len(data):
            raise ClientError("short send of a handshake message")


def concurrent_download(
    proxy_port: int, source_port: int, conns: int, size: int, *, max_pending: int = 64
) -> float:
    """Wall seconds for ``conns`` connections to download ``size`` bytes each, all open
    at the same time (first connect to last byte)."""
    started = time.perf_counter()
    _Many(
        proxy_port,
        source_port,
        conns,
        payload=COUNT.pack(size),
        expect=size,
        hold=False,
        max_pending=max_pending,
        timeout=120.0,
    ).run()
    return time.perf_counter() - started


def open_many(
    proxy_port: int, echo_port: int, conns: int, *, max_pending: int = 64
) -> list[socket.socket]:
    """``conns`` connections through the proxy to the echo target, each proven open by a
    1-byte round trip, returned open (the caller closes them)."""
    return _Many(
        proxy_port,
        echo_port,
        conns,
        payload=b"x",
        expect=1,
        hold=True,
        max_pending=max_pending,
        timeout=120.0,
    ).run()
