"""--route through real OpenSSH sshd's: routes to two destinations (each named in its own
ssh_config block, with its own known_hosts), ``direct``, ``reject``, the rest to the
command line's destination, and failover when a destination's sshd is stopped (by PID)
and back when it returns. Which way a connection went is read twice: from the
``upstream`` of pytunnel's events and from each sshd's log (``target HOST port PORT``).
One pytunnel and three sshd's are shared by the module; the failover test puts back
what it stops."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures.event_fence import fence, wait_since
from fixtures.keys import SshKeys
from fixtures.pytunnel_proc import Running, running_pytunnel, socks5_greeting
from fixtures.sshd import SshdServer, sshd_available
from fixtures.targets import HttpTarget

pytestmark = pytest.mark.timeout(120)

LOG_TIMEOUT = 10.0
CURL_TIMEOUT = 30.0
# The failed destination's supervisor retries with backoff; coming back may take a while.
BACK_TIMEOUT = 60.0


@dataclass
class Setup:
    main: SshdServer
    a: SshdServer
    b: SshdServer
    targets: dict[str, HttpTarget]
    tunnel: Running


def ssh_config_block(alias: str, server: SshdServer) -> str:
    return (
        f"Host {alias}\n"
        f"  HostName {server.host}\n  Port {server.port}\n  User {server.user}\n"
        f"  IdentityFile {server.client_key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {server.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 10\n"
    )


@pytest.fixture(scope="module")
def setup(ssh_keys: SshKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not sshd_available():
        pytest.skip("OpenSSH server not installed")
    servers = {
        name: SshdServer(ssh_keys, tmp_path_factory.mktemp(f"sshd_{name}")).start()
        for name in ("main", "a", "b")
    }
    targets = {name: HttpTarget() for name in ("main", "a", "direct", "reject", "failover")}
    work = tmp_path_factory.mktemp("routes")
    config = work / "ssh_config"
    config.write_text("".join(ssh_config_block(n, s) for n, s in servers.items()))
    routes = work / "routes"
    routes.write_text(
        "# ways out by port, first match wins\n"
        f"*:{targets['direct'].port} = direct\n"
        "\n"
        f"*:{targets['reject'].port}=reject   # refused here\n"
        f"*:{targets['failover'].port}=b,a\n"
    )
    args = ["-D", "127.0.0.1:0", "-F", str(config), "--reconnect-wait", "0"]
    args += ["--route", f"*:{targets['a'].port}=a", "--routes", str(routes), "main"]
    try:
        with running_pytunnel(args) as tunnel:
            yield Setup(servers["main"], servers["a"], servers["b"], targets, tunnel)
    finally:
        for target in targets.values():
            target.stop()
        for server in servers.values():
            server.stop()


def curl(tunnel: Running, url: str, *proxy: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *proxy, url],
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT,
    )


def socks(tunnel: Running) -> list[str]:
    return ["--socks5-hostname", tunnel.netloc]


def fetched_through(setup: Setup, name: str) -> tuple[dict[str, object], dict[str, str]]:
    """Fetch the target ``name`` through the tunnel; its channel_opened event and each
    sshd's log since."""
    target = setup.targets[name]
    marks = {n: s.log_mark() for n, s in (("main", setup.main), ("a", setup.a), ("b", setup.b))}
    before = fence(setup.tunnel)
    result = curl(setup.tunnel, target.url(), *socks(setup.tunnel))
    assert result.returncode == 0, result.stderr
    assert result.stdout.encode() == target.hello_body
    (opened,) = wait_since(setup.tunnel, before, "channel_opened", port=target.port)
    fence(setup.tunnel)
    logs = {
        n: s.log_text(marks[n]) for n, s in (("main", setup.main), ("a", setup.a), ("b", setup.b))
    }
    return opened, logs


def reached(server: SshdServer, port: int) -> bool:
    """Whether the sshd's log shows a direct-tcpip channel to this port (a whole number:
    a client port in the log that merely starts with it does not count)."""
    return re.search(rf"target \S+ port {port}\b", server.log_text()) is not None


def test_ready_names_the_command_lines_destination(setup: Setup) -> None:
    ready = setup.tunnel.events("ready")[0]
    assert ready["upstream"] == "main"


def test_unrouted_requests_go_to_the_command_lines_destination(setup: Setup) -> None:
    port = setup.targets["main"].port
    opened, _ = fetched_through(setup, "main")
    assert opened["upstream"] == "main"
    assert setup.main.wait_log(f"target 127.0.0.1 port {port}", LOG_TIMEOUT)
    assert not reached(setup.a, port)
    assert not reached(setup.b, port)


def test_a_route_goes_through_its_own_destination(setup: Setup) -> None:
    port = setup.targets["a"].port
    opened, _ = fetched_through(setup, "a")
    assert opened["upstream"] == "a"
    assert setup.a.wait_log(f"target 127.0.0.1 port {port}", LOG_TIMEOUT)
    assert not reached(setup.main, port)
    assert not reached(setup.b, port)
    # Its session's events name it (the command line's session_up is folded into ready).
    assert [e.get("upstream") for e in setup.tunnel.events("session_up")] == ["a"]


