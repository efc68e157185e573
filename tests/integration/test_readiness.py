"""Readiness: the port accepts once the tunnel is up, not before.

pytunnel binds every ``-D`` port first (a port in use fails before any prompt, exit 3)
but listens only once the first SSH session is authenticated, so a script that polls
the port, as it did with ``ssh -f -D``, sees it refused until the tunnel works, and a
start-up that fails never accepted anyone.

The start-up is held where the test chooses, so "during the start-up" is a fact and not
a guess about timing: a TCP hop in front of the real sshd that passes nothing on until
released, or a password prompt on a pseudo-terminal that is answered when the test says.
While held, the test checks that pytunnel owns the port (it cannot be bound) and that a
connection to it is refused; meanwhile a client polls the port in a loop from the moment
pytunnel starts, and must never be accepted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from fixtures.asyncssh_server import ALICE, PORT_ECHO, AsyncsshServer
from fixtures.net import free_port, wait_until
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    Running,
    closed_by_peer,
    recv_all,
    server_args,
    socks5_open,
    spawn,
)
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget

pexpect = pytest.importorskip("pexpect")

from fixtures.pty_driver import PtyTunnel  # noqa: E402 (needs pexpect)

pytestmark = pytest.mark.timeout(90)

LOOPBACK = "127.0.0.1"
SOCKS5_GENERAL_FAILURE = b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"
PORT_ATTEMPTS = 5
HOLD_TIMEOUT = 30.0  # generous: pytunnel starts Python first, on a loaded machine
EXIT_TIMEOUT = 30.0
RECONNECT_DEADLINE = 20.0
POLL_PAUSE = 0.002  # keeps the loop tight without taking a whole core from pytunnel
ListenCheck = Callable[[int], None]


# -- the port, seen from outside ------------------------------------------------------------


def connect_errno(port: int) -> int:
    """0 if a TCP connection to the port was accepted, else the errno of the refusal."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        return sock.connect_ex((LOOPBACK, port))


def port_is_held(port: int) -> bool:
    """True if some socket owns the port (our bind, without SO_REUSEADDR, is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def assert_bound_but_refusing(port: int, describe: Callable[[], str]) -> None:
    """pytunnel owns the port and is in the middle of its start-up: a client is refused
    by the kernel, as if nothing were there."""
    assert port_is_held(port), describe()
    assert connect_errno(port) == errno.ECONNREFUSED, describe()


class Poller:
    """A client connecting to the port over and over, as a start-up script would; counts
    what happened to each attempt."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.refused = 0
        self.accepted = 0
        self.errors: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="port-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome = connect_errno(self.port)
            if outcome == 0:
                self.accepted += 1
            elif outcome == errno.ECONNREFUSED:
                self.refused += 1
            else:
                self.errors.append(outcome)
            self._stop.wait(POLL_PAUSE)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def assert_never_accepted(self) -> None:
        assert self.accepted == 0, f"accepted {self.accepted} time(s) before ready"
        assert self.errors == [], [errno.errorcode.get(e, e) for e in self.errors]
        assert self.refused > 0  # it did run


# -- a start-up held in front of the real sshd ----------------------------------------------


