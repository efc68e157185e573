"""pytunnel riding a real OpenSSH ControlMaster (``ssh -M -S SOCK -N -f``) on the real
sshd: pytunnel is given no key at all, so every channel it opens went through the master.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.net import wait_until
from fixtures.pytunnel_proc import PytunnelFactory, Running, run_pytunnel, server_args
from fixtures.replies import SOCKS5_OK, socks5_failure
from fixtures.ssh_clients import client_binary, ssh_clients
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget, HttpTarget, TalkerTarget

TIMEOUT = 30.0


def start_master(server: SshdServer, sock: Path, ssh: str) -> None:
    """``ssh -M -S sock -N -f``: returns once the master is logged in and listening."""
    subprocess.run(
        [ssh, *server.ssh_args(), "-M", "-S", str(sock), "-o", "ControlPersist=no",
         "-N", "-f", f"{server.user}@{server.host}"],
        check=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert wait_until(sock.exists, TIMEOUT)


def master_pid(sock: Path, ssh: str) -> int:
    out = subprocess.run(
        [ssh, "-S", str(sock), "-O", "check", "x"],
        capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    return int(out.stderr.split("pid=")[1].split(")")[0])


def stop_master(sock: Path, ssh: str) -> None:
    with contextlib.suppress(Exception):
        os.kill(master_pid(sock, ssh), signal.SIGTERM)
    wait_until(lambda: not sock.exists(), TIMEOUT)


def tunnel_args(sock: Path, *extra: str) -> list[str]:
    # No -i, no known_hosts: pytunnel cannot log in by itself.
    return ["-D", "127.0.0.1:0", "-F", "none", "-S", str(sock), *extra, "nobody@127.0.0.1"]


def socks5_connect(proxy: tuple[str, int], host: str, port: int) -> tuple[bytes, socket.socket]:
    conn = socket.create_connection(proxy, timeout=TIMEOUT)
    conn.sendall(b"\x05\x01\x00")
    assert conn.recv(2) == b"\x05\x00"
    conn.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port))
    reply = b""
    while len(reply) < 10:
        chunk = conn.recv(10 - len(reply))
        if not chunk:
            break
        reply += chunk
    return reply, conn


@pytest.fixture(scope="module", params=ssh_clients())
def ssh_client(request: pytest.FixtureRequest) -> str:
    """The client every master of a test is started with: each test that starts one runs
    once per OpenSSH major version there is (9.x here, and 8.x from .ci/setup)."""
    return str(request.param)


@pytest.fixture(scope="module")
def master_sock(
    sshd: SshdServer, tmp_path_factory: pytest.TempPathFactory, ssh_client: str
) -> Iterator[Path]:
    sock = tmp_path_factory.mktemp("mux") / "master.sock"
    start_master(sshd, sock, ssh_client)
    try:
        yield sock
    finally:
        stop_master(sock, ssh_client)


@pytest.fixture(scope="module")
def riding(master_sock: Path) -> Iterator[Running]:
    factory = PytunnelFactory()
    try:
        yield factory(tunnel_args(master_sock))
    finally:
        factory.close()


@pytest.fixture(scope="module")
def riding_stdio(master_sock: Path) -> Iterator[Running]:
    factory = PytunnelFactory()
    try:
        yield factory(tunnel_args(master_sock, "--master-mode", "stdio"))
    finally:
        factory.close()


# The modes in which the master relays the bytes itself (a stdio forward): handover, the
# default, and stdio.
STDIO_MODES = ["riding", "riding_stdio"]


def test_ready_says_the_transport_and_the_masters_pid(
    riding: Running, master_sock: Path, ssh_client: str
) -> None:
    ready = riding.wait_ready()
    assert ready["transport"] == "openssh-master"
    assert ready["master_pid"] == master_pid(master_sock, ssh_client)
    assert str(master_sock) in ready["server"]


def test_the_master_runs_the_client_asked_for(
    riding: Running, master_sock: Path, ssh_client: str
) -> None:
    """The master pytunnel rides is the OpenSSH version of this case: its process runs
    that client's binary, and the 8.x case is an 8.x client."""
    pid = master_pid(master_sock, ssh_client)
    assert riding.ready["master_pid"] == pid
    assert Path(os.readlink(f"/proc/{pid}/exe")).resolve() == client_binary(ssh_client)
    said = subprocess.run([ssh_client, "-V"], capture_output=True, text=True, check=True)
    assert said.stderr.startswith("OpenSSH_"), said.stderr
    if ssh_client != "ssh":
        assert said.stderr.startswith("OpenSSH_8."), said.stderr


