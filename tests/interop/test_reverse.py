"""Reverse dynamic forwarding, ``-R [bind_address:]port``, through the real OpenSSH sshd.

sshd listens on its own loopback; curl stands for a program on the server and speaks SOCKS
or HTTP to that port, and pytunnel opens each connection from the client's side. Server
and client are one machine here, so ``ss`` can tell which process really owns a port.
Every wait is on an event (a JSON line, a stderr line, a process exit) with a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.event_fence import fence
from fixtures.net import wait_until
from fixtures.pytunnel_proc import (
    READY_TIMEOUT,
    PytunnelFactory,
    PytunnelStartError,
    Running,
    clean_env,
    client_name,
    recv_all,
    recv_exact,
    request_protocol,
    run_pytunnel,
    running_pytunnel,
    server_args,
    socks5_open,
    socks5_request,
)
from fixtures.sshd import SshdServer, _descendants_of
from fixtures.targets import EchoTarget, HttpTarget

pytestmark = pytest.mark.timeout(60)

CURL_TIMEOUT = 20
# The clients that retry from the start stop after this many accepted connections, or at
# this deadline (startup on a loaded machine included).
EAGER_ACCEPTED = 24
EAGER_CLIENTS = 4
EAGER_DEADLINE = 60.0
RECONNECT_DEADLINE = 20.0  # the first retry is immediate; this only bounds a stuck one
CURL_SOCKS_ERROR = 97  # curl: "proxy handshake error"
REPLY_NOT_ALLOWED = 2
REPLY_REFUSED = 5
USER = "rev"
PASSWORD = "reverse-secret"
PASSWORD_ENV = {"PYTUNNEL_PROXY_PASSWORD": PASSWORD}

# curl option, how the URL names the target, what pytunnel sees, whether a name was sent.
MODES = [
    ("--socks5-hostname", "localhost", "socks5", True),
    ("--socks5", "127.0.0.1", "socks5", False),
    ("--socks4", "127.0.0.1", "socks4", False),
    ("--socks4a", "localhost", "socks4a", True),
    ("--proxy", "127.0.0.1", "http", False),
    ("--proxytunnel", "127.0.0.1", "http-connect", False),
]


@pytest.fixture(scope="module")
def reverse(sshd: SshdServer) -> Iterator[Running]:
    """``pytunnel -R 0`` against the shared sshd, for the tests that need nothing else."""
    with running_pytunnel(["-R", "0", *server_args(sshd)]) as running:
        yield running


def remote_listener(tunnel: Running) -> tuple[str, int]:
    [item] = [entry for entry in tunnel.ready["listeners"] if entry["remote"]]
    return str(item["host"]), int(item["port"])


def netloc(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def run_curl(curl: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [curl, "--silent", "--show-error", "--max-time", str(CURL_TIMEOUT), *args],
        capture_output=True,
        env=clean_env(),
        timeout=CURL_TIMEOUT + 10,
        check=False,
    )


def assert_hello(curl: str, http_target: HttpTarget, *proxy: str) -> None:
    result = run_curl(curl, "--fail", *proxy, http_target.url("/hello"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == http_target.hello_body


def proxy_option(option: str, where: str) -> list[str]:
    if option == "--proxy":
        return ["--proxy", f"http://{where}"]
    if option == "--proxytunnel":
        return ["--proxytunnel", "--proxy", f"http://{where}"]
    return [option, where]


def new_events(tunnel: Running, name: str, before: int, count: int) -> list[dict[str, Any]]:
    events = tunnel.wait_events(name, before + count)[before:]
    assert len(events) == count, events
    return events


def listening_sockets() -> list[str] | None:
    """``ss -ltnpH`` lines (every listening TCP socket, with its process), or None."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    result = subprocess.run([ss, "-ltnpH"], capture_output=True, text=True, timeout=10, check=True)
    return result.stdout.splitlines()


def owners_of(port: int, lines: list[str]) -> set[int]:
    """PIDs of the processes listening on ``port`` (any address)."""
    pids: set[int] = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[3].rpartition(":")[2] == str(port):
            pids.update(int(pid) for pid in re.findall(r"pid=(\d+)", line))
    return pids


