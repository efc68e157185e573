"""Staying up: keepalive, reconnect under open listeners, fail-closed during outages, and
the errors that are never retried. Real sshd and asyncssh servers, the real console script.

Every wait is on an event (a JSON line, a stderr line, an EOF, a process exit) with a
deadline; nothing sleeps to let something happen.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import pytest
from fixtures.asyncssh_server import (
    PORT_DROP_CONNECTION,
    PORT_ECHO,
    PORT_NEVER_ANSWER,
    AsyncsshServer,
)
from fixtures.keys import generate_ed25519
from fixtures.net import wait_until
from fixtures.pytunnel_proc import (
    Event,
    PytunnelFactory,
    Running,
    clean_env,
    client_name,
    closed_by_peer,
    connect_proxy,
    error_lines,
    recv_all,
    recv_exact,
    run_pytunnel,
    server_args,
    socks4_request,
    socks5_greeting,
    socks5_open,
    socks5_request,
)
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer, _descendants_of
from fixtures.targets import EchoTarget, HttpTarget

pytestmark = pytest.mark.timeout(60)

SOCKS5_GENERAL_FAILURE = b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"
SOCKS4_REJECTED = b"\x00\x5b"
RECONNECT_DEADLINE = 20.0  # generous: backoff may have reached its 4 s step
CURL_TIMEOUT = 20
PAYLOAD = random.Random(7).randbytes(256 * 1024)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed")
    return path


def curl(tunnel: Running, url: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [need("curl"), "--silent", "--show-error", "--fail", "--max-time", str(CURL_TIMEOUT),
         "--socks5-hostname", tunnel.netloc, url],
        capture_output=True, env=clean_env(), timeout=CURL_TIMEOUT + 10, check=False,
    )  # fmt: skip


def assert_hello(tunnel: Running, http_target: HttpTarget) -> None:
    result = curl(tunnel, http_target.url("/hello"))
    assert result.returncode == 0, (result.stderr, tunnel.describe())
    assert result.stdout == http_target.hello_body


def assert_echo(tunnel: Running, port: int, data: bytes = b"still here") -> None:
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock)
    if port == PORT_ECHO:  # the asyncssh server echoes the bytes themselves
        assert answer == data
    else:
        assert answer == EchoTarget.expected_reply(data)


def index_of(events: list[Event], name: str, start: int = 0, **match: object) -> int:
    """Position of the first event ``name`` (with ``match``) at or after ``start``."""
    for position in range(start, len(events)):
        event = events[position]
        if event["event"] == name and all(event.get(k) == v for k, v in match.items()):
            return position
    raise AssertionError(f"no {name} {match} after #{start} in {[e['event'] for e in events]}")


def wait_events(tunnel: Running, done: Callable[[list[Event]], bool], timeout: float) -> None:
    """Until the event list satisfies ``done`` (it only ever grows), or fail."""
    if not wait_until(lambda: done(tunnel.events()), timeout):
        raise AssertionError(f"events never got there:\n{tunnel.describe()}")


def ups_reach(count: int) -> Callable[[list[Event]], bool]:
    """For ``wait_events``: at least ``count`` session_up events (reconnects) so far."""
    return lambda events: sum(e["event"] == "session_up" for e in events) >= count


def wait_stderr(tunnel: Running, needle: str, count: int = 1, timeout: float = 10.0) -> None:
    if not wait_until(lambda: tunnel.stderr_text().count(needle) >= count, timeout):
        raise AssertionError(f"{needle!r} x{count} not on stderr:\n{tunnel.describe()}")


def open_echo(tunnel: Running, echo_target: EchoTarget) -> tuple[socket.socket, str]:
    """A tunnelled connection in the middle of an upload: the target answers only after
    our EOF, which never comes, so any end the client sees is the tunnel's doing."""
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port)
    assert reply == SOCKS5_OK
    sock.sendall(PAYLOAD)
    name = client_name(sock)
    tunnel.wait_event("channel_opened", client=name)
    return sock, name