@pytest.mark.parametrize("which", STDIO_MODES)
@pytest.mark.parametrize("mode", ["--socks5-hostname", "--proxy", "--proxytunnel"])
def test_curl_through_the_master(
    which: str, request: pytest.FixtureRequest, http_target: HttpTarget, curl: str,
    mode: str, ssh_client: str,
) -> None:  # fmt: skip
    riding: Running = request.getfixturevalue(which)
    scheme = "socks5h" if mode == "--socks5-hostname" else "http"
    tunnel = ["--proxytunnel"] if mode == "--proxytunnel" else []
    out = subprocess.run(
        [curl, "--silent", "--show-error", "--fail", "--max-time", str(TIMEOUT), *tunnel,
         "--proxy", f"{scheme}://{riding.netloc}", http_target.url()],
        capture_output=True, timeout=TIMEOUT * 2, check=True,
    )  # fmt: skip
    assert out.stdout.startswith(b"hello")


@pytest.mark.parametrize("which", STDIO_MODES)
def test_big_body_byte_counts(
    which: str, request: pytest.FixtureRequest, http_target: HttpTarget, big_body: bytes,
    curl: str, ssh_client: str,
) -> None:  # fmt: skip
    riding: Running = request.getfixturevalue(which)
    out = subprocess.run(
        [curl, "--silent", "--show-error", "--fail", "--max-time", str(TIMEOUT),
         "--proxy", f"socks5h://{riding.netloc}", http_target.url("/big")],
        capture_output=True, timeout=TIMEOUT * 2, check=True,
    )  # fmt: skip
    assert out.stdout == big_body
    # The live view's count: every byte passed through pytunnel, none around it.
    assert wait_until(
        lambda: any(e["bytes_down"] >= len(big_body) for e in riding.events("connection_closed")),
        TIMEOUT,
    )


@pytest.fixture(scope="module")
def riding_proxy(master_sock: Path) -> Iterator[Running]:
    factory = PytunnelFactory()
    try:
        yield factory(tunnel_args(master_sock, "--master-mode", "proxy"))
    finally:
        factory.close()


def test_refused_port_in_proxy_mode_gets_0x05(riding_proxy: Running, closed_port: int) -> None:
    reply, conn = socks5_connect(riding_proxy.address, "127.0.0.1", closed_port)
    conn.close()
    assert reply == socks5_failure(0x05)
    failed = riding_proxy.wait_event("channel_failed", port=closed_port)
    assert "refused" in failed["reason"].lower()


def test_refused_port_in_stdio_mode_is_a_general_failure_that_says_why(
    riding: Running, closed_port: int
) -> None:
    reply, conn = socks5_connect(riding.address, "127.0.0.1", closed_port)
    conn.close()
    # The master keeps the server's reason to itself in this mode: 0x01, not a guess.
    assert reply == socks5_failure(0x01)
    failed = riding.wait_event("channel_failed", port=closed_port)
    assert "gives no reason" in failed["reason"]
    assert "--master-mode proxy" in failed["reason"]


@pytest.mark.parametrize(("mode", "code"), [("proxy", 0x02), ("stdio", 0x01), ("handover", 0x01)])
def test_prohibited_port(
    make_sshd: Callable[..., SshdServer], tmp_path: Path, http_target: HttpTarget,
    pytunnel_factory: PytunnelFactory, mode: str, code: int, ssh_client: str,
) -> None:  # fmt: skip
    server = make_sshd(PermitOpen=f"127.0.0.1:{http_target.port}")
    sock = tmp_path / "m.sock"
    start_master(server, sock, ssh_client)
    try:
        tunnel = pytunnel_factory(tunnel_args(sock, "--master-mode", mode))
        reply, conn = socks5_connect(tunnel.address, "127.0.0.1", http_target.port + 1)
        conn.close()
        assert reply == socks5_failure(code)
        reply, conn = socks5_connect(tunnel.address, "127.0.0.1", http_target.port)
        conn.close()
        assert reply == SOCKS5_OK
    finally:
        stop_master(sock, ssh_client)


