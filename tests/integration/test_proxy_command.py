"""ProxyCommand, from ssh_config and from ``-o``, against the real sshd.

Each test names a port where nothing listens as the server's port, so only a connection
made through the command can reach sshd: a ready tunnel proves the command was used.
The commands are ``nc`` and ``sh -c`` on loopback.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.pytunnel_proc import (
    Finished,
    PytunnelFactory,
    Running,
    run_pytunnel,
    server_args,
)
from fixtures.pytunnel_proc import curl_hello as fetch
from fixtures.sshd import SshdServer
from fixtures.targets import HttpTarget

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("nc") is None, reason="nc is not installed"),
]

MakeSshd = Callable[..., SshdServer]


def known_hosts_at(tmp_path: Path, sshd: SshdServer, port: int) -> Path:
    """Trust sshd's key under the name and port the configuration gives (the closed
    port), as ssh checks the configured name, not where the command went."""
    path = tmp_path / "known_hosts_proxy"
    path.write_text(f"[{sshd.host}]:{port} {sshd.host_key_pub}\n")
    return path


def proxy_command_config(tmp_path: Path, sshd: SshdServer, closed_port: int, command: str) -> Path:
    """An ssh_config whose ``viaproxy`` reaches ``sshd`` through ``command`` (its own port
    given as ``closed_port``, so only the command can get there), with a known_hosts
    filed under that name and port."""
    known = known_hosts_at(tmp_path, sshd, closed_port)
    return config_file(tmp_path, sshd, closed_port, known, f"    ProxyCommand {command}\n")


def config_file(tmp_path: Path, sshd: SshdServer, port: int, known: Path, extra: str) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(
        "Host viaproxy\n"
        f"    HostName {sshd.host}\n"
        f"    Port {port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile {sshd.client_key}\n"
        f"    UserKnownHostsFile {known}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n"
        "    ConnectTimeout 10\n"
        f"{extra}"
    )
    return path


def error_line(result: Finished) -> str:
    assert "Traceback" not in result.stderr, result.describe()
    [line] = [ln for ln in result.stderr_lines if ln.startswith("pytunnel: ")]
    return line


def curl_hello(running: Running, http_target: HttpTarget) -> str:
    return fetch(running, http_target.url("/hello"))


def test_proxycommand_in_ssh_config_with_its_tokens(
    sshd: SshdServer,
    tmp_path: Path,
    closed_port: int,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    tokens = tmp_path / "tokens"
    command = f"sh -c 'echo %h %p %r %n 100%% > {tokens}; exec nc {sshd.host} {sshd.port}'"
    path = proxy_command_config(tmp_path, sshd, closed_port, command)
    mark = sshd.log_mark()
    running = pytunnel_factory(["-F", str(path), "-D", "127.0.0.1:0", "viaproxy"])
    assert curl_hello(running, http_target) == http_target.hello_body.decode()
    assert sshd.wait_log(f"Accepted publickey for {sshd.user}", since=mark)
    assert tokens.read_text() == f"{sshd.host} {closed_port} {sshd.user} viaproxy 100%\n"


def test_proxycommand_on_the_command_line(
    sshd: SshdServer,
    tmp_path: Path,
    closed_port: int,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    args = server_args(sshd, known_hosts=known_hosts_at(tmp_path, sshd, closed_port))
    args[args.index("-p") + 1] = str(closed_port)
    # %h and %p are the configured host and (closed) port; the command goes elsewhere.
    proxy = f"ProxyCommand=sh -c 'test %h:%p = {sshd.host}:{closed_port} && exec nc %h {sshd.port}'"
    running = pytunnel_factory(["-D", "127.0.0.1:0", "-o", proxy, *args])
    assert curl_hello(running, http_target) == http_target.hello_body.decode()


def test_proxycommand_none_on_the_command_line_cancels_the_files(
    sshd: SshdServer, tmp_path: Path, pytunnel_factory: PytunnelFactory
) -> None:
    path = config_file(
        tmp_path, sshd, sshd.port, Path(sshd.known_hosts), "    ProxyCommand false\n"
    )
    failed = run_pytunnel(["-F", str(path), "-D", "127.0.0.1:0", "viaproxy"])
    assert failed.returncode == 255, failed.describe()
    args = ["-F", str(path), "-o", "ProxyCommand=none", "-D", "127.0.0.1:0", "viaproxy"]
    assert pytunnel_factory(args).ready["event"] == "ready"


def test_failing_proxycommand_says_so_with_its_stderr(
    sshd: SshdServer, tmp_path: Path, closed_port: int
) -> None:
    command = "sh -c 'echo first line >&2; echo cannot reach %h >&2; exit 3'"
    path = proxy_command_config(tmp_path, sshd, closed_port, command)
    result = run_pytunnel(["-F", str(path), "-D", "127.0.0.1:0", "viaproxy"])
    assert result.returncode == 255, result.describe()
    line = error_line(result)
    assert f"ProxyCommand `{command}` exited 3: cannot reach {sshd.host}" in line
    # Everything it wrote reached the user's stderr, in order, as ssh lets it through.
    passed_on = [ln.split(" ", 1)[1] for ln in result.stderr_lines if " ProxyCommand: " in ln]
    assert passed_on == ["ProxyCommand: first line", f"ProxyCommand: cannot reach {sshd.host}"]


def test_nc_that_cannot_connect(sshd: SshdServer, tmp_path: Path, closed_port: int) -> None:
    args = server_args(sshd)
    result = run_pytunnel(["-D", "127.0.0.1:0", "-o", f"ProxyCommand=nc %h {closed_port}", *args])
    assert result.returncode == 255, result.describe()
    line = error_line(result)
    assert f"ProxyCommand `nc %h {closed_port}` exited 1" in line
    assert "refused" in line.lower()
    assert "Broken pipe" not in line


def test_proxycommand_that_is_not_there(sshd: SshdServer) -> None:
    result = run_pytunnel(
        ["-D", "127.0.0.1:0", "-o", "ProxyCommand=no-such-command-here %h", *server_args(sshd)]
    )
    assert result.returncode == 255, result.describe()
    line = error_line(result)
    assert "ProxyCommand `no-such-command-here %h` exited 127" in line
    assert "not found" in line


def test_failing_proxycommand_is_retried_like_a_connect_failure(
    sshd: SshdServer,
    tmp_path: Path,
    closed_port: int,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    # Fails until the marker exists (the first run makes it), then connects.
    marker = tmp_path / "second_time"
    command = (
        f"sh -c 'test -e {marker} || {{ touch {marker}; echo not yet >&2; exit 1; }}; "
        f"exec nc {sshd.host} {sshd.port}'"
    )
    path = proxy_command_config(tmp_path, sshd, closed_port, command)
    running = pytunnel_factory(
        ["--retry-start", "-F", str(path), "-D", "127.0.0.1:0", "viaproxy"], wait_ready=False
    )
    running.wait_ready()
    # Before ready, --json keeps to stdout's first line: the retry is told on stderr.
    stderr = running.stderr_text()
    assert "ProxyCommand: not yet" in stderr, running.describe()
    assert "connecting to viaproxy (attempt 2)" in stderr, running.describe()
    assert curl_hello(running, http_target) == http_target.hello_body.decode()


def test_the_command_ends_with_the_tunnel(
    sshd: SshdServer, tmp_path: Path, closed_port: int, pytunnel_factory: PytunnelFactory
) -> None:
    # The command outlives stdin's end on purpose: only being stopped ends it, as ssh
    # stops its ProxyCommand when it exits.
    pid_file = tmp_path / "proxy.pid"
    command = f"sh -c 'echo $$ > {pid_file}; nc {sshd.host} {sshd.port}; exec sleep 600'"
    path = proxy_command_config(tmp_path, sshd, closed_port, command)
    running = pytunnel_factory(["-F", str(path), "-D", "127.0.0.1:0", "viaproxy"])
    pid = int(pid_file.read_text())
    assert Path(f"/proc/{pid}").exists()
    assert running.stop() == 0, running.describe()
    # pytunnel waited for it: it is gone (reaped), not a zombie left behind.
    assert not Path(f"/proc/{pid}").exists()


def test_a_jump_hosts_own_proxycommand_starts_the_chain(
    sshd: SshdServer,
    make_sshd: MakeSshd,
    tmp_path: Path,
    closed_port: int,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    jump = make_sshd()
    known = tmp_path / "known_hosts_chain"
    known.write_text(
        f"[{jump.host}]:{closed_port} {jump.host_key_pub}\n"
        f"[{sshd.host}]:{sshd.port} {sshd.host_key_pub}\n"
    )
    path = tmp_path / "ssh_config"
    path.write_text(
        "Host behind\n"
        f"    HostName {sshd.host}\n    Port {sshd.port}\n    ProxyJump jumpbox\n"
        "Host jumpbox\n"
        f"    HostName {jump.host}\n    Port {closed_port}\n"
        f"    ProxyCommand nc %h {jump.port}\n"
        "Host *\n"
        f"    User {sshd.user}\n    IdentityFile {sshd.client_key}\n"
        f"    UserKnownHostsFile {known}\n    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n    ConnectTimeout 10\n"
    )
    mark = jump.log_mark()
    running = pytunnel_factory(["-F", str(path), "-D", "127.0.0.1:0", "behind"])
    assert curl_hello(running, http_target) == http_target.hello_body.decode()
    assert jump.wait_log("server_request_direct_tcpip", since=mark)
    assert f"target {sshd.host} port {sshd.port}" in jump.log_text(mark)


@pytest.mark.parametrize(
    "args",
    [
        ["-l", "x;touch owned", "-o", "ProxyCommand=ssh -W %h:%p %r@gateway"],
        ["-o", "ProxyCommand=nc %h %x"],
    ],
    ids=["unsafe-user", "unknown-token"],
)
def test_refused_proxycommand_is_one_line_and_exit_2(args: list[str]) -> None:
    result = run_pytunnel(["-F", "none", "-D", "127.0.0.1:0", *args, "127.0.0.1"])
    assert result.returncode == 2, result.describe()
    assert "ProxyCommand" in error_line(result)
    assert len(result.stderr_lines) == 1, result.describe()


def test_a_line_asyncssh_cannot_read_is_a_usage_error(
    sshd: SshdServer, tmp_path: Path, closed_port: int
) -> None:
    # ssh leaves ${VAR} to the shell; asyncssh, reading the file again for each
    # connection, insists on the variable: a clear line, not a complaint about keys.
    command = "sh -c 'exec nc %h ${PYTUNNEL_TEST_UNSET_VARIABLE}'"
    path = proxy_command_config(tmp_path, sshd, closed_port, command)
    result = run_pytunnel(["-F", str(path), "-D", "127.0.0.1:0", "viaproxy"])
    assert result.returncode == 2, result.describe()
    line = error_line(result)
    assert "in ssh_config" in line
    assert "PYTUNNEL_TEST_UNSET_VARIABLE" in line


def test_control_characters_from_the_command_never_reach_the_terminal(
    sshd: SshdServer,
) -> None:
    # An escape sequence (here: clear the screen) is shown, not obeyed.
    command = "ProxyCommand=sh -c \"printf '\\033[2Jgone\\n' >&2; exit 1\""
    result = run_pytunnel(["-D", "127.0.0.1:0", "-o", command, *server_args(sshd)])
    assert result.returncode == 255, result.describe()
    assert "\x1b" not in result.stderr
    assert "ProxyCommand: ?[2Jgone" in result.stderr
    assert "exited 1: ?[2Jgone" in error_line(result)