def process_name(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as fh:
        return fh.read().strip()


def assert_owned_by_sshd(port: int, server: SshdServer, tunnel: Running) -> None:
    lines = listening_sockets()
    if lines is None:
        return  # no ss: the curl tests above still prove the path
    owners = owners_of(port, lines)
    assert owners, f"nothing listens on {port}:\n" + "\n".join(lines)
    assert tunnel.pid not in owners
    assert server.pid is not None
    assert owners <= set(_descendants_of(server.pid)), (owners, lines)
    assert all(process_name(pid).startswith("sshd") for pid in owners), owners


def _exited(pid: int) -> bool:
    """Dead: gone, or a zombie (its files, sockets among them, already closed)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        # Opened just before it was reaped, read just after: ESRCH, not ENOENT.
        return True
    return status.rsplit(")", 1)[1].split()[0] == "Z"


def pytunnel_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("pytunnel: ")]


# -- the whole path -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "host", "protocol", "sent_name"), MODES, ids=[m[0].strip("-") for m in MODES]
)
def test_curl_on_the_server_reaches_the_client_side(
    curl: str,
    reverse: Running,
    http_target: HttpTarget,
    option: str,
    host: str,
    protocol: str,
    sent_name: bool,
) -> None:
    where = netloc(remote_listener(reverse))
    before = len(reverse.events("request_parsed"))
    result = run_curl(
        curl, "--fail", *proxy_option(option, where), f"http://{host}:{http_target.port}/hello"
    )
    assert result.returncode == 0, (result.stderr, reverse.describe())
    assert result.stdout == http_target.hello_body
    [request] = new_events(reverse, "request_parsed", before, 1)
    assert request_protocol(request) == protocol
    assert (request["host"], request["port"]) == (host, http_target.port)
    if protocol.startswith("socks"):
        assert request["sent_name"] is sent_name


def test_the_port_is_the_servers(sshd: SshdServer, reverse: Running) -> None:
    assert reverse.ready["listeners"] == [
        {
            # Asked for by address, so that the announced address is where sshd listens.
            "host": "127.0.0.1",
            "port": reverse.port,
            "url": f"socks5h://127.0.0.1:{reverse.port}",
            "remote": True,
        }
    ]
    lines = listening_sockets()
    if lines is None:
        pytest.skip("ss not installed")
    assert_owned_by_sshd(reverse.port, sshd, reverse)
    # With -R alone, pytunnel listens nowhere itself.
    assert [line for line in lines if f"pid={reverse.pid}," in line] == []


def test_refused_destination_is_reply_5(curl: str, reverse: Running, closed_port: int) -> None:
    result = run_curl(curl, "--socks5", netloc(reverse.address), f"http://127.0.0.1:{closed_port}/")
    assert result.returncode == CURL_SOCKS_ERROR, result.stderr
    failed = reverse.wait_event("channel_failed", port=closed_port)
    assert failed["reply"] == REPLY_REFUSED
    assert failed["host"] == "127.0.0.1"


# -- the same policy as -D --------------------------------------------------------------


def test_deny_rule_applies_to_reverse(
    curl: str,
    sshd: SshdServer,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
    echo_target: EchoTarget,
) -> None:
    rule = f"127.0.0.1:{http_target.port}"
    tunnel = pytunnel_factory(["--deny", rule, "-R", "0", *server_args(sshd)])
    address = remote_listener(tunnel)

    result = run_curl(curl, "--socks5", netloc(address), http_target.url("/hello"))
    assert result.returncode == CURL_SOCKS_ERROR, result.stderr
    failed = tunnel.wait_event("channel_failed", port=http_target.port)
    assert failed["reply"] == REPLY_NOT_ALLOWED
    assert failed["reason"] == f"denied by --deny {rule}"

    # The rule is about that destination only: the listener serves others.
    sock, reply = socks5_open(address, "127.0.0.1", echo_target.port)
    with sock:
        assert reply[1] == 0
        sock.sendall(b"not denied")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"not denied")


def test_reverse_and_dynamic_in_one_run(
    curl: str, sshd: SshdServer, pytunnel_factory: PytunnelFactory, http_target: HttpTarget
) -> None:
    tunnel = pytunnel_factory(["-R", "0", "-D", "127.0.0.1:0", *server_args(sshd)])
    listeners = tunnel.ready["listeners"]
    assert sorted(item["remote"] for item in listeners) == [False, True]
    assert all(item["host"] == "127.0.0.1" for item in listeners)
    local = next(item["port"] for item in listeners if not item["remote"])
    remote = next(item["port"] for item in listeners if item["remote"])

    for port in (local, remote):
        assert_hello(curl, http_target, "--socks5-hostname", f"127.0.0.1:{port}")
    assert len(tunnel.wait_events("channel_opened", 2)) == 2

    lines = listening_sockets()
    if lines is not None:
        assert owners_of(local, lines) == {tunnel.pid}
        assert_owned_by_sshd(remote, sshd, tunnel)


def test_plain_output_says_on_the_server(
    curl: str, sshd: SshdServer, pytunnel_factory: PytunnelFactory, http_target: HttpTarget
) -> None:
    tunnel = pytunnel_factory(["-R", "0", *server_args(sshd)], json_out=False, wait_ready=False)
    assert tunnel.wait_stderr("ready: ", READY_TIMEOUT), tunnel.describe()
    text = tunnel.stderr_text()
    match = re.search(r"ready: socks5h://127\.0\.0\.1:(\d+) \(on the server\)$", text, re.M)
    assert match, text
    port = int(match.group(1))
    assert f"listening on socks5h://127.0.0.1:{port} (on the server)" in text
    assert tunnel.stdout_text() == ""
    assert_hello(curl, http_target, "--socks5-hostname", f"127.0.0.1:{port}")


# -- every interface: the open proxy guard ----------------------------------------------


def test_every_interface_without_proxy_auth_is_a_usage_error(sshd: SshdServer) -> None:
    result = run_pytunnel(["-R", "*:0", *server_args(sshd)])
    assert result.returncode == 2, result.describe()
    [line] = pytunnel_lines(result.stderr)
    assert "-R *:0" in line
    assert "--proxy-auth" in line
    assert "connecting to" not in result.stderr  # refused before reaching the server


def test_every_interface_with_proxy_auth_serves_with_the_password(
    curl: str, sshd: SshdServer, pytunnel_factory: PytunnelFactory, http_target: HttpTarget
) -> None:
    tunnel = pytunnel_factory(
        ["--proxy-auth", USER, "-R", "*:0", *server_args(sshd)], env=PASSWORD_ENV
    )
    where = netloc(remote_listener(tunnel))
    assert_hello(curl, http_target, "--socks5-hostname", f"{USER}:{PASSWORD}@{where}")
    assert_hello(curl, http_target, "--socks5-hostname", where, "-U", f"{USER}:{PASSWORD}")

    result = run_curl(curl, "--socks5-hostname", where, "-U", f"{USER}:wrong", http_target.url())
    assert result.returncode == CURL_SOCKS_ERROR, result.stderr
    rejected = tunnel.wait_event("client_rejected", auth=True)
    assert "credentials" in rejected["reason"]
    assert len(tunnel.events("channel_opened")) == 2


def test_rejected_client_is_reported_once(
    sshd: SshdServer, pytunnel_factory: PytunnelFactory
) -> None:
    tunnel = pytunnel_factory(
        ["--proxy-auth", USER, "-R", "0", *server_args(sshd)], env=PASSWORD_ENV
    )
    with socket.create_connection(tunnel.address, timeout=10) as sock:
        name = client_name(sock)
        # Offers "no authentication" only, and half-closes at once, as a client may.
        sock.sendall(b"\x05\x01\x00")
        sock.shutdown(socket.SHUT_WR)
        assert recv_exact(sock, 2) == b"\x05\xff"
        assert recv_all(sock) == b""
    tunnel.wait_event("client_rejected", client=name)
    fence(tunnel)
    assert len(tunnel.events("client_rejected", client=name)) == 1, tunnel.events()


def test_announced_address_is_where_sshd_listens(
    sshd: SshdServer, pytunnel_factory: PytunnelFactory
) -> None:
    # Bound but not listening: nothing can connect to it, and sshd cannot bind it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        tunnel = pytunnel_factory(["-R", str(port), *server_args(sshd)], wait_ready=False)
        try:
            tunnel.wait_ready()
        except PytunnelStartError:
            # Refusing is a right answer too, if it says why.
            assert tunnel.proc.returncode == 3, tunnel.describe()
            assert f"-R {port}" in tunnel.stderr_text()
            return
        address = remote_listener(tunnel)
        try:
            sock = socket.create_connection(address, timeout=10)
        except OSError as exc:
            raise AssertionError(f"ready announced {address}, but: {exc}") from None
        with sock:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exact(sock, 2) == b"\x05\x00"


# -- refusals -----------------------------------------------------------------------------


def test_server_refusing_remote_forwarding_exits_3(make_sshd: Callable[..., SshdServer]) -> None:
    server = make_sshd(AllowTcpForwarding="local")
    result = run_pytunnel(["--json", "-R", "0", *server_args(server)])
    assert result.returncode == 3, result.describe()
    [line] = pytunnel_lines(result.stderr)
    assert line.startswith("pytunnel: -R 0: "), line
    assert "AllowTcpForwarding" in line
    [error] = result.events
    assert (error["event"], error["exit_status"]) == ("error", 3)
    assert error["message"].startswith("-R 0: ")


def test_static_reverse_forward_is_a_usage_error(sshd: SshdServer) -> None:
    result = run_pytunnel(["-R", "8080:localhost:80", *server_args(sshd)])
    assert result.returncode == 2, result.describe()
    [line] = pytunnel_lines(result.stderr)
    assert "reverse dynamic forwarding only" in line
    assert "connecting to" not in result.stderr


# -- staying up -------------------------------------------------------------------------


def test_reconnect_listens_again_on_the_same_port(
    curl: str,
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["-R", "0", *server_args(server)])
    host, port = remote_listener(tunnel)
    assert_hello(curl, http_target, "--socks5-hostname", f"{host}:{port}")

    # The session's processes (monitor and its child) hold the listening socket.
    victims = [pid for child in server.children() for pid in (child, *_descendants_of(child))]
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    tunnel.wait_event("session_lost")
    tunnel.wait_event("session_up", timeout=RECONNECT_DEADLINE)
    again = tunnel.wait_event("listener_started", timeout=RECONNECT_DEADLINE, port=port)
    assert (again["host"], again["remote"]) == (host, True)
    names = [event["event"] for event in tunnel.events()]
    assert names.index("session_lost") < names.index("session_up") < names.index("listener_started")

    assert_hello(curl, http_target, "--socks5-hostname", f"{host}:{port}")
    assert_owned_by_sshd(port, server, tunnel)
    lines = listening_sockets()
    if lines is not None:
        assert not owners_of(port, lines) & set(victims)
    assert tunnel.alive


# -- clients that are already retrying -------------------------------------------------


class EagerClients:
    """Programs on the server that connect to a -R port in a tight loop (a refused connect
    is retried at once) and speak SOCKS5 through each connection they get, until
    EAGER_ACCEPTED were accepted or EAGER_DEADLINE passed."""

    def __init__(self, port: int, target: EchoTarget) -> None:
        self.port = port
        self.target = target
        self.accepted: list[str] = []  # "served", or what went wrong instead
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(n,)) for n in range(EAGER_CLIENTS)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(EAGER_DEADLINE + 30)

    def _enough(self) -> bool:
        with self.lock:
            return len(self.accepted) >= EAGER_ACCEPTED

    def _client(self, index: int) -> None:
        deadline = time.monotonic() + EAGER_DEADLINE
        while not self.stop.is_set() and not self._enough() and time.monotonic() < deadline:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except ConnectionRefusedError:
                continue  # not listening yet: at once again
            payload = f"client {index}".encode()
            try:
                with sock:
                    sock.settimeout(10)
                    sock.sendall(b"\x05\x01\x00")
                    assert recv_exact(sock, 2) == b"\x05\x00"
                    sock.sendall(socks5_request(self.target.host, self.target.port))
                    assert recv_exact(sock, 10)[1] == 0
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    assert recv_all(sock) == EchoTarget.expected_reply(payload)
                outcome = "served"
            except (OSError, AssertionError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with self.lock:
                self.accepted.append(outcome)

    def check(self, tunnel: Running) -> None:
        accepted = self.accepted
        assert len(accepted) >= EAGER_ACCEPTED, (accepted, tunnel.describe())
        failed = [outcome for outcome in accepted if outcome != "served"]
        assert not failed, (
            f"{len(failed)} of {len(accepted)} not served: {failed}\n{tunnel.describe()}"
        )
        assert tunnel.events("incoming_refused") == []


def test_clients_retrying_from_the_start_are_all_served(
    sshd: SshdServer,
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
    closed_port: int,
) -> None:
    """Clients on the server connect in a tight loop from before pytunnel starts: sshd
    accepts the first ones in the moment between listening and answering, and every
    connection it accepted must be served, not reset."""
    clients = EagerClients(closed_port, echo_target)
    clients.start()
    try:
        tunnel = pytunnel_factory(["-R", str(closed_port), *server_args(sshd)])
    except BaseException:
        clients.stop.set()
        raise
    finally:
        clients.join()
    clients.check(tunnel)


def test_clients_retrying_through_a_reconnect_are_all_served(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
    closed_port: int,
) -> None:
    """The same, right after a reconnect, when the clients that were cut off retry."""
    server = make_sshd()
    tunnel = pytunnel_factory(["-R", str(closed_port), *server_args(server)])
    victims = [pid for child in server.children() for pid in (child, *_descendants_of(child))]
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    # SIGKILL is delivered later than kill() returns; once each victim is a zombie or gone
    # its sockets are closed, so from here on the old listener (and any connection in its
    # backlog) is gone: whatever is accepted is the new session's.
    assert wait_until(lambda: all(_exited(pid) for pid in victims), timeout=30)
    tunnel.wait_event("session_lost")
    clients = EagerClients(closed_port, echo_target)
    clients.start()
    try:
        tunnel.wait_event("listener_started", timeout=RECONNECT_DEADLINE, port=closed_port)
    except BaseException:
        clients.stop.set()
        raise
    finally:
        clients.join()
    clients.check(tunnel)