class GateHop:
    """A TCP hop to ``target`` that accepts pytunnel's connection and passes nothing on
    (not even sshd's banner) until :meth:`release`; without it, an SSH server that hangs
    before its banner."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = int(self.listener.getsockname()[1])
        self.arrived = threading.Event()
        self._open = threading.Event()
        self._closed = False
        self._sockets: list[socket.socket] = [self.listener]
        self._threads = [threading.Thread(target=self._serve, name="gate-hop", daemon=True)]
        self._threads[0].start()

    def release(self) -> None:
        self._open.set()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return  # closed before anyone came
        self._sockets.append(conn)
        self.arrived.set()
        self._open.wait()
        if self._closed:
            return
        upstream = socket.create_connection(self.target, timeout=10)
        upstream.settimeout(None)
        self._sockets.append(upstream)
        for src, dst in ((conn, upstream), (upstream, conn)):
            pump = threading.Thread(target=_pump, args=(src, dst), name="gate-pump", daemon=True)
            self._threads.append(pump)
            pump.start()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    while True:
        try:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
        except OSError:
            break
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def hop_args(
    server: SshdServer, hop: GateHop, tmp_path: Path, *extra: str, key: str | Path | None = None
) -> list[str]:
    """``server_args`` that reach ``server`` through ``hop`` (its host key filed under the
    hop's port, which is where pytunnel thinks it is)."""
    known = tmp_path / f"known_hosts_{hop.port}"
    known.write_text(f"[{LOOPBACK}]:{hop.port} {server.host_key_pub}\n")
    args = server_args(server, key=key, known_hosts=known)
    args[args.index("-p") + 1] = str(hop.port)
    return [*extra, *args]  # extra first: the first value of an -o key wins


@pytest.fixture
def make_hop(sshd: SshdServer) -> Iterator[Callable[..., GateHop]]:
    """``make_hop(server=sshd) -> GateHop``; every hop is closed at teardown."""
    hops: list[GateHop] = []

    def make(server: SshdServer = sshd) -> GateHop:
        hop = GateHop((server.host, server.port))
        hops.append(hop)
        return hop

    try:
        yield make
    finally:
        for hop in hops:
            hop.close()


def start_held(
    pytunnel_factory: PytunnelFactory, hop: GateHop, args: Sequence[str]
) -> tuple[Running, int, Poller]:
    """Start pytunnel on a port we picked, polled from the moment it starts, and wait
    until its SSH connection reached the hop (so the port is bound). Retries with another
    port if someone else took ours in between (exit 3 before connecting)."""
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        poller = Poller(port)
        running = pytunnel_factory(["-D", f"{LOOPBACK}:{port}", *args], wait_ready=False)
        if not wait_until(_reached_or_exited(hop, running), HOLD_TIMEOUT):
            poller.stop()
            raise AssertionError(f"never reached the hop\n{running.describe()}")
        if hop.arrived.is_set():
            return running, port, poller
        poller.stop()
        assert running.wait() == 3, running.describe()
    raise AssertionError("no free port that stayed free")


def _reached_or_exited(hop: GateHop, running: Running) -> Callable[[], bool]:
    return lambda: hop.arrived.is_set() or not running.alive


# -- start-ups that fail --------------------------------------------------------------------


def test_server_that_hangs_before_its_banner_never_opens_the_port(
    pytunnel_factory: PytunnelFactory, make_hop: Callable[..., GateHop], sshd: SshdServer,
    tmp_path: Path,
) -> None:  # fmt: skip
    hop = make_hop()  # never released: a silent server
    args = hop_args(sshd, hop, tmp_path, "-o", "ConnectTimeout=3")
    running, port, poller = start_held(pytunnel_factory, hop, args)
    try:
        assert_bound_but_refusing(port, running.describe)
        assert running.wait(EXIT_TIMEOUT) == 255, running.describe()
    finally:
        poller.stop()
    poller.assert_never_accepted()
    assert "timed out" in running.stderr_text(), running.describe()
    assert [e["event"] for e in running.events()] == ["error"]
    assert not port_is_held(port)  # and it let go of the port


def test_rejected_key_never_opens_the_port(
    pytunnel_factory: PytunnelFactory, make_hop: Callable[..., GateHop], sshd: SshdServer,
    tmp_path: Path,
) -> None:  # fmt: skip
    stranger = tmp_path / "stranger_key"
    _keygen(stranger)
    hop = make_hop()
    running, port, poller = start_held(
        pytunnel_factory, hop, hop_args(sshd, hop, tmp_path, key=stranger)
    )
    try:
        assert_bound_but_refusing(port, running.describe)
        hop.release()  # now sshd answers, and refuses the key
        assert running.wait(EXIT_TIMEOUT) == 255, running.describe()
    finally:
        poller.stop()
    poller.assert_never_accepted()
    assert "permission denied" in running.stderr_text().lower(), running.describe()
    assert not port_is_held(port)


def test_remote_forward_refused_at_start_never_opens_the_local_port(
    pytunnel_factory: PytunnelFactory, make_hop: Callable[..., GateHop],
    make_sshd: Callable[..., SshdServer], tmp_path: Path,
) -> None:  # fmt: skip
    # Authenticated, and still a fatal start-up: the server refuses -R (exit 3). The -R
    # listeners are asked for before the -D port listens, so it never took a client.
    server = make_sshd(AllowTcpForwarding="local")
    hop = make_hop(server)
    args = ["-R", "0", *hop_args(server, hop, tmp_path)]
    running, port, poller = start_held(pytunnel_factory, hop, args)
    try:
        assert_bound_but_refusing(port, running.describe)
        hop.release()
        assert running.wait(EXIT_TIMEOUT) == 3, running.describe()
    finally:
        poller.stop()
    poller.assert_never_accepted()
    assert "-R 0: " in running.stderr_text(), running.describe()
    assert not port_is_held(port)


def _keygen(path: Path) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen not installed")
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )  # fmt: skip