def test_direct_connects_from_this_machine(setup: Setup) -> None:
    port = setup.targets["direct"].port
    opened, _ = fetched_through(setup, "direct")
    assert opened["upstream"] == "direct"
    for server in (setup.main, setup.a, setup.b):
        assert not reached(server, port)


def test_reject_is_refused_as_policy_and_names_the_route(setup: Setup) -> None:
    port = setup.targets["reject"].port
    before = fence(setup.tunnel)
    with socket.create_connection(setup.tunnel.address, timeout=10) as sock:
        sock.sendall(socks5_greeting())
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
        assert sock.recv(2) == b"\x05\x02"
    (failed,) = wait_since(setup.tunnel, before, "channel_failed", port=port)
    assert failed["upstream"] == "reject"
    assert "reject" in str(failed["reason"])
    assert f":{port}" in str(failed["reason"])
    http = curl(
        setup.tunnel,
        setup.targets["reject"].url(),
        "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://{setup.tunnel.netloc}",
    )  # fmt: skip
    assert http.stdout == "403"
    for server in (setup.main, setup.a, setup.b):
        assert not reached(server, port)


def test_failover_to_the_next_destination_and_back(setup: Setup) -> None:
    port = setup.targets["failover"].port
    opened, _ = fetched_through(setup, "failover")
    assert opened["upstream"] == "b"
    assert setup.b.wait_log(f"target 127.0.0.1 port {port}", LOG_TIMEOUT)

    before = fence(setup.tunnel)
    setup.b.stop()
    wait_since(setup.tunnel, before, "session_lost", upstream="b")
    mark_b = setup.b.log_mark()
    opened, _ = fetched_through(setup, "failover")
    assert opened["upstream"] == "a"
    assert setup.a.wait_log(f"target 127.0.0.1 port {port}", LOG_TIMEOUT)
    # Never the command line's destination, never direct.
    assert not reached(setup.main, port)

    before = fence(setup.tunnel)
    setup.b.start()  # the same port
    assert _wait_event(setup.tunnel, before, "session_up", upstream="b")
    mark_b = setup.b.log_mark()
    opened, _ = fetched_through(setup, "failover")
    assert opened["upstream"] == "b"
    assert setup.b.wait_log(f"target 127.0.0.1 port {port}", LOG_TIMEOUT, mark_b)


def test_all_down_fails_closed(setup: Setup) -> None:
    """A route whose every destination is down fails (0x01), and nothing goes out any
    other way."""
    port = setup.targets["failover"].port
    before = fence(setup.tunnel)
    setup.b.stop()
    setup.a.stop()
    try:
        wait_since(setup.tunnel, before, "session_lost", upstream="b")
        wait_since(setup.tunnel, before, "session_lost", upstream="a")
        with socket.create_connection(setup.tunnel.address, timeout=10) as sock:
            sock.sendall(socks5_greeting())
            assert sock.recv(2) == b"\x05\x00"
            sock.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
            assert sock.recv(2) == b"\x05\x01"
        (failed,) = wait_since(setup.tunnel, before, "channel_failed", port=port)
        assert failed["upstream"] == "b,a"
        assert not reached(setup.main, port)
    finally:
        setup.a.start()
        setup.b.start()


def _wait_event(tunnel: Running, before: int, name: str, **match: object) -> bool:
    from fixtures.net import wait_until

    return wait_until(
        lambda: any(
            e["event"] == name and all(e.get(k) == v for k, v in match.items())
            for e in tunnel.events()[before:]
        ),
        BACK_TIMEOUT,
    )


def test_routes_file_errors_name_file_and_line(tmp_path: Path) -> None:
    from fixtures.pytunnel_proc import PYTUNNEL

    routes = tmp_path / "routes"
    routes.write_text("# fine\n*.lab=a\n\n10.0.0.0/33=direct\n")
    result = subprocess.run(
        [str(PYTUNNEL), "-D", "0", "--routes", str(routes), "host"],
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT,
    )
    assert result.returncode == 2
    assert f"{routes}:4:" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_leaves_no_task_behind(sshd: SshdServer, http_target: HttpTarget) -> None:
    """Every task serve starts (the supervisor's keep_up, a route destination's, the
    wait for a signal) is cancelled and awaited before it returns (issue 18)."""
    import asyncio
    import os
    import signal

    from fixtures.in_process import EventLog, sshd_config

    from tunnel import app, events
    from tunnel.config import Forward, parse_destination
    from tunnel.rules import parse_route

    way = f"{sshd.user}@{sshd.host}:{sshd.port}"

    async def run() -> None:
        log = EventLog()
        route = parse_route(f"*:{http_target.port}={way}", "--route", parse_destination)
        config = sshd_config(sshd, forwards=(Forward("127.0.0.1", 0),), routes=(route,))
        serving = asyncio.ensure_future(app.serve(config, log))
        ready = await log.first(events.Ready, 30)
        listener = ready.listeners[0]
        reader, writer = await asyncio.open_connection(listener.host, listener.port)
        writer.write(b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01")
        writer.write(http_target.port.to_bytes(2, "big"))
        assert await asyncio.wait_for(reader.readexactly(4), 30) == b"\x05\x00\x05\x00"
        writer.close()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 30) == 0
        opened = [e for e in log.seen if isinstance(e, events.ChannelOpened)]
        assert [e.connection.upstream for e in opened] == [way]
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(run())