@contextlib.contextmanager
def canary() -> Iterator[socket.socket]:
    """A loopback listener that must never see a connection: if the tunnel ever connected
    directly instead of through SSH, it would show up in the accept queue."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        yield sock
    finally:
        sock.close()


def assert_untouched(sock: socket.socket) -> None:
    try:
        conn, peer = sock.accept()
    except BlockingIOError:
        return
    conn.close()
    raise AssertionError(f"the tunnel connected directly to the canary from {peer}")


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP ``pids`` (a black hole: the TCP connection stays up, nothing answers);
    always SIGCONT then SIGKILL them at the end so no stopped process outlives the test.
    One that has exited since it was listed (such as sshd's pre-authentication child,
    which ends once the login is done) is no part of the session any more; at least one
    must be stopped."""
    stopped: list[int] = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        assert stopped, f"every one of {pids} had exited"
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def connection_pids(server: SshdServer) -> list[int]:
    children = server.children()
    return [pid for child in children for pid in (child, *_descendants_of(child))]


def connect_lines(stderr: str) -> list[str]:
    """PlainRenderer's 'connecting to ...' lines: one per connection attempt."""
    return [line for line in stderr.splitlines() if re.search(r"\bconnecting to \S+", line)]


# -- losing the session under open listeners ------------------------------------------------


def test_killed_session_process_closes_clients_and_reconnects(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
    http_target: HttpTarget,
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(server)])
    [child] = server.children()
    # Mid-download: 8 MiB asked for, 64 KiB read, the rest in flight. The target keeps the
    # connection alive after the response (HTTP/1.1), so any EOF is the tunnel's doing.
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", http_target.port)
    with sock:
        assert reply == SOCKS5_OK
        name = client_name(sock)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: target\r\n\r\n")
        first = recv_exact(sock, 64 * 1024)
        assert first.startswith(b"HTTP/1.")
        os.kill(child, signal.SIGKILL)
        rest = recv_all(sock)  # ends (EOF or reset) instead of hanging
    closed = tunnel.wait_event("connection_closed", client=name)
    assert len(first) <= closed["bytes_down"]
    assert len(first) + len(rest) <= closed["bytes_down"] <= http_target.big_size + 1024
    lost = tunnel.wait_event("session_lost")
    assert lost["server"] == tunnel.ready["server"]
    tunnel.wait_event("session_up", timeout=RECONNECT_DEADLINE)

    events = tunnel.events()
    at_lost = index_of(events, "session_lost")
    # Retried at once: the first reconnect attempt is not scheduled with a delay.
    at_connecting = index_of(events, "session_connecting", at_lost)
    index_of(events, "session_up", at_connecting)
    assert "reconnect_scheduled" not in [e["event"] for e in events[at_lost:at_connecting]]

    # The same port, a new sshd process: a new request goes through.
    assert_hello(tunnel, http_target)
    assert server.children() not in ([], [child])
    assert tunnel.alive


@pytest.mark.slow
def test_server_gone_requests_fail_closed_then_work_again(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
    http_target: HttpTarget,
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["--reconnect-wait", "1", "-D", "127.0.0.1:0", *server_args(server)])
    assert_hello(tunnel, http_target)
    held, name = open_echo(tunnel, echo_target)
    with held:
        server.stop()  # listener and every session process
        assert closed_by_peer(held) == b""
    tunnel.wait_event("connection_closed", client=name)
    tunnel.wait_event("session_lost")

    with canary() as target:
        port = target.getsockname()[1]
        # SOCKS5: the listener still accepts, the request waits its bound, then 0x01.
        sock, reply = socks5_open(tunnel.address, "127.0.0.1", port)
        with sock:
            v5 = client_name(sock)
            assert reply == SOCKS5_GENERAL_FAILURE
            assert closed_by_peer(sock) == b""
        # SOCKS4 (with a name, as SOCKS4a): 91, then closed.
        with connect_proxy(tunnel.address) as sock:
            v4 = client_name(sock)
            sock.sendall(socks4_request("localhost", port))
            assert recv_exact(sock, 8)[:2] == SOCKS4_REJECTED
            assert closed_by_peer(sock) == b""
        assert_untouched(target)
    for client, version in ((v5, 5), (v4, 4)):
        failed = tunnel.wait_event("channel_failed", client=client)
        assert failed["reply"] == 0x01, (version, failed)
        assert "waited 1 s" in failed["reason"], failed

    # It keeps trying, with growing, jittered delays (backoff 1, 2, 4... scaled by [0.5, 1]).
    # Attempts count from the start: 1 connected, 2 was the immediate retry.
    tunnel.wait_event("reconnect_scheduled", attempt=4, timeout=RECONNECT_DEADLINE)
    delays = {e["attempt"]: e["delay"] for e in tunnel.events("reconnect_scheduled")}
    assert 0.5 <= delays[3] <= 1.0, delays
    assert 1.0 <= delays[4] <= 2.0, delays

    reconnected = ups_reach(len(tunnel.events("session_up")) + 1)  # counted before the start
    server.start()  # same port
    wait_events(tunnel, reconnected, RECONNECT_DEADLINE)
    assert_hello(tunnel, http_target)
    assert_echo(tunnel, echo_target.port)
    assert tunnel.events("listener_started") == []  # never re-bound
    assert tunnel.alive