# -- password prompts on a terminal (the asyncssh server) ------------------------------------


@pytest.fixture
def start_pty(tmp_path: Path) -> Iterator[Callable[[list[str]], PtyTunnel]]:
    started: list[PtyTunnel] = []

    def start(args: list[str]) -> PtyTunnel:
        running = PtyTunnel(args, tmp_path / f"pty{len(started)}")
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.kill()


def password_args(server: AsyncsshServer, user: str) -> list[str]:
    # The client key is authorized for every user there: without publickey, the
    # password is what logs in.
    return ["-o", "PubkeyAuthentication=no", *server_args(server, user=user)]


def start_at_prompt(
    start_pty: Callable[[list[str]], PtyTunnel], server: AsyncsshServer, user: str
) -> tuple[PtyTunnel, int, Poller]:
    """pytunnel on a port we picked, waiting at its password prompt; polled from the start."""
    prompt = f"{user}@{server.host}:{server.port}'s password: "
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        poller = Poller(port)
        running = start_pty(["--json", "-D", f"{LOOPBACK}:{port}", *password_args(server, user)])
        if running.child.expect_exact([prompt, pexpect.EOF], timeout=HOLD_TIMEOUT) == 0:
            return running, port, poller
        poller.stop()
        assert running.wait_exit() == 3, running.describe()  # someone took the port
    raise AssertionError("no free port that stayed free")


def test_wrong_passwords_never_open_the_port(
    start_pty: Callable[[list[str]], PtyTunnel], asyncssh_server: AsyncsshServer
) -> None:
    user, _ = ALICE
    running, port, poller = start_at_prompt(start_pty, asyncssh_server, user)
    try:
        for guess in ("guess-one", "guess-two", "guess-three"):
            if guess != "guess-one":
                running.expect("'s password: ")
            assert_bound_but_refusing(port, running.describe)
            running.answer_secret(guess)
        assert running.wait_exit() == 255, running.describe()
    finally:
        poller.stop()
    poller.assert_never_accepted()
    assert [e["event"] for e in running.events()] == ["error"]


def test_password_answered_late_opens_the_port_once_logged_in(
    start_pty: Callable[[list[str]], PtyTunnel], asyncssh_server: AsyncsshServer
) -> None:
    user, password = ALICE
    running, port, poller = start_at_prompt(start_pty, asyncssh_server, user)
    try:
        assert_bound_but_refusing(port, running.describe)
        running.answer_secret(password)
        ready = running.wait_event("ready")
    finally:
        poller.stop()
    assert poller.refused > 0
    assert [(item["host"], item["port"]) for item in ready["listeners"]] == [(LOOPBACK, port)]
    # Ready means serving: the first connection after it is answered.
    sock, reply = socks5_open((LOOPBACK, port), LOOPBACK, PORT_ECHO)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"up")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"up"
    assert running.stop() == 0


def test_port_in_use_fails_before_the_prompt(
    start_pty: Callable[[list[str]], PtyTunnel], asyncssh_server: AsyncsshServer
) -> None:
    user, _ = ALICE
    with socket.create_server((LOOPBACK, 0)) as squatter:
        port = squatter.getsockname()[1]
        running = start_pty(
            ["--json", "-D", f"{LOOPBACK}:{port}", *password_args(asyncssh_server, user)]
        )
        assert running.wait_exit() == 3, running.describe()
    assert "password" not in running.transcript.lower(), running.describe()
    [event] = running.events()
    assert (event["event"], event["exit_status"]) == ("error", 3)
    assert str(port) in event["message"]


# -- a slow start-up that succeeds (the real sshd) ------------------------------------------


