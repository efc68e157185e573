"""``-J``: reaching the server through jump hosts, two real sshd instances on loopback.

The jump's log must show a direct-tcpip channel to the target's sshd port (the SSH
connection travelled through it), and the target's log the channels to the web target
(the tunnelled traffic left from there, not from the jump).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.keys import SshKeys, generate_ed25519, public_key_line
from fixtures.pytunnel_proc import PytunnelFactory, Running, run_pytunnel, server_args
from fixtures.pytunnel_proc import curl_hello as fetch
from fixtures.sshd import SshdServer
from fixtures.targets import HttpTarget

pytestmark = pytest.mark.timeout(90)

MakeSshd = Callable[..., SshdServer]


@pytest.fixture(scope="module")
def jumps(
    sshd: SshdServer, ssh_keys: SshKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SshdServer, SshdServer]]:
    """Two jump hosts for the tests that only read their logs (each since its own mark):
    one pair of sshd for the module instead of one or two per test. Tests that change
    a jump host (its authorized_keys) start their own with make_sshd."""
    servers = [SshdServer(ssh_keys, tmp_path_factory.mktemp("jump")) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


def direct_tcpip_targets(log: str) -> list[tuple[str, int]]:
    """(host, port) of every direct-tcpip open an sshd logged at DEBUG1."""
    found = re.findall(
        r"server_request_direct_tcpip: originator \S* port \d+, target (\S+) port (\d+)", log
    )
    return [(host, int(port)) for host, port in found]


def assert_opened(server: SshdServer, mark: int, target: SshdServer) -> None:
    """``server``'s log since ``mark`` shows one direct-tcpip open: to ``target``'s sshd."""
    assert server.wait_log("server_request_direct_tcpip", since=mark)
    assert direct_tcpip_targets(server.log_text(mark)) == [(target.host, target.port)]


def known_hosts_for(tmp_path: Path, *servers: SshdServer) -> Path:
    """One known_hosts file trusting every server (each sshd wrote its own)."""
    path = tmp_path / "known_hosts_all"
    path.write_text("".join(Path(server.known_hosts).read_text() for server in servers))
    return path


def hop(server: SshdServer) -> str:
    return f"{server.user}@{server.host}:{server.port}"


def curl_hello(running: Running, http_target: HttpTarget) -> str:
    return fetch(running, http_target.url("/hello"))


def test_one_jump_host(
    sshd: SshdServer,
    jumps: tuple[SshdServer, SshdServer],
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    jump = jumps[0]
    known = known_hosts_for(tmp_path, jump, sshd)
    jump_mark, target_mark = jump.log_mark(), sshd.log_mark()
    running = pytunnel_factory(
        ["-D", "127.0.0.1:0", "-J", hop(jump), *server_args(sshd, known_hosts=known)]
    )
    assert curl_hello(running, http_target) == http_target.hello_body.decode()

    assert_opened(jump, jump_mark, sshd)
    assert jump.wait_log(f"Accepted publickey for {jump.user}", since=jump_mark)

    assert sshd.wait_log(f"target 127.0.0.1 port {http_target.port}", since=target_mark)
    assert (sshd.host, http_target.port) in direct_tcpip_targets(sshd.log_text(target_mark))
    assert (sshd.host, http_target.port) not in direct_tcpip_targets(jump.log_text(jump_mark))


def test_two_jump_hosts(
    sshd: SshdServer,
    jumps: tuple[SshdServer, SshdServer],
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    first, second = jumps
    known = known_hosts_for(tmp_path, first, second, sshd)
    marks = [server.log_mark() for server in (first, second)]
    chain = f"{hop(first)},{hop(second)}"
    running = pytunnel_factory(
        ["-D", "127.0.0.1:0", "-J", chain, *server_args(sshd, known_hosts=known)]
    )
    assert curl_hello(running, http_target) == http_target.hello_body.decode()
    assert_opened(first, marks[0], second)
    assert_opened(second, marks[1], sshd)


def test_proxyjump_option(
    sshd: SshdServer,
    jumps: tuple[SshdServer, SshdServer],
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
) -> None:
    jump = jumps[0]
    known = known_hosts_for(tmp_path, jump, sshd)
    mark = jump.log_mark()
    pytunnel_factory(
        ["-D", "127.0.0.1:0", "-o", f"ProxyJump={hop(jump)}",
         *server_args(sshd, known_hosts=known)]
    )  # fmt: skip
    assert_opened(jump, mark, sshd)


def test_unreachable_jump_host_is_named(sshd: SshdServer, closed_port: int) -> None:
    mark = sshd.log_mark()
    result = run_pytunnel(
        ["-D", "127.0.0.1:0", "-J", f"{sshd.user}@127.0.0.1:{closed_port}", *server_args(sshd)]
    )
    assert result.returncode == 255, result.describe()
    assert "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr_lines if ln.startswith("pytunnel: ")]
    assert "jump host" in line
    assert str(closed_port) in line
    assert "Accepted publickey" not in sshd.log_text(mark)


def test_unknown_jump_host_key_is_refused(
    sshd: SshdServer, jumps: tuple[SshdServer, SshdServer], tmp_path: Path
) -> None:
    jump = jumps[0]
    known = known_hosts_for(tmp_path, sshd)  # the target only
    mark = sshd.log_mark()
    result = run_pytunnel(
        ["-D", "127.0.0.1:0", "-J", hop(jump), *server_args(sshd, known_hosts=known)]
    )
    assert result.returncode == 255, result.describe()
    [line] = [ln for ln in result.stderr_lines if ln.startswith("pytunnel: ")]
    assert f"[{jump.host}]:{jump.port}" in line
    assert "not known" in line
    assert "Accepted publickey" not in sshd.log_text(mark)


# == ProxyJump in ssh_config (-F) ==========================================================


def own_key(tmp_path: Path, server: SshdServer, name: str) -> Path:
    """A key of its own for ``server``, the only one its authorized_keys accepts: a login
    there proves that this key, and so that host's own IdentityFile, was used."""
    path = tmp_path / name
    generate_ed25519(path, name)
    server.authorized_keys.write_text(public_key_line(path.with_suffix(".pub")) + "\n")
    return path