def test_request_waiting_during_the_outage_is_served_once_back(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["--reconnect-wait", "30", "-D", "127.0.0.1:0", *server_args(server)])
    server.stop()
    tunnel.wait_event("session_lost")
    with connect_proxy(tunnel.address) as sock:
        sock.sendall(socks5_greeting())
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(socks5_request("127.0.0.1", echo_target.port))
        tunnel.wait_event("request_parsed", client=client_name(sock))
        server.start()
        # The request waited for the session; once it is back, the reply and the relay.
        assert recv_exact(sock, 10, timeout=RECONNECT_DEADLINE) == SOCKS5_OK
        sock.sendall(b"patience")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"patience")
    tunnel.wait_event("session_up")


@pytest.mark.slow
def test_black_holed_server_is_detected_by_keepalive(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    server = make_sshd()
    keepalive = ["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2"]
    tunnel = pytunnel_factory([*keepalive, "-D", "127.0.0.1:0", *server_args(server)])
    victims = connection_pids(server)
    assert victims
    with frozen(victims):
        # The TCP connection stays up; only keepalive can tell that nobody answers.
        lost = tunnel.wait_event("session_lost", timeout=15)
        assert "keepalive" in lost["reason"]
        tunnel.wait_event("session_up", timeout=RECONNECT_DEADLINE)
        # The sshd listener forked a fresh process for the new session.
        assert_hello(tunnel, http_target)
    assert tunnel.alive


@pytest.mark.slow
def test_keepalive_is_on_by_default(
    make_sshd: Callable[..., SshdServer], pytunnel_factory: PytunnelFactory
) -> None:
    # No ServerAlive* option: an idle session still sends keepalives (every 15 s by
    # default), which sshd logs at DEBUG1. OpenSSH's own client would send none.
    server = make_sshd()
    mark = server.log_mark()
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(server)])
    assert server.wait_log("keepalive@openssh.com", timeout=25, since=mark), server.log_text(mark)
    assert tunnel.alive


def test_dropped_asyncssh_connection_reconnects(
    pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer
) -> None:
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(asyncssh_server)])
    assert_echo(tunnel, PORT_ECHO, b"before")
    # Twice: the second loss must be noticed on the reconnected session, too.
    for round_ in (1, 2):
        sock, reply = socks5_open(tunnel.address, "127.0.0.1", PORT_DROP_CONNECTION)
        with sock:
            # The open dies with the session: a failure reply, never success.
            assert reply == SOCKS5_GENERAL_FAILURE
        wait_events(tunnel, ups_reach(round_), RECONNECT_DEADLINE)
        assert len(tunnel.events("session_lost")) == round_
        assert_echo(tunnel, PORT_ECHO, b"after %d" % round_)
    assert tunnel.alive


