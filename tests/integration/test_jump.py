"""``-J``: reaching the server through jump hosts, two real sshd instances on loopback.

The jump's log must show a direct-tcpip channel to the target's sshd port (the SSH
connection travelled through it), and the target's log the channels to the web target
(the tunnelled traffic left from there, not from the jump).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.pytunnel_proc import PytunnelFactory, Running, run_pytunnel, server_args
from fixtures.pytunnel_proc import curl_hello as fetch
from fixtures.sshd import SshdServer
from fixtures.targets import HttpTarget

pytestmark = pytest.mark.timeout(90)

MakeSshd = Callable[..., SshdServer]


def direct_tcpip_targets(log: str) -> list[tuple[str, int]]:
    """(host, port) of every direct-tcpip open an sshd logged at DEBUG1."""
    found = re.findall(
        r"server_request_direct_tcpip: originator \S* port \d+, target (\S+) port (\d+)", log
    )
    return [(host, int(port)) for host, port in found]


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
    make_sshd: MakeSshd,
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    jump = make_sshd()
    known = known_hosts_for(tmp_path, jump, sshd)
    jump_mark, target_mark = jump.log_mark(), sshd.log_mark()
    running = pytunnel_factory(
        ["-D", "127.0.0.1:0", "-J", hop(jump), *server_args(sshd, known_hosts=known)]
    )
    assert curl_hello(running, http_target) == http_target.hello_body.decode()

    assert jump.wait_log("server_request_direct_tcpip", since=jump_mark)
    assert direct_tcpip_targets(jump.log_text(jump_mark)) == [(sshd.host, sshd.port)]
    assert jump.wait_log(f"Accepted publickey for {jump.user}", since=jump_mark)

    assert sshd.wait_log(f"target 127.0.0.1 port {http_target.port}", since=target_mark)
    assert (sshd.host, http_target.port) in direct_tcpip_targets(sshd.log_text(target_mark))
    assert (sshd.host, http_target.port) not in direct_tcpip_targets(jump.log_text(jump_mark))


def test_two_jump_hosts(
    sshd: SshdServer,
    make_sshd: MakeSshd,
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    first, second = make_sshd(), make_sshd()
    known = known_hosts_for(tmp_path, first, second, sshd)
    marks = [server.log_mark() for server in (first, second)]
    jumps = f"{hop(first)},{hop(second)}"
    running = pytunnel_factory(
        ["-D", "127.0.0.1:0", "-J", jumps, *server_args(sshd, known_hosts=known)]
    )
    assert curl_hello(running, http_target) == http_target.hello_body.decode()
    assert first.wait_log("server_request_direct_tcpip", since=marks[0])
    assert second.wait_log("server_request_direct_tcpip", since=marks[1])
    assert direct_tcpip_targets(first.log_text(marks[0])) == [(second.host, second.port)]
    assert direct_tcpip_targets(second.log_text(marks[1])) == [(sshd.host, sshd.port)]


def test_proxyjump_option(
    sshd: SshdServer,
    make_sshd: MakeSshd,
    tmp_path: Path,
    pytunnel_factory: PytunnelFactory,
) -> None:
    jump = make_sshd()
    known = known_hosts_for(tmp_path, jump, sshd)
    mark = jump.log_mark()
    pytunnel_factory(
        ["-D", "127.0.0.1:0", "-o", f"ProxyJump={hop(jump)}",
         *server_args(sshd, known_hosts=known)]
    )  # fmt: skip
    assert jump.wait_log("server_request_direct_tcpip", since=mark)
    assert direct_tcpip_targets(jump.log_text(mark)) == [(sshd.host, sshd.port)]


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
    sshd: SshdServer, make_sshd: MakeSshd, tmp_path: Path
) -> None:
    jump = make_sshd()
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