def _recv_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("which", ["riding", "riding_stdio", "riding_proxy"])
def test_the_clients_half_close_comes_before_the_answer(
    which: str, request: pytest.FixtureRequest, echo_target: EchoTarget, ssh_client: str
) -> None:
    # ssh_client is asked for by name so that the case runs for each client: the fixture
    # looked up below rides that client's master.
    tunnel: Running = request.getfixturevalue(which)
    body = os.urandom(300_000)
    reply, conn = socks5_connect(tunnel.address, "127.0.0.1", echo_target.port)
    assert reply == SOCKS5_OK
    conn.sendall(body)
    conn.shutdown(socket.SHUT_WR)
    # The echo target answers only after the client's FIN has come through the channel.
    assert _recv_all(conn) == EchoTarget.expected_reply(body)
    conn.close()


def _talk_after_the_servers_fin(tunnel: Running, talker: TalkerTarget) -> None:
    reply, conn = socks5_connect(tunnel.address, "127.0.0.1", talker.port)
    assert reply == SOCKS5_OK
    with conn:
        assert _recv_all(conn) == TalkerTarget.greeting
        with contextlib.suppress(OSError):
            conn.sendall(b"after your FIN" * 1000)
            conn.shutdown(socket.SHUT_WR)
            _recv_all(conn)


def test_in_proxy_mode_the_client_still_sends_after_the_servers_half_close(
    riding_proxy: Running, talker_target: TalkerTarget
) -> None:
    done = len(talker_target.received)  # the target is shared with other tests
    _talk_after_the_servers_fin(riding_proxy, talker_target)
    assert talker_target.wait_received(done + 1, TIMEOUT)[done:] == [14_000]


@pytest.mark.parametrize("which", STDIO_MODES)
def test_in_stdio_mode_the_servers_half_close_ends_the_connection(
    which: str, request: pytest.FixtureRequest, talker_target: TalkerTarget, ssh_client: str
) -> None:
    """OpenSSH's stdio forwarding (``ssh -W`` too) stops reading once the server's side
    has ended: the connection ends there, cleanly, instead of hanging; the README says
    so and names --master-mode proxy. The target speaks first, and its greeting comes
    after our reply (checked byte by byte on the way)."""
    riding: Running = request.getfixturevalue(which)
    done = len(talker_target.received)  # the target is shared with other tests
    _talk_after_the_servers_fin(riding, talker_target)
    assert talker_target.wait_received(done + 1, TIMEOUT)[done:] == [0]
    riding.wait_event("connection_closed", port=talker_target.port)


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("which", STDIO_MODES)
def test_stdio_channels_give_their_descriptors_back(
    which: str,
    request: pytest.FixtureRequest,
    master_sock: Path,
    echo_target: EchoTarget,
    ssh_client: str,
) -> None:
    """Each stdio channel holds a control connection and a socket pair (or, handed over,
    the client's socket and a pipe) on both sides; when the connection ends, pytunnel
    and the master hold no more than before."""
    riding: Running = request.getfixturevalue(which)
    master = master_pid(master_sock, ssh_client)
    ours, theirs = _descriptors(riding.proc.pid), _descriptors(master)
    for _ in range(10):
        reply, conn = socks5_connect(riding.address, "127.0.0.1", echo_target.port)
        assert reply == SOCKS5_OK
        conn.sendall(b"x")
        conn.shutdown(socket.SHUT_WR)
        assert _recv_all(conn) == EchoTarget.expected_reply(b"x")
        conn.close()
    assert wait_until(
        lambda: _descriptors(riding.proc.pid) <= ours and _descriptors(master) <= theirs,
        TIMEOUT,
    ), (ours, _descriptors(riding.proc.pid), theirs, _descriptors(master))
    closed = riding.events("connection_closed")
    assert len([e for e in closed if e["port"] == echo_target.port]) >= 10


def test_master_gone_fails_closed_then_served_again(
    sshd: SshdServer, tmp_path: Path, http_target: HttpTarget,
    pytunnel_factory: PytunnelFactory, ssh_client: str,
) -> None:  # fmt: skip
    sock = tmp_path / "m.sock"
    start_master(sshd, sock, ssh_client)
    tunnel = pytunnel_factory(tunnel_args(sock, "--reconnect-wait", "1"))
    stop_master(sock, ssh_client)
    tunnel.wait_event("session_lost")
    reply, conn = socks5_connect(tunnel.address, "127.0.0.1", http_target.port)
    conn.close()
    assert reply == socks5_failure(0x01)
    assert tunnel.alive
    start_master(sshd, sock, ssh_client)

    # A waiting request makes pytunnel ask the master again at once.
    def served() -> bool:
        reply, conn = socks5_connect(tunnel.address, "127.0.0.1", http_target.port)
        conn.close()
        return reply == SOCKS5_OK

    assert wait_until(served, TIMEOUT, interval=0.5)
    # Said as a session of our own says it: up again, why, and for how long it was out.
    up = tunnel.wait_event("session_up")
    assert up["cause"] == "lost"
    assert up["outage"] > 0
    os.kill(tunnel.pid, signal.SIGUSR1)
    assert tunnel.wait_event("status")["state"] == "up"
    stop_master(sock, ssh_client)


