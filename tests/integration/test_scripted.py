"""Scripted and CI use: ``-D 0`` and the ``ready`` report, systemd's notify socket,
``-- COMMAND`` (environment, exit status, signals, failures) and ``-f`` with ``--pidfile``.

The real console script against the real sshd (and the asyncssh server to drop a session).
A script must never need a sleep or a retry loop: every test connects the moment pytunnel
says it is ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from fixtures.asyncssh_server import PORT_DROP_CONNECTION, AsyncsshServer
from fixtures.keys import generate_ed25519
from fixtures.net import ipv6_loopback_available, wait_until
from fixtures.pytunnel_proc import (
    Finished,
    PytunnelFactory,
    error_lines,
    recv_all,
    run_pytunnel,
    server_args,
    socks5_open,
)
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer, _pid_alive
from fixtures.targets import EchoTarget, HttpTarget

pytestmark = pytest.mark.timeout(60)

NOTIFY_TIMEOUT = 10.0


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed")
    return path


def assert_relays(address: tuple[str, int], echo_target: EchoTarget, data: bytes) -> None:
    """One request, at once, no retry: the tunnel must be usable the moment it says so."""
    sock, reply = socks5_open(address, "127.0.0.1", echo_target.port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(data)


@pytest.fixture
def stranger_key(tmp_path: Path) -> Path:
    path = tmp_path / "stranger_key"
    generate_ed25519(path, "not-authorized")
    return path


# -- ready ----------------------------------------------------------------------------------


def test_port_zero_is_reported_in_ready_json(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    mark = sshd.log_mark()
    tunnel = pytunnel_factory(["-D", "0", *server_args(sshd)])
    first_line = tunnel.stdout_text().splitlines()[0]
    assert json.loads(first_line)["event"] == "ready"
    # Ready means authenticated, not just connected.
    assert sshd.wait_log("Accepted publickey", since=mark)
    hosts = {host for host, _ in tunnel.listeners}
    ports = {port for _, port in tunnel.listeners}
    assert "127.0.0.1" in hosts
    if ipv6_loopback_available():
        assert hosts == {"127.0.0.1", "::1"}
    [port] = ports  # one port number for both families
    assert port != 0
    assert tunnel.ready["listeners"][0]["url"] == f"socks5h://127.0.0.1:{port}"
    for address in tunnel.listeners:
        assert_relays(address, echo_target, f"ready on {address}".encode())


def test_ready_line_on_stderr_without_json(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    tunnel = pytunnel_factory(
        ["-D", "127.0.0.1:0", *server_args(sshd)], json_out=False, wait_ready=False
    )
    pattern = re.compile(r"\bready: socks5h://127\.0\.0\.1:(\d+)\s*$", re.M)
    assert wait_until(
        lambda: pattern.search(tunnel.stderr_text()) is not None or not tunnel.alive, 20
    ), tunnel.describe()
    found = pattern.search(tunnel.stderr_text())
    assert found is not None, tunnel.describe()
    assert tunnel.stdout_text() == ""
    assert_relays(("127.0.0.1", int(found.group(1))), echo_target, b"plain ready")


# -- systemd notify -------------------------------------------------------------------------


@contextlib.contextmanager
def notify_socket(abstract: bool) -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket as systemd would offer it; yields it and NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # A short directory of our own: unix socket paths are limited to 108 bytes.
    directory = tempfile.mkdtemp(prefix="pt-notify-")
    try:
        if abstract:
            name = f"pytunnel-test-{uuid.uuid4().hex}"
            sock.bind(b"\0" + name.encode())
            value = f"@{name}"
        else:
            value = os.path.join(directory, "notify")
            sock.bind(value)
        sock.settimeout(NOTIFY_TIMEOUT)
        yield sock, value
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def receive_until(sock: socket.socket, needle: str) -> list[str]:
    """Datagrams up to and including the first that holds ``needle``."""
    seen: list[str] = []
    while True:
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no {needle!r} within {NOTIFY_TIMEOUT:g} s: {seen}") from None
        seen.append(message)
        if needle in message.split("\n"):
            return seen


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n") if "=" in line)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_notify_ready_and_stopping(
    pytunnel_factory: PytunnelFactory,
    sshd: SshdServer,
    echo_target: EchoTarget,
    abstract: bool,
) -> None:
    with notify_socket(abstract) as (sock, address):
        tunnel = pytunnel_factory(
            ["-D", "127.0.0.1:0", *server_args(sshd)],
            env={"NOTIFY_SOCKET": address},
            wait_ready=False,
        )
        ready = fields(receive_until(sock, "READY=1")[-1])
        tunnel.wait_ready()
        assert ready["STATUS"].startswith("ready")
        assert f"socks5h://127.0.0.1:{tunnel.port}" in ready["STATUS"]
        assert ready["MAINPID"] == str(tunnel.pid)
        assert_relays(tunnel.address, echo_target, b"notified")
        tunnel.send_signal(signal.SIGTERM)
        stopping = fields(receive_until(sock, "STOPPING=1")[-1])
        assert stopping["STATUS"].startswith("stopping")
        assert tunnel.wait() == 0


# -- -- COMMAND -----------------------------------------------------------------------------


def run_command(
    server: SshdServer | AsyncsshServer,
    *command: str,
    extra: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> Finished:
    args = ["--json", "-D", "0", *extra, *server_args(server), "--", *command]
    return run_pytunnel(args, env=env)


def test_command_runs_through_the_tunnel(sshd: SshdServer, http_target: HttpTarget) -> None:
    mark = sshd.log_mark()
    # The command uses the proxy its environment names (NO_PROXY overridden: see below).
    result = run_command(
        sshd, need("curl"), "-sS", "--max-time", "20", "--noproxy", "", http_target.url("/hello")
    )
    assert result.returncode == 0, result.describe()
    assert http_target.hello_body.decode() in result.stdout
    assert result.events[0]["event"] == "ready"
    opened = [e for e in result.events if e["event"] == "channel_opened"]
    assert [(e["host"], e["port"]) for e in opened] == [("127.0.0.1", http_target.port)]
    closed = [e for e in result.events if e["event"] == "connection_closed"]
    assert len(closed) == 1
    assert closed[0]["bytes_down"] > len(http_target.hello_body)
    assert result.events[-1]["event"] == "stopping"
    # And sshd opened the direct-tcpip channel to it.
    assert sshd.wait_log(f"target 127.0.0.1 port {http_target.port}", since=mark)


def test_command_reaches_local_loopback_directly(sshd: SshdServer, http_target: HttpTarget) -> None:
    """NO_PROXY covers loopback (as documented): the command's own local services stay
    local; `curl --noproxy ''` above is how a command sends loopback through the tunnel."""
    script = 'printf "%s|%s\\n" "$NO_PROXY" "$no_proxy"'
    result = run_command(sshd, "sh", "-c", script)
    assert result.returncode == 0, result.describe()
    [line] = [x for x in result.stdout.splitlines() if "|" in x]
    for value in line.split("|"):
        assert {"localhost", "127.0.0.1", "::1"} <= set(value.split(","))
    direct = run_command(sshd, need("curl"), "-sS", "--max-time", "20", http_target.url("/hello"))
    assert direct.returncode == 0, direct.describe()
    assert not [e for e in direct.events if e["event"] == "channel_opened"]


def test_command_keeps_the_users_no_proxy(sshd: SshdServer) -> None:
    result = run_command(
        sshd, "sh", "-c", 'echo "NO_PROXY=$NO_PROXY"', env={"NO_PROXY": "direct.example"}
    )
    assert result.returncode == 0, result.describe()
    [line] = [x for x in result.stdout.splitlines() if x.startswith("NO_PROXY=")]
    assert "direct.example" in line.split("=", 1)[1].split(",")


def test_command_environment_names_the_tunnel(sshd: SshdServer) -> None:
    script = 'printf "%s|%s|%s\\n" "$ALL_PROXY" "$all_proxy" "$PYTUNNEL_PORT"'
    result = run_command(sshd, "sh", "-c", script)
    assert result.returncode == 0, result.describe()
    port = result.events[0]["listeners"][0]["port"]
    url = f"socks5h://127.0.0.1:{port}"
    assert f"{url}|{url}|{port}" in result.stdout.splitlines()


@pytest.mark.parametrize(
    ("script", "status"),
    [("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 128 + 15), ("kill -KILL $$", 128 + 9)],
    ids=["exit-0", "exit-7", "SIGTERM", "SIGKILL"],
)
def test_command_exit_status_is_passed_on(sshd: SshdServer, script: str, status: int) -> None:
    result = run_command(sshd, "sh", "-c", script)
    assert result.returncode == status, result.describe()
    assert [e["event"] for e in result.events][-1] == "stopping"


def test_command_is_not_run_when_auth_fails(
    sshd: SshdServer, stranger_key: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    args = ["--json", "-D", "0", *server_args(sshd, key=stranger_key)]
    result = run_pytunnel([*args, "--", "touch", str(marker)])
    assert result.returncode == 255, result.describe()
    assert not marker.exists()
    [line] = error_lines(result)
    assert "permission denied" in line.lower()
    assert [e["event"] for e in result.events] == ["error"]


# sh waits for a foreground child before running a trap; `sleep & wait` keeps it responsive.
# The trap kills the sleep, so nothing outlives the test.
TRAP_SCRIPT = """
trap 'echo "$1" > "$2"; kill $s 2>/dev/null; exit 42' {signal}
sleep 20 & s=$!
echo started > "$3"
wait $s
"""


@pytest.mark.parametrize(
    ("signum", "name"), [(signal.SIGTERM, "TERM"), (signal.SIGINT, "INT")], ids=["TERM", "INT"]
)
def test_signal_is_passed_on_to_the_command(
    pytunnel_factory: PytunnelFactory,
    sshd: SshdServer,
    tmp_path: Path,
    signum: int,
    name: str,
) -> None:
    got, started = tmp_path / "got", tmp_path / "started"
    script = TRAP_SCRIPT.format(signal=name)
    command = ["sh", "-c", script, "sh", f"got {name}", str(got), str(started)]
    tunnel = pytunnel_factory(["-D", "0", *server_args(sshd), "--", *command])
    assert wait_until(started.exists, 10), tunnel.describe()
    tunnel.send_signal(signum)
    # The command's own status (its trap exits 42), once it has handled the signal.
    assert tunnel.wait() == 42, tunnel.describe()
    assert got.read_text() == f"got {name}\n"


def test_command_is_stopped_when_the_tunnel_fails(
    asyncssh_server: AsyncsshServer, tmp_path: Path
) -> None:
    need("curl")
    got, started = tmp_path / "got", tmp_path / "started"
    # The command itself makes the server drop the SSH connection (magic port 4), then waits.
    script = (
        'trap \'echo "$1" > "$2"; kill $s 2>/dev/null; exit 3\' TERM\n'
        "sleep 20 & s=$!\n"
        'echo started > "$3"\n'
        "curl -s --noproxy '' --max-time 10 "
        f"http://127.0.0.1:{PORT_DROP_CONNECTION}/ >/dev/null 2>&1 &\n"
        "wait $s\n"
    )
    result = run_command(
        asyncssh_server,
        *("sh", "-c", script, "sh", "got TERM", str(got), str(started)),
        extra=("--no-reconnect",),
    )
    assert result.returncode == 255, result.describe()
    assert started.exists()
    assert got.read_text() == "got TERM\n"
    names = [e["event"] for e in result.events]
    assert "session_lost" in names
    assert names[-1] == "error"
    assert len(error_lines(result)) == 1


def test_command_outlives_a_reconnect(
    asyncssh_server: AsyncsshServer, http_target: HttpTarget
) -> None:
    curl = f"{need('curl')} -sS --noproxy '' --max-time 20"
    # The first request makes the server drop the SSH connection; the second one waits for
    # the reconnect (within --reconnect-wait) and goes through. The command never notices.
    script = (
        f"{curl} http://127.0.0.1:{PORT_DROP_CONNECTION}/ >/dev/null 2>&1\n"
        f"exec {curl} {http_target.url('/hello')}\n"
    )
    result = run_command(asyncssh_server, "sh", "-c", script)
    assert result.returncode == 0, result.describe()
    assert http_target.hello_body.decode() in result.stdout
    names = [e["event"] for e in result.events]
    assert names.index("session_lost") < names.index("session_up") < names.index("stopping")
    opened = [e for e in result.events if e["event"] == "channel_opened"]
    assert [(e["host"], e["port"]) for e in opened] == [("127.0.0.1", http_target.port)]


# -- -f and --pidfile -----------------------------------------------------------------------


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    """Where -f writes the daemon's PID; any daemon still alive at the end is killed by it."""
    path = tmp_path / "pytunnel.pid"
    yield path
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(path.read_text())
        if _pid_alive(pid) and "pytunnel" in cmdline(pid):
            os.kill(pid, signal.SIGKILL)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_background_returns_when_ready_and_writes_the_pidfile(
    sshd: SshdServer, echo_target: EchoTarget, pidfile: Path
) -> None:
    args = ["-f", "--json", "--pidfile", str(pidfile), "-D", "127.0.0.1:0", *server_args(sshd)]
    result = run_pytunnel(args, timeout=30)
    assert result.returncode == 0, result.describe()
    [ready] = result.events
    port = ready["listeners"][0]["port"]
    # Connect right away: when -f returns, the port accepts and the session is up.
    assert_relays(("127.0.0.1", port), echo_target, b"daemon")

    pid = int(pidfile.read_text())
    assert _pid_alive(pid)
    assert "pytunnel" in cmdline(pid)
    assert str(pidfile) in cmdline(pid)
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not _pid_alive(pid), 10)
    assert wait_until(lambda: not pidfile.exists(), 5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_background_start_failure_exits_255_with_the_error(
    sshd: SshdServer, stranger_key: Path, pidfile: Path
) -> None:
    args = ["-f", "--pidfile", str(pidfile), "-D", "127.0.0.1:0"]
    result = run_pytunnel([*args, *server_args(sshd, key=stranger_key)], timeout=30)
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    assert "permission denied" in line.lower()
    assert not pidfile.exists()
