"""``pytunnel --demo`` end to end: its in-process SSH server must forward as faithfully as
OpenSSH does, EOF and close in both directions, or finished connections stay "open" in the
live view and never get their ``connection_closed`` event."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures.pytunnel_proc import (
    PYTUNNEL,
    PytunnelFactory,
    Running,
    clean_env,
    client_name,
    recv_all,
    recv_exact,
    socks5_open,
)
from fixtures.targets import EchoTarget, TalkerTarget

# Generous: the machine is shared, and every wait ends as soon as its event arrives.
CLOSE_DEADLINE = 30.0
SCREEN_DEADLINE = 30.0
README = Path(__file__).resolve().parents[2] / "README.md"
TRY_LINE = re.compile(r"try: (curl -x socks5h://127\.0\.0\.1:(\d+) http://pytunnel\.demo/)")


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
    # A directory of its own: downloads in the test's tmp_path must not overwrite it.
    served = tmp_path / "www"
    served.mkdir()
    (served / "small.bin").write_bytes(body)
    handler = partial(_QuietFileHandler, directory=str(served))
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
    done = len(talker_target.received)  # the target is the session's: others used it too
    sock, reply = socks5_open(demo.address, talker_target.host, talker_target.port)
    with sock:
        assert reply[1] == 0
        assert recv_all(sock) == TalkerTarget.greeting  # the target's FIN reached us
        upload = b"x" * 100_000
        sock.sendall(upload)  # our side is still open after the target's EOF
        sock.shutdown(socket.SHUT_WR)
        assert talker_target.wait_received(done + 1, CLOSE_DEADLINE)[done:] == [len(upload)]
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


def _curl(curl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [curl, "-sS", "--max-time", "60", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_readme_live_view_steps(tmp_path: Path, file_server: tuple[int, bytes], curl: str) -> None:
    """What the README's top says to do for the live view: ``pytunnel --demo`` on a
    terminal, then the curl line it prints, from a second terminal. Both that page and a
    download from a server that closes first must leave the view with nothing open."""
    readme = README.read_text()
    top = readme[: readme.index("\n## ")]
    assert "\n    .venv/bin/pytunnel --demo\n" in top
    assert "curl -x socks5h://127.0.0.1:PORT http://pytunnel.demo/" in top
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux not installed")
    name = f"pytunnel-demo-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pidfile = tmp_path / "pytunnel.pid"

    def tmux_run(*args: str) -> str:
        result = subprocess.run(
            [tmux, "-L", name, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=15,
            env=clean_env(),
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def wait_screen(pattern: str) -> str:
        deadline = time.monotonic() + SCREEN_DEADLINE
        while not re.search(pattern, screen := tmux_run("capture-pane", "-p", "-t", "main")):
            assert time.monotonic() < deadline, f"screen never showed {pattern!r}:\n{screen}"
            time.sleep(0.1)
        return screen

    command = shlex.join([str(PYTUNNEL), "--demo", "--pidfile", str(pidfile)])
    tmux_run("new-session", "-d", "-s", "main", "-x", "120", "-y", "30", command)
    try:
        screen = wait_screen(r"● up")
        found = TRY_LINE.search(screen)
        assert found is not None, screen
        page = _curl(curl, *shlex.split(found.group(1))[1:])
        assert page.returncode == 0, page.stderr
        assert page.stdout.startswith("Hello from the far side of the tunnel.")
        port, body = file_server
        download = _curl(
            curl,
            "-o", str(tmp_path / "downloaded.bin"),
            "-x", f"socks5h://127.0.0.1:{found.group(2)}",
            f"http://127.0.0.1:{port}/small.bin",
        )  # fmt: skip
        assert download.returncode == 0, download.stderr
        assert (tmp_path / "downloaded.bin").read_bytes() == body
        wait_screen(r"served 2 +failed 0 +open 0")
        assert "no open connections" in wait_screen(r"no open connections")
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        subprocess.run([tmux, "-L", name, "kill-server"], capture_output=True, timeout=15)
