"""The live view on a real terminal: pytunnel in a tmux pane of a fixed size, read back
with ``capture-pane`` while curl downloads through it slowly, then Ctrl-C.

Each test runs its own tmux server (``tmux -L NAME``) and kills it at teardown; pytunnel
and curl are stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fixtures.net import free_port
from fixtures.pytunnel_proc import PYTUNNEL, clean_env, server_args
from fixtures.sshd import SshdServer
from fixtures.targets import HttpTarget

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

COLUMNS, ROWS = 120, 30
EARLIER = "earlier output"
SCREEN_TIMEOUT = 20.0
POLL = 0.1


class Tmux:
    """One private tmux server with one pane running a shell command."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.socket = f"pytunnel-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
            env=clean_env(),
            cwd=self.workdir,
        )

    def start(self, command: str) -> None:
        result = self.run(
            "new-session", "-d", "-s", "main", "-x", str(COLUMNS), "-y", str(ROWS), command
        )
        assert result.returncode == 0, result.stderr

    def capture(self) -> str:
        result = self.run("capture-pane", "-p", "-t", "main")
        assert result.returncode == 0, result.stderr
        return result.stdout

    def send(self, *keys: str) -> None:
        result = self.run("send-keys", "-t", "main", *keys)
        assert result.returncode == 0, result.stderr

    def send_text(self, text: str) -> None:
        """Type ``text`` as it is (-l: no key names)."""
        result = self.run("send-keys", "-t", "main", "-l", text)
        assert result.returncode == 0, result.stderr

    def resize(self, columns: int) -> None:
        result = self.run("resize-window", "-t", "main", "-x", str(columns), "-y", str(ROWS))
        assert result.returncode == 0, result.stderr

    def wait_screen(self, predicate: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + SCREEN_TIMEOUT
        text = self.capture()
        while not predicate(text):
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {what}:\n{text}")
            time.sleep(POLL)
            text = self.capture()
        return text

    def kill_server(self) -> None:
        self.run("kill-server")


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    binary = shutil.which("tmux")
    if binary is None:
        pytest.skip("tmux not installed")
    server = Tmux(binary, tmp_path)
    try:
        yield server
    finally:
        server.kill_server()


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass
class LiveTunnel:
    """pytunnel in the pane, up, with its live view; curl downloads on demand."""

    tmux: Tmux
    port: int
    pidfile: Path
    server: str
    target: HttpTarget
    downloads: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def destination(self) -> str:
        return f"127.0.0.1:{self.target.port}"

    def start_download(self) -> subprocess.Popen[bytes]:
        """A download of /drip, which the server sends as a burst and then a trickle, so
        the connection stays open on the screen. (A rate-limited download of /big did
        not: loopback socket buffers can swallow all 8 MiB at once, and pytunnel closes
        its side as soon as the kernel has the bytes.)"""
        curl = shutil.which("curl")
        if curl is None:
            pytest.skip("curl not installed")
        download = subprocess.Popen(
            [curl, "-s", "--max-time", "90", "-o", os.devnull,
             "--socks5-hostname", f"127.0.0.1:{self.port}", self.target.url("/drip")],
            stdin=subprocess.DEVNULL,
            env=clean_env(),
        )  # fmt: skip
        self.downloads.append(download)
        return download

    def row(self, screen: str) -> str:
        rows = [line for line in screen.splitlines() if self.destination in line]
        assert len(rows) <= 1, screen
        return rows[0] if rows else ""

    def wait_row_with_bytes(self) -> str:
        pattern = re.compile(r"\sSOCKS5\s.*\d(\.\d)? (KiB|MiB)(\s|$)")
        return self.tmux.wait_screen(
            lambda s: bool(pattern.search(self.row(s))), "the download's row with bytes"
        )

    def close(self) -> None:
        for download in self.downloads:
            if download.poll() is None:
                download.kill()
                download.wait(10)
        pid = _pid_from(self.pidfile)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_live(
    tmux: Tmux, server: SshdServer, target: HttpTarget, workdir: Path, *extra: str
) -> LiveTunnel:
    """pytunnel with its live view in the pane, the session up."""
    port = free_port()
    pidfile = workdir / "pytunnel.pid"
    command = [str(PYTUNNEL), "-D", f"127.0.0.1:{port}", "--pidfile", str(pidfile),
               *extra, *server_args(server)]  # fmt: skip
    # "trap true INT": the shell survives Ctrl-C to report the status; a trap with a
    # command (unlike an ignored signal) is reset to the default in pytunnel.
    # "stty -a" afterwards: the terminal's modes as pytunnel left them (echo back on).
    # Output before pytunnel fills the pane, so the view starts at its bottom, as in a
    # terminal in use (and a resize reflows lines into and out of the history).
    script = (
        f"seq -f '{EARLIER} %g' 40; trap true INT; {shlex.join(command)}; echo EXIT=$?; "
        "stty -a; exec sleep 300"
    )
    tmux.start(f"sh -c {shlex.quote(script)}")
    live = LiveTunnel(tmux, port, pidfile, f"{server.user}@{server.host}:{server.port}", target)
    try:
        tmux.wait_screen(lambda s: pidfile.exists() and "● up" in s, "the session up")
    except BaseException:
        live.close()
        raise
    return live


@pytest.fixture
def live_tunnel(
    tmux: Tmux, sshd: SshdServer, http_target: HttpTarget, tmp_path: Path
) -> Iterator[LiveTunnel]:
    live = start_live(tmux, sshd, http_target, tmp_path)
    try:
        yield live
    finally:
        live.close()


def test_live_view_then_ctrl_c(live_tunnel: LiveTunnel) -> None:
    tmux = live_tunnel.tmux
    screen = tmux.capture()
    header = next(line for line in screen.splitlines() if not line.startswith(EARLIER))
    assert header.startswith(f"pytunnel {live_tunnel.server}  ● up "), screen
    assert f"listening: socks5h://127.0.0.1:{live_tunnel.port}" in screen
    assert "no open connections" in screen

    download = live_tunnel.start_download()
    screen = live_tunnel.wait_row_with_bytes()
    print(screen)  # shown on failure: the view as it was
    assert re.search(r"served\s+1\s+failed\s+0\s+open\s+1\s", screen), screen
    assert len(screen.rstrip("\n").splitlines()) <= ROWS
    download.kill()
    download.wait(10)
    tmux.wait_screen(lambda s: "no open connections" in s, "the download closed")

    tmux.send("C-c")
    screen = tmux.wait_screen(lambda s: "EXIT=" in s, "pytunnel's exit status")
    print(screen)
    assert "EXIT=130" in screen, screen
    summary = [line for line in screen.splitlines() if " ran " in line]
    assert len(summary) == 1, screen
    assert summary[0].startswith(f"pytunnel {live_tunnel.server} ran ")
    assert "1 served, 0 failed, 0 rejected" in summary[0]
    # The view was transient: nothing of the live table is left on the screen.
    for leftover in ("listening:", "no open connections", "destination", "● up", "served 1"):
        assert leftover not in screen, screen
    assert not live_tunnel.pidfile.exists()  # removed on exit
    assert_echo_is_back(tmux)


def _echo_flag(screen: str) -> str | None:
    """ "echo" or "-echo" from the "stty -a" lines on the screen."""
    found = re.search(r"(?:^|\s)(-?echo)(?=\s|$)", screen.split("EXIT=", 1)[1], re.MULTILINE)
    return found.group(1) if found else None


def assert_echo_is_back(tmux: Tmux) -> None:
    screen = tmux.wait_screen(lambda s: _echo_flag(s) is not None, "stty's modes")
    assert _echo_flag(screen) == "echo", screen
    # And typing shows again (sleep reads nothing: what shows is the terminal's echo).
    tmux.send_text("typed-after")
    tmux.wait_screen(lambda s: "typed-after" in s, "the terminal echoing again")


def _view_lines(screen: str) -> list[str]:
    return [line for line in screen.splitlines() if line.strip()]


def test_resizing_redraws_without_fragments(live_tunnel: LiveTunnel) -> None:
    tmux = live_tunnel.tmux
    live_tunnel.start_download()
    live_tunnel.wait_row_with_bytes()

    def drawn_for(columns: int) -> Callable[[str], bool]:
        # A frame drawn at this width: at 120 the table has its client column, at 60
        # it has not, and every line fits.
        def check(screen: str) -> bool:
            lines = screen.splitlines()
            heading = [line.split() for line in lines if line.lstrip().startswith("#")]
            return (
                bool(heading)
                and ("client" in heading[-1]) is (columns >= 120)
                and all(len(line.rstrip()) <= columns for line in lines)
            )

        return check

    for columns in (60, 120, 60, 120):
        tmux.resize(columns)
        tmux.wait_screen(drawn_for(columns), f"the view drawn at {columns} columns")
        # The next frame (the timer's), drawn over the last one.
        before = tmux.capture()
        screen = tmux.wait_screen(lambda s, b=before: s != b, "the next frame")
        print(screen)
        lines = [line for line in _view_lines(screen) if not line.startswith(EARLIER)]
        # Exactly one frame, and above it only what was there before: one header, one
        # listening line, the table, the totals; no piece of an earlier frame.
        assert sum(line.startswith("pytunnel ") for line in lines) == 1, screen
        assert lines[0].startswith("pytunnel "), screen
        assert lines[1].startswith("listening:"), screen
        assert lines[2].split()[:2] == ["#", "client" if columns >= 120 else "destination"]
        assert lines[3].split()[0] == "1", screen
        assert lines[4].startswith("served "), screen
        assert len(lines) <= 6, screen  # the totals may take two lines at 60 columns
    tmux.send("C-c")
    screen = tmux.wait_screen(lambda s: "EXIT=" in s, "pytunnel's exit status")
    print(screen)
    assert "EXIT=130" in screen, screen
    before_exit = [
        line for line in _view_lines(screen.split("EXIT=", 1)[0]) if not line.startswith(EARLIER)
    ]
    assert len(before_exit) == 1, screen
    assert before_exit[0].startswith(f"pytunnel {live_tunnel.server} ran "), screen


def test_q_quits_and_typed_keys_are_not_echoed(live_tunnel: LiveTunnel) -> None:
    tmux = live_tunnel.tmux
    tmux.send_text("x")  # not a key of the view: nothing happens, nothing shows
    tmux.wait_screen(lambda s: "● up" in s, "the view still up")
    tmux.send_text("qhello")
    tmux.send("Enter")
    screen = tmux.wait_screen(lambda s: "EXIT=" in s, "pytunnel's exit status")
    print(screen)
    # "q" is a normal quit: status 0, the same summary as Ctrl-C, the view gone.
    assert "EXIT=0" in screen, screen
    # Nothing typed shows, and no frame is left: only the summary below what was there.
    before_exit = [
        line for line in _view_lines(screen.split("EXIT=", 1)[0]) if not line.startswith(EARLIER)
    ]
    assert len(before_exit) == 1, screen
    assert before_exit[0].startswith(f"pytunnel {live_tunnel.server} ran "), screen
    assert "hello" not in screen, screen
    assert not live_tunnel.pidfile.exists()
    assert_echo_is_back(tmux)


def test_connection_age_is_since_it_opened(live_tunnel: LiveTunnel) -> None:
    live_tunnel.start_download()
    row = live_tunnel.row(live_tunnel.wait_row_with_bytes())
    age = row.split("SOCKS5", 1)[1].split()[:2]
    assert re.fullmatch(r"\d+ ms|\d+\.\d s", " ".join(age)), row


def test_a_fatal_error_gives_the_terminal_back(
    tmux: Tmux, make_sshd: Callable[..., SshdServer], http_target: HttpTarget, tmp_path: Path
) -> None:
    server = make_sshd()
    live = start_live(tmux, server, http_target, tmp_path, "--no-reconnect")
    try:
        server.stop(kill_sessions=True)
        screen = tmux.wait_screen(lambda s: "EXIT=" in s, "pytunnel's exit status")
        print(screen)
        assert "EXIT=255" in screen, screen
        before_exit = [
            line
            for line in _view_lines(screen.split("EXIT=", 1)[0])
            if not line.startswith(EARLIER)
        ]
        assert not any(line.startswith(("listening:", "served ")) for line in before_exit)
        assert any(line.startswith("pytunnel: ") for line in before_exit), screen
        assert_echo_is_back(tmux)
    finally:
        live.close()