def test_pending_open_fails_at_once_when_the_session_dies(
    pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer
) -> None:
    # The open timeout is long: only the loss of the session can end the pending open.
    args = ["--open-timeout", "30", "-D", "127.0.0.1:0", *server_args(asyncssh_server)]
    tunnel = pytunnel_factory(args)
    with connect_proxy(tunnel.address) as pending:
        pending.sendall(socks5_greeting() + socks5_request("127.0.0.1", PORT_NEVER_ANSWER))
        assert recv_exact(pending, 2) == b"\x05\x00"
        tunnel.wait_event("request_parsed", client=client_name(pending))
        with contextlib.closing(socks5_open(tunnel.address, "127.0.0.1", PORT_DROP_CONNECTION)[0]):
            assert recv_exact(pending, 10, timeout=10) == SOCKS5_GENERAL_FAILURE
            assert closed_by_peer(pending) == b""
    tunnel.wait_event("session_up", timeout=RECONNECT_DEADLINE)


def test_no_reconnect_exits_255_when_the_session_is_lost(
    pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer
) -> None:
    tunnel = pytunnel_factory(
        ["--no-reconnect", "-D", "127.0.0.1:0", *server_args(asyncssh_server)]
    )
    with contextlib.closing(socks5_open(tunnel.address, "127.0.0.1", PORT_DROP_CONNECTION)[0]):
        assert tunnel.wait() == 255
    names = [e["event"] for e in tunnel.events()]
    assert "session_lost" in names
    assert "session_connecting" not in names
    assert "reconnect_scheduled" not in names
    assert names[-1] == "error"
    assert len(error_lines(tunnel.stderr_text())) == 1


def test_no_reconnect_exits_255_when_sshd_dies(
    make_sshd: Callable[..., SshdServer], pytunnel_factory: PytunnelFactory
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["--no-reconnect", "-D", "127.0.0.1:0", *server_args(server)])
    port = tunnel.port
    server.stop()
    assert tunnel.wait() == 255
    [line] = error_lines(tunnel.stderr_text())
    assert str(server.port) in line
    with pytest.raises(ConnectionRefusedError):  # the listener went with it
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# -- starting up ----------------------------------------------------------------------------


def test_first_connection_failure_exits_255(closed_port: int, sshd: SshdServer) -> None:
    args = [*server_args(sshd)[:-3], "-p", str(closed_port), "tester@127.0.0.1"]
    result = run_pytunnel(["--json", "-D", "127.0.0.1:0", *args], timeout=20)
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result.stderr)
    assert "refused" in line.lower()
    assert [e["event"] for e in result.events] == ["error"]
    assert len(connect_lines(result.stderr)) == 1


@pytest.mark.slow
def test_retry_start_waits_for_the_server_to_appear(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    server = make_sshd()
    server.stop()
    tunnel = pytunnel_factory(
        ["--retry-start", "-D", "127.0.0.1:0", *server_args(server)], wait_ready=False
    )
    wait_stderr(tunnel, "reconnecting in", count=2, timeout=15)
    # Not ready while there is no session: no line on stdout at all.
    assert tunnel.stdout_text() == ""
    assert tunnel.alive
    server.start()
    tunnel.wait_ready(RECONNECT_DEADLINE)
    assert_hello(tunnel, http_target)


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_signal_while_retrying_the_start_exits_at_once(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, closed_port: int, signum: int, status: int
) -> None:
    args = [*server_args(sshd)[:-3], "-p", str(closed_port), "tester@127.0.0.1"]
    tunnel = pytunnel_factory(["--retry-start", "-D", "127.0.0.1:0", *args], wait_ready=False)
    wait_stderr(tunnel, "reconnecting in")
    tunnel.send_signal(signum)
    assert tunnel.wait(5) == status
    assert [e["event"] for e in tunnel.events()] == ["stopping"]  # never ready
    assert error_lines(tunnel.stderr_text()) == []


def test_connect_timeout_bounds_a_silent_server(sshd: SshdServer) -> None:
    # A listener that completes the TCP handshake (backlog) but never says a word.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        args = ["-o", "ConnectTimeout=1", *server_args(sshd)[:-3], "-p", str(port)]
        started = time.monotonic()
        result = run_pytunnel(["-D", "127.0.0.1:0", *args, "tester@127.0.0.1"], timeout=20)
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result.stderr)
    assert "timed out" in line
    assert time.monotonic() - started < 15  # a deadline, not a measurement


# -- errors that retrying cannot fix --------------------------------------------------------