def alias_block(name: str, server: SshdServer, key: str | Path, extra: str = "") -> str:
    return (
        f"Host {name}\n"
        f"    HostName {server.host}\n"
        f"    Port {server.port}\n"
        f"    User {server.user}\n"
        f"    IdentityFile {key}\n"
        f"{extra}"
    )


def strict_args(path: Path, known: Path) -> list[str]:
    """The config file, and host-key checking on the command line: pytunnel applies its
    command line to every hop (ssh would leave the jump hosts to ~/.ssh/known_hosts)."""
    return [
        "-F", str(path),
        "-o", f"UserKnownHostsFile={known}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "ConnectTimeout=10",
        "-D", "127.0.0.1:0",
    ]  # fmt: skip


def test_proxyjump_in_ssh_config_goes_through_the_jump_alias(
    sshd: SshdServer,
    make_sshd: MakeSshd,
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    jump = make_sshd()
    jump_key = own_key(tmp_path, jump, "jump_key")
    known = known_hosts_for(tmp_path, jump, sshd)
    path = tmp_path / "ssh_config"
    path.write_text(
        alias_block("behind", sshd, sshd.client_key, "    ProxyJump jumpbox\n")
        + alias_block("jumpbox", jump, jump_key)
    )
    jump_mark, target_mark = jump.log_mark(), sshd.log_mark()
    running = pytunnel_factory([*strict_args(path, known), "behind"])
    assert curl_hello(running, http_target) == http_target.hello_body.decode()
    assert jump.wait_log(f"Accepted publickey for {jump.user}", since=jump_mark)
    assert_opened(jump, jump_mark, sshd)
    assert sshd.wait_log(f"target 127.0.0.1 port {http_target.port}", since=target_mark)


def test_proxyjump_chains_through_the_jump_hosts_own_proxyjump(
    sshd: SshdServer,
    make_sshd: MakeSshd,
    jumps: tuple[SshdServer, SshdServer],
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    # The outer host gets a key of its own (own_key): a private sshd.
    outer, inner = make_sshd(), jumps[1]
    outer_key = own_key(tmp_path, outer, "outer_key")
    known = known_hosts_for(tmp_path, outer, inner, sshd)
    path = tmp_path / "ssh_config"
    path.write_text(
        alias_block("behind", sshd, sshd.client_key, "    ProxyJump inner\n")
        + alias_block("inner", inner, sshd.client_key, "    ProxyJump outer\n")
        + alias_block("outer", outer, outer_key)
    )
    marks = [server.log_mark() for server in (outer, inner)]
    running = pytunnel_factory([*strict_args(path, known), "behind"])
    assert curl_hello(running, http_target) == http_target.hello_body.decode()
    assert_opened(outer, marks[0], inner)
    assert_opened(inner, marks[1], sshd)


def test_command_line_jump_beats_and_none_cancels_proxyjump_in_ssh_config(
    sshd: SshdServer,
    jumps: tuple[SshdServer, SshdServer],
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
    closed_port: int,
) -> None:
    jump = jumps[0]
    known = known_hosts_for(tmp_path, jump, sshd)
    path = tmp_path / "ssh_config"
    # The configured jump host cannot be reached: any run that used it would fail.
    path.write_text(
        alias_block("behind", sshd, sshd.client_key, "    ProxyJump nowhere\n")
        + f"Host nowhere\n    HostName 127.0.0.1\n    Port {closed_port}\n"
    )
    failed = run_pytunnel([*strict_args(path, known), "behind"])
    assert failed.returncode == 255, failed.describe()
    assert "jump host nowhere" in failed.stderr
    assert "refused" in failed.stderr

    jump_mark = jump.log_mark()
    base = strict_args(path, known)
    # The destination's IdentityFile is not the jump host's: -i gives it one.
    pytunnel_factory([*base, "-i", sshd.client_key, "-J", hop(jump), "behind"])
    assert_opened(jump, jump_mark, sshd)

    # Reaching the server at all shows the unreachable jump host was not used.
    for none in (["-J", "none"], ["-o", "ProxyJump=none"], ["-o", "ProxyCommand=none"]):
        mark = sshd.log_mark()
        assert pytunnel_factory([*base, *none, "behind"]).ready["event"] == "ready"
        assert sshd.wait_log(f"Accepted publickey for {sshd.user}", since=mark)


@pytest.mark.parametrize("first", ["ProxyJump", "ProxyCommand"])
def test_proxyjump_and_proxycommand_whichever_comes_first(
    sshd: SshdServer,
    jumps: tuple[SshdServer, SshdServer],
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
    closed_port: int,
    first: str,
) -> None:
    jump = jumps[0]
    known = known_hosts_for(tmp_path, jump, sshd)
    lines = {
        "ProxyJump": "    ProxyJump jumpbox\n",
        # A command that could only fail: used, it would stop the run.
        "ProxyCommand": f"    ProxyCommand nc 127.0.0.1 {closed_port}\n",
    }
    second = "ProxyCommand" if first == "ProxyJump" else "ProxyJump"
    path = tmp_path / "ssh_config"
    path.write_text(
        alias_block("behind", sshd, sshd.client_key, lines[first] + lines[second])
        + alias_block("jumpbox", jump, sshd.client_key)
    )
    args = [*strict_args(path, known), "behind"]
    jump_mark = jump.log_mark()
    if first == "ProxyJump":
        pytunnel_factory(args)
        assert jump.wait_log("server_request_direct_tcpip", since=jump_mark)
    else:
        result = run_pytunnel(args)
        assert result.returncode == 255, result.describe()
        assert "ProxyCommand" in result.stderr
        assert "server_request_direct_tcpip" not in jump.log_text(jump_mark)
