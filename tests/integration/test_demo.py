"""``pytunnel --demo`` end to end: its in-process SSH server must forward as faithfully as
OpenSSH does, EOF and close in both directions, or finished connections stay "open" in the
live view and never get their ``connection_closed`` event."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    Running,
    client_name,
    recv_all,
    recv_exact,
    socks5_open,
)
from fixtures.targets import EchoTarget, TalkerTarget

# Generous: the machine is shared, and every wait ends as soon as its event arrives.
CLOSE_DEADLINE = 30.0


@pytest.fixture
def demo(pytunnel_factory: PytunnelFactory) -> Running:
    return pytunnel_factory(["--demo", "-D", "127.0.0.1:0"])


class _QuietFileHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """What ``python3 -m http.server`` runs: HTTP/1.0, so the server closes after each
    response, before the client does."""
    body = bytes(range(256)) * 800
    (tmp_path / "small.bin").write_bytes(body)
    handler = partial(_QuietFileHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2})
    thread.start()
    try:
        yield int(server.server_address[1]), body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_curl_download_from_a_closing_http_server_is_closed(
    demo: Running, file_server: tuple[int, bytes], curl: str, tmp_path: Path
) -> None:
    port, body = file_server
    out = tmp_path / "out.bin"
    command = [curl, "-sS", "--max-time", "60", "-o", str(out)]
    command += ["-x", f"socks5h://{demo.netloc}", f"http://127.0.0.1:{port}/small.bin"]
    result = subprocess.run(
        command,
        capture_output=True,
        timeout=90,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == body
    opened = demo.wait_event("channel_opened", port=port)
    closed = demo.wait_event("connection_closed", CLOSE_DEADLINE, id=opened["id"])
    assert closed["bytes_down"] >= len(body)


def test_target_half_closes_first(demo: Running, talker_target: TalkerTarget) -> None:
    """The target sends, shuts its side, and still reads: the client then finishes."""
    sock, reply = socks5_open(demo.address, talker_target.host, talker_target.port)
    with sock:
        assert reply[1] == 0
        assert recv_all(sock) == TalkerTarget.greeting  # the target's FIN reached us
        upload = b"x" * 100_000
        sock.sendall(upload)  # our side is still open after the target's EOF
        sock.shutdown(socket.SHUT_WR)
        assert talker_target.wait_received(1, CLOSE_DEADLINE) == [len(upload)]
        me = client_name(sock)
        closed = demo.wait_event("connection_closed", CLOSE_DEADLINE, client=me)
        assert recv_all(sock) == b""
    assert closed["bytes_up"] == len(upload)
    assert closed["bytes_down"] == len(TalkerTarget.greeting)


def test_client_half_closes_first(demo: Running, echo_target: EchoTarget) -> None:
    """The client sends and shuts its side; the target answers after that EOF, then closes."""
    sock, reply = socks5_open(demo.address, echo_target.host, echo_target.port)
    with sock:
        assert reply[1] == 0
        upload = bytes(range(256)) * 400
        sock.sendall(upload)
        sock.shutdown(socket.SHUT_WR)
        expected = EchoTarget.expected_reply(upload)
        assert recv_exact(sock, len(expected)) == expected
        assert recv_all(sock) == b""
        closed = demo.wait_event("connection_closed", CLOSE_DEADLINE, client=client_name(sock))
    assert closed["bytes_up"] == len(upload)
    assert closed["bytes_down"] == len(expected)


def test_refused_target_fails_the_open(demo: Running, closed_port: int) -> None:
    """The demo connects before it confirms the channel, so a refused connect is a SOCKS5
    "connection refused" (0x05), not a success followed by an empty connection."""
    sock, reply = socks5_open(demo.address, "127.0.0.1", closed_port)
    with sock:
        assert reply[1] == 0x05