def test_sighup_and_sigusr1_through_a_master(
    sshd: SshdServer, tmp_path: Path, http_target: HttpTarget,
    pytunnel_factory: PytunnelFactory, ssh_client: str,
) -> None:  # fmt: skip
    # The master keeps its own connection: SIGHUP says there is nothing to remake (and
    # does not end pytunnel, as the signal's default would); SIGUSR1 gives the status.
    sock = tmp_path / "m.sock"
    start_master(sshd, sock, ssh_client)
    try:
        tunnel = pytunnel_factory(tunnel_args(sock))
        os.kill(tunnel.pid, signal.SIGHUP)
        notice = tunnel.wait_event("notice")
        assert "nothing to reconnect" in notice["message"]
        reply, conn = socks5_connect(tunnel.address, "127.0.0.1", http_target.port)
        conn.close()
        assert reply == SOCKS5_OK
        os.kill(tunnel.pid, signal.SIGUSR1)
        status = tunnel.wait_event("status")
        assert (status["state"], status["reconnects"]) == ("up", 0)
        assert str(sock) in status["server"]
        assert tunnel.alive
    finally:
        stop_master(sock, ssh_client)


def test_explicit_socket_without_master_exits_255(tmp_path: Path) -> None:
    done = run_pytunnel(tunnel_args(tmp_path / "none.sock"))
    assert done.returncode == 255
    assert "no OpenSSH master" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a socket path has at most 107 bytes, and ssh -M
    binds a temporary name 17 bytes longer than its ControlPath (tmp_path under xdist
    is too long for a ControlPath that names user, host and port)."""
    with tempfile.TemporaryDirectory(prefix="ptm-", dir="/tmp") as path:
        yield Path(path)


def test_control_path_from_ssh_config_with_tokens(
    sshd: SshdServer, short_dir: Path, tmp_path: Path, http_target: HttpTarget,
    pytunnel_factory: PytunnelFactory, ssh_client: str,
) -> None:  # fmt: skip
    # ssh and pytunnel expand the same template to the same socket.
    sock = short_dir / f"{sshd.user}@{sshd.host}-{sshd.port}.sock"
    start_master(sshd, sock, ssh_client)
    try:
        config = tmp_path / "ssh_config"
        config.write_text(f"Host {sshd.host}\n  ControlPath {short_dir}/%r@%h-%p.sock\n")
        tunnel = pytunnel_factory(
            ["-D", "127.0.0.1:0", "-F", str(config), "-p", str(sshd.port),
             f"{sshd.user}@{sshd.host}"]
        )  # fmt: skip
        assert tunnel.ready["transport"] == "openssh-master"
        reply, conn = socks5_connect(tunnel.address, "127.0.0.1", http_target.port)
        conn.close()
        assert reply == SOCKS5_OK
    finally:
        stop_master(sock, ssh_client)


def test_control_master_auto_without_master_logs_in_itself(
    sshd: SshdServer, tmp_path: Path, pytunnel_factory: PytunnelFactory
) -> None:
    tunnel = pytunnel_factory(
        ["-D", "127.0.0.1:0", "-S", str(tmp_path / "none.sock"), "-o", "ControlMaster=auto",
         *server_args(sshd)]
    )  # fmt: skip
    assert tunnel.ready["transport"] == "ssh"
    assert tunnel.wait_stderr("logging in as usual")


@pytest.mark.parametrize(
    ("extra", "words"),
    [(["-R", "2080"], "-R is not available"), (["--isolate"], "--isolate is not available")],
)
def test_what_a_master_cannot_carry_is_a_usage_error(
    master_sock: Path, extra: list[str], words: str
) -> None:
    # -R needs the master to listen for us, --isolate a session per user name: neither
    # can be had through the mux socket; said at once, exit 2, nothing half started.
    done = run_pytunnel(tunnel_args(master_sock, *extra))
    assert done.returncode == 2, done.stderr
    assert words in done.stderr
    assert "Traceback" not in done.stderr


# -- handover mode: the master reads the client's socket itself -------------------------


def _proxy_side_inode(tunnel: Running, conn: socket.socket) -> int:
    """The inode of pytunnel's end of a client connection, from /proc/net/tcp: the row
    whose local port is the proxy's and whose remote port is the client's."""
    local = f":{tunnel.port:04X}"
    remote = f":{conn.getsockname()[1]:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(local) and fields[2].endswith(remote):
            return int(fields[9])
    raise AssertionError("no such connection in /proc/net/tcp")


def _holds_socket(pid: int, inode: int) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fd) == f"socket:[{inode}]" for fd in fds.iterdir())


def _closed_event(tunnel: Running, conn: socket.socket) -> dict[str, object]:
    client = f"127.0.0.1:{conn.getsockname()[1]}"
    return tunnel.wait_event("connection_closed", client=client, timeout=TIMEOUT)


def test_handover_gives_the_master_the_clients_socket_and_counts_exactly(
    riding: Running, master_sock: Path, echo_target: EchoTarget, ssh_client: str
) -> None:
    """The master holds pytunnel's end of the client's connection and reads it itself;
    the counts are still exact both ways: up from the kernel's count less the handshake,
    down from what pytunnel spliced."""
    body = os.urandom(300_000)
    reply, conn = socks5_connect(riding.address, "127.0.0.1", echo_target.port)
    assert reply == SOCKS5_OK
    with conn:
        conn.sendall(body[:1000])
        inode = _proxy_side_inode(riding, conn)
        assert wait_until(lambda: _holds_socket(master_pid(master_sock, ssh_client), inode), 5)
        conn.sendall(body[1000:])
        conn.shutdown(socket.SHUT_WR)
        answer = _recv_all(conn)
        assert answer == EchoTarget.expected_reply(body)
        closed = _closed_event(riding, conn)
    assert (closed["bytes_up"], closed["bytes_down"]) == (len(body), len(answer))


def test_handover_with_pipelined_bytes_lets_the_master_relay_a_pair(
    riding: Running, master_sock: Path, echo_target: EchoTarget, ssh_client: str
) -> None:
    """Bytes sent behind the request, before the reply, were read by pytunnel and must go
    first: that connection is not handed over (the master relays a socket pair, as in
    stdio mode), and every byte arrives in order."""
    request = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
    request += struct.pack(">H", echo_target.port)
    conn = socket.create_connection(riding.address, timeout=TIMEOUT)
    with conn:
        conn.sendall(b"\x05\x01\x00" + request + b"early bytes")
        head = b""
        while len(head) < 12:
            chunk = conn.recv(12 - len(head))
            assert chunk, head
            head += chunk
        assert head == b"\x05\x00" + SOCKS5_OK
        inode = _proxy_side_inode(riding, conn)
        assert not _holds_socket(master_pid(master_sock, ssh_client), inode)
        conn.sendall(b" and late ones")
        conn.shutdown(socket.SHUT_WR)
        assert _recv_all(conn) == EchoTarget.expected_reply(b"early bytes and late ones")
        closed = _closed_event(riding, conn)
    assert closed["bytes_up"] == len(b"early bytes and late ones")


def test_handover_connections_end_when_pytunnel_stops(
    master_sock: Path, echo_target: EchoTarget, pytunnel_factory: PytunnelFactory,
    ssh_client: str,
) -> None:  # fmt: skip
    """The master holds a copy of the client's socket, so closing ours would not end the
    connection: pytunnel shuts it down both ways when it ends a connection, and the
    client sees the end at once instead of hanging on the master's copy."""
    tunnel = pytunnel_factory(tunnel_args(master_sock, "--master-mode", "handover"))
    reply, conn = socks5_connect(tunnel.address, "127.0.0.1", echo_target.port)
    assert reply == SOCKS5_OK
    with conn:
        conn.sendall(b"half a request")
        inode = _proxy_side_inode(tunnel, conn)
        assert wait_until(lambda: _holds_socket(master_pid(master_sock, ssh_client), inode), 5)
        tunnel.stop()
        conn.settimeout(TIMEOUT)
        with contextlib.suppress(ConnectionResetError):  # also an end
            assert conn.recv(100) == b""
