"""The installed ``pytunnel`` console script as users run it: options, exit statuses,
signals, ``-- COMMAND`` and ``--demo``. Every run is a real subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    client_name,
    recv_all,
    request_protocol,
    run_pytunnel,
    server_args,
    socks5_open,
    start_pytunnel,
)
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget, HttpTarget

import tunnel

pytestmark = pytest.mark.timeout(60)

USAGE = 2


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed")
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- information -----------------------------------------------------------------------------


def test_version() -> None:
    result = run_pytunnel(["-V"])
    assert result.returncode == 0, result.describe()
    assert result.stdout.strip() == f"pytunnel, version {tunnel.__version__}"


def test_version_long_option() -> None:
    result = run_pytunnel(["--version"])
    assert result.returncode == 0
    assert tunnel.__version__ in result.stdout


def test_help() -> None:
    result = run_pytunnel(["-h"])
    assert result.returncode == 0, result.describe()
    assert "Usage:" in result.stdout
    for option in ("-D", "--json", "--open-timeout", "--handshake-timeout", "--demo"):
        assert option in result.stdout
    assert result.stderr == ""


def test_python_dash_m() -> None:
    result = run_pytunnel(["-V"], executable=[sys.executable, "-m", "tunnel"])
    assert result.returncode == 0, result.describe()
    assert result.stdout.strip() == f"pytunnel, version {tunnel.__version__}"


# -- usage errors: exit 2, one line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-Z"], "-Z"),
        (["-D", "abc", "host"], "abc"),
        (["-D", "70000", "host"], "70000"),
        (["-D", "0", "-o", "Bogus=1", "host"], "Bogus"),
        (["-D", "0", "-o", "StrictHostKeyChecking=perhaps", "host"], "perhaps"),
        (["-D", "0"], "destination"),
        ([], "destination"),
        (["-D", "0", "-p", "port", "host"], "port"),
        (["--open-timeout", "0", "-D", "0", "host"], "open-timeout"),
        (["--demo", "-D", "0", "host"], "demo"),
    ],
    ids=[
        "unknown-option",
        "bad-D",
        "D-out-of-range",
        "unsupported-o",
        "bad-o-value",
        "no-destination",
        "no-arguments",
        "bad-p",
        "zero-open-timeout",
        "demo-with-destination",
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], needle: str) -> None:
    result = run_pytunnel(args)
    assert result.returncode == USAGE, result.describe()
    assert "Traceback" not in result.stderr
    [line] = result.stderr_lines
    assert line.startswith("pytunnel: ")
    assert needle in line
    assert result.stdout == ""


def test_usage_error_with_json_prints_an_error_event() -> None:
    result = run_pytunnel(["--json", "-D", "abc", "host"])
    assert result.returncode == USAGE
    [event] = result.events
    assert (event["event"], event["exit_status"]) == ("error", USAGE)
    assert "abc" in event["message"]
    assert len(result.stderr_lines) == 1


def test_ssh_connection_refused_is_exit_255(closed_port: int) -> None:
    result = run_pytunnel(["-D", "127.0.0.1:0", "-F", "none", "-p", str(closed_port), "127.0.0.1"])
    assert result.returncode == 255, result.describe()
    assert "Traceback" not in result.stderr
    [line] = [x for x in result.stderr_lines if x.startswith("pytunnel: ")]
    assert "refused" in line.lower()


# -- signals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "status", "reason"),
    [(signal.SIGTERM, 0, "terminated"), (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "SIGINT"],
)
def test_signals_stop_a_running_tunnel(
    pytunnel_factory: PytunnelFactory,
    sshd: SshdServer,
    signum: signal.Signals,
    status: int,
    reason: str,
) -> None:
    running = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(sshd)])
    running.send_signal(signum)
    assert running.wait() == status, running.describe()
    assert running.events("stopping")[-1]["reason"] == reason
    assert "Traceback" not in running.stderr_text()


def test_signal_while_connecting(pytunnel_factory: PytunnelFactory) -> None:
    # A server that accepts TCP and never says a word: pytunnel is stuck in the handshake.
    with socket.create_server(("127.0.0.1", 0)) as mute:
        args = ["-D", "127.0.0.1:0", "-F", "none", "-p", str(mute.getsockname()[1]), "127.0.0.1"]
        running = pytunnel_factory(args, wait_ready=False)
        assert running.wait_stderr("connecting to"), running.describe()
        running.send_signal(signal.SIGTERM)
        assert running.wait() == 0, running.describe()
    [event] = running.events()
    assert event["event"] == "stopping"
    assert "Traceback" not in running.stderr_text()


def test_sigterm_closes_open_connections(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    running = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(sshd)])
    sock, reply = socks5_open(running.address, "127.0.0.1", echo_target.port)
    with sock:
        assert reply[:2] == b"\x05\x00"
        client = client_name(sock)
        sock.sendall(b"half a request")
        running.send_signal(signal.SIGTERM)
        assert running.wait() == 0, running.describe()
        assert recv_all(sock) == b""  # closed by pytunnel on its way out
    event = running.wait_event("connection_closed", client=client)
    assert event["bytes_up"] == len(b"half a request")


# -- -- COMMAND -----------------------------------------------------------------------------------


def tunnel_command(sshd: SshdServer, *command: str, json_out: bool = False) -> list[str]:
    return [
        *(["--json"] if json_out else []),
        "-D",
        "127.0.0.1:0",
        *server_args(sshd),
        "--",
        *command,
    ]


def test_command_exit_status_is_passed_on(sshd: SshdServer) -> None:
    result = run_pytunnel(tunnel_command(sshd, "sh", "-c", "exit 7"))
    assert result.returncode == 7, result.describe()


def test_command_killed_by_a_signal_is_128_plus_n(sshd: SshdServer) -> None:
    result = run_pytunnel(tunnel_command(sshd, "sh", "-c", "kill -TERM $$"))
    assert result.returncode == 128 + signal.SIGTERM, result.describe()


def test_command_gets_the_proxy_environment(sshd: SshdServer) -> None:
    script = 'echo "port=$PYTUNNEL_PORT all=$ALL_PROXY lower=$all_proxy"'
    result = run_pytunnel(tunnel_command(sshd, "sh", "-c", script, json_out=True))
    assert result.returncode == 0, result.describe()
    ready = result.events[0]
    assert ready["event"] == "ready"
    port = ready["listeners"][0]["port"]
    url = f"socks5h://127.0.0.1:{port}"
    assert f"port={port} all={url} lower={url}\n" in result.stdout


# pytunnel puts loopback in NO_PROXY for the command; our targets are on loopback, so the
# command drops it (and, for the SOCKS case, the http_proxy variables that curl prefers).
VIA_SOCKS = 'unset NO_PROXY no_proxy http_proxy HTTP_PROXY; exec curl --silent --fail "$1"'
VIA_HTTP = 'unset NO_PROXY no_proxy; exec curl --silent --fail "$1"'


@pytest.mark.parametrize(
    ("script", "protocol"),
    [(VIA_SOCKS, "socks5"), (VIA_HTTP, "http")],
    ids=["ALL_PROXY", "http_proxy"],
)
def test_command_reaches_the_target_through_the_tunnel(
    sshd: SshdServer, http_target: HttpTarget, script: str, protocol: str
) -> None:
    need("curl")
    command = ("sh", "-c", script, "sh", http_target.url("/hello"))
    result = run_pytunnel(tunnel_command(sshd, *command, json_out=True))
    assert result.returncode == 0, result.describe()
    assert http_target.hello_body.decode() in result.stdout
    # Not a direct connection: pytunnel carried it, in the protocol the variables say.
    [request] = [ev for ev in result.events if ev["event"] == "request_parsed"]
    assert (request["host"], request["port"]) == ("127.0.0.1", http_target.port)
    assert request_protocol(request) == protocol
    [closed] = [ev for ev in result.events if ev["event"] == "connection_closed"]
    assert closed["bytes_down"] > len(http_target.hello_body)


def test_command_is_stopped_with_the_tunnel(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer
) -> None:
    running = pytunnel_factory(tunnel_command(sshd, "sh", "-c", "echo child=$$; exec sleep 60"))
    assert running.wait_stdout("child="), running.describe()
    match = re.search(r"child=(\d+)", running.stdout_text())
    assert match, running.describe()
    child = int(match.group(1))
    assert pid_alive(child)
    running.send_signal(signal.SIGTERM)
    # The command got our SIGTERM and died of it; its status is what we report.
    assert running.wait() == 128 + signal.SIGTERM, running.describe()
    assert not pid_alive(child)


@pytest.mark.parametrize(("kind", "status"), [("missing", 127), ("not-executable", 126)])
def test_command_that_cannot_start(
    sshd: SshdServer, tmp_path: Path, kind: str, status: int
) -> None:
    program = tmp_path / "program"
    if kind == "not-executable":
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o644)
    result = run_pytunnel(tunnel_command(sshd, str(program)))
    assert "Traceback" not in result.stderr, result.describe()
    lines = [line for line in result.stderr_lines if line.startswith("pytunnel: ")]
    assert len(lines) == 1, result.describe()
    assert str(program) in lines[0]
    assert result.returncode == status, result.describe()


# -- --demo ----------------------------------------------------------------------------------------


def test_demo_serves_its_page_through_the_tunnel() -> None:
    curl = need("curl")
    result = run_pytunnel(
        ["--demo", "-D", "127.0.0.1:0", "--", curl, "-s", "http://pytunnel.demo/"]
    )
    assert result.returncode == 0, result.describe()
    assert "Hello from the far side of the tunnel." in result.stdout
    assert "pytunnel.demo" in result.stdout
    assert "Traceback" not in result.stderr


def test_demo_shows_reverse_forwarding(http_target: HttpTarget) -> None:
    # The demo server listens for -R on its loopback (this machine): a curl aimed at
    # that port comes back over the SSH connection and out from pytunnel.
    curl = need("curl")
    with start_pytunnel(["--demo", "-R", "0"]) as running:
        [remote] = [item for item in running.ready["listeners"] if item["remote"]]
        assert remote["host"] == "127.0.0.1"
        result = subprocess.run(
            [curl, "-s", "--max-time", "20", "-x", remote["url"], http_target.url("/hello")],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == http_target.hello_body
        running.wait_event("channel_opened", port=http_target.port)