@pytest.fixture
def stranger_key(tmp_path: Path) -> Path:
    path = tmp_path / "stranger_key"
    generate_ed25519(path, "not-authorized")
    return path


@pytest.fixture
def changed_known_hosts(tmp_path: Path, sshd: SshdServer) -> Path:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    path = tmp_path / "known_hosts_changed"
    path.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.split()[:2])}\n")
    return path


def sshd_connections(server: SshdServer, mark: int) -> int:
    return len(re.findall(r"^Connection from 127\.0\.0\.1 ", server.log_text(mark), re.M))


@pytest.mark.parametrize("retry_start", [False, True], ids=["default", "retry-start"])
def test_auth_failure_is_never_retried(
    sshd: SshdServer, stranger_key: Path, retry_start: bool
) -> None:
    mark = sshd.log_mark()
    extra = ["--retry-start"] if retry_start else []
    result = run_pytunnel(
        ["--json", *extra, "-D", "127.0.0.1:0", *server_args(sshd, key=stranger_key)],
        timeout=20,
    )
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result.stderr)
    assert "permission denied" in line.lower()
    assert len(connect_lines(result.stderr)) == 1, result.stderr
    assert "reconnecting" not in result.stderr
    assert [e["event"] for e in result.events] == ["error"]
    assert sshd.wait_log("Connection from 127.0.0.1", since=mark)
    assert sshd_connections(sshd, mark) == 1


@pytest.mark.parametrize("retry_start", [False, True], ids=["default", "retry-start"])
def test_changed_host_key_is_never_retried(
    sshd: SshdServer, changed_known_hosts: Path, retry_start: bool
) -> None:
    mark = sshd.log_mark()
    extra = ["--retry-start"] if retry_start else []
    result = run_pytunnel(
        [*extra, "-D", "127.0.0.1:0", *server_args(sshd, known_hosts=changed_known_hosts)],
        timeout=20,
    )
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result.stderr)
    assert "HOST KEY CHANGED" in line
    assert len(connect_lines(result.stderr)) == 1, result.stderr
    assert "reconnecting" not in result.stderr
    assert sshd.wait_log("Connection from 127.0.0.1", since=mark)
    assert sshd_connections(sshd, mark) == 1


def test_auth_failure_while_reconnecting_is_fatal(
    make_sshd: Callable[..., SshdServer], pytunnel_factory: PytunnelFactory
) -> None:
    # The session was up; the server comes back no longer accepting our key.
    server = make_sshd()
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(server)])
    server.stop()
    tunnel.wait_event("session_lost")
    server.authorized_keys.write_text("")
    server.start()
    assert tunnel.wait(RECONNECT_DEADLINE) == 255
    [line] = error_lines(tunnel.stderr_text())
    assert "permission denied" in line.lower()
    assert tunnel.events()[-1]["event"] == "error"


# -- once known bugs, now guarded ---------------------------------------------------------


def test_lost_line_names_the_server_once(
    pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer
) -> None:
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(asyncssh_server)])
    with contextlib.closing(socks5_open(tunnel.address, "127.0.0.1", PORT_DROP_CONNECTION)[0]):
        tunnel.wait_event("session_up", timeout=RECONNECT_DEADLINE)
    server = tunnel.ready["server"]
    [line] = [x for x in tunnel.stderr_text().splitlines() if f" lost {server}" in x]
    assert line.count(server) == 1, line


def test_reconnect_attempt_numbers_agree(
    make_sshd: Callable[..., SshdServer], pytunnel_factory: PytunnelFactory
) -> None:
    server = make_sshd()
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(server)])
    server.stop()
    # Attempt 1 connected, 2 was the immediate retry: 3 is the first with a delay.
    scheduled = tunnel.wait_event("reconnect_scheduled", attempt=3, timeout=RECONNECT_DEADLINE)
    wait_events(
        tunnel, lambda evs: len([e for e in evs if e["event"] == "session_connecting"]) >= 3, 10
    )
    events = tunnel.events()
    after = index_of(events, "reconnect_scheduled", attempt=3)
    connecting = events[index_of(events, "session_connecting", after)]
    assert connecting["attempt"] == scheduled["attempt"], (scheduled, connecting)