def test_slow_start_refuses_until_authenticated_then_serves(
    pytunnel_factory: PytunnelFactory, make_hop: Callable[..., GateHop], sshd: SshdServer,
    tmp_path: Path, echo_target: EchoTarget,
) -> None:  # fmt: skip
    hop = make_hop()
    running, port, poller = start_held(pytunnel_factory, hop, hop_args(sshd, hop, tmp_path))
    try:
        assert_bound_but_refusing(port, running.describe)
        hop.release()
        running.wait_ready()
    finally:
        poller.stop()
    assert poller.refused > 0
    assert poller.errors == []
    assert running.listeners == [(LOOPBACK, port)]
    names = [e["event"] for e in running.events()]
    assert names[0] == "ready"
    assert_echo((LOOPBACK, port), echo_target)


def assert_echo(address: tuple[str, int], echo_target: EchoTarget) -> None:
    sock, reply = socks5_open(address, LOOPBACK, echo_target.port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"ready")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"ready")


def test_port_taken_while_authenticating_is_exit_3(
    pytunnel_factory: PytunnelFactory, make_hop: Callable[..., GateHop], sshd: SshdServer,
    tmp_path: Path,
) -> None:  # fmt: skip
    # Bound is not listening: another program that sets SO_REUSEADDR (most servers do)
    # may bind and listen on the port meanwhile. pytunnel then cannot listen, and says
    # so as it does for a port in use at the start.
    hop = make_hop()
    running, port, poller = start_held(pytunnel_factory, hop, hop_args(sshd, hop, tmp_path))
    poller.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((LOOPBACK, port))
        squatter.listen()
        hop.release()
        assert running.wait(EXIT_TIMEOUT) == 3, running.describe()
    lines = [line for line in running.stderr_text().splitlines() if line.startswith("pytunnel: ")]
    assert len(lines) == 1, running.describe()
    assert f"{LOOPBACK}:{port}" in lines[0]
    assert "in use" in lines[0].lower()
    assert "Traceback" not in running.stderr_text()
    [event] = running.events()
    assert (event["event"], event["exit_status"]) == ("error", 3)


# -- -f: the parent exits once the port accepts ---------------------------------------------


def test_background_parent_returns_only_once_the_port_accepts(
    make_hop: Callable[..., GateHop], sshd: SshdServer, tmp_path: Path, echo_target: EchoTarget
) -> None:
    hop = make_hop()
    port = free_port()
    pidfile = tmp_path / "pytunnel.pid"
    parent = spawn(["-f", "--pidfile", str(pidfile), "-D", f"{LOOPBACK}:{port}",
                    *hop_args(sshd, hop, tmp_path)])  # fmt: skip
    child_pid: int | None = None
    try:
        assert hop.arrived.wait(HOLD_TIMEOUT), "never reached the hop"
        assert_bound_but_refusing(port, lambda: f"pid {parent.pid}")
        assert parent.poll() is None  # still waiting for its child
        hop.release()
        assert parent.wait(EXIT_TIMEOUT) == 0
        child_pid = int(pidfile.read_text())
        # No wait, no retry: when the parent is gone the port serves.
        assert_echo((LOOPBACK, port), echo_target)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child_pid is None and pidfile.exists():
            child_pid = int(pidfile.read_text())
        if child_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGTERM)
            assert wait_until(lambda: not _alive(child_pid), 15)


def _alive(pid: int) -> bool:
    """Running (a zombie left for init to reap counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- outages: listening stays, requests fail closed -----------------------------------------


def test_outage_keeps_the_port_listening_and_fails_closed(
    make_sshd: Callable[..., SshdServer], pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:  # fmt: skip
    server = make_sshd()
    tunnel = pytunnel_factory(
        ["--reconnect-wait", "1", "-D", f"{LOOPBACK}:0", *server_args(server)]
    )
    address = tunnel.address
    assert_echo(address, echo_target)
    server.stop()  # by PID, with every session process
    tunnel.wait_event("session_lost")
    # Down, the port still accepts, and a request is answered 0x01 and closed.
    assert connect_errno(address[1]) == 0
    sock, reply = socks5_open(address, LOOPBACK, echo_target.port)
    with sock:
        assert reply == SOCKS5_GENERAL_FAILURE
        assert closed_by_peer(sock) == b""
    server.start()  # same port
    if not wait_until(lambda: len(tunnel.events("session_up")) >= 1, RECONNECT_DEADLINE):
        raise AssertionError(tunnel.describe())
    # session_up events are only printed after ready: this one is the reconnect.
    assert_echo(address, echo_target)
    assert [e["event"] for e in tunnel.events()].count("ready") == 1
