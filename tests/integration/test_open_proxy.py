"""The open-proxy guard: a ``-D`` that other machines can reach, without ``--proxy-auth``,
is refused with exit status 2 and one line that names both ways out, before anything is
bound or any SSH connection is tried; loopback listeners, ``--proxy-auth`` and
``--allow-open-proxy`` start as usual.

Refusals run against a port where nothing listens: had the guard not fired first, the
exit status would be 255 (connection refused), not 2.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from fixtures.net import ipv6_loopback_available
from fixtures.pytunnel_proc import (
    PYTUNNEL,
    Finished,
    PytunnelFactory,
    closed_by_peer,
    recv_all,
    recv_exact,
    run_pytunnel,
    server_args,
    socks5_greeting,
    socks5_open,
)
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget

from tunnel.errors import ConfigError
from tunnel.proxy import ProxyServer
from tunnel.upstreams import Direct

pytestmark = pytest.mark.timeout(60)

GUARD_TIMEOUT = 20.0
PASSWORD_ENV = {"PYTUNNEL_PROXY_PASSWORD": "guard-test-pw"}


def unreachable_ssh(port: int) -> list[str]:
    """Options that would fail with 255 if pytunnel ever tried to connect."""
    return ["-F", "none", "-o", "ConnectTimeout=5", "-p", str(port), "nobody@127.0.0.1"]


def assert_guarded(result: Finished, shown: str) -> None:
    assert result.returncode == 2, result.describe()
    [line] = result.stderr_lines
    assert "--proxy-auth" in line
    assert "--allow-open-proxy" in line
    assert f"-D {shown}" in line, line
    assert "listening" not in result.stderr
    assert "connecting" not in result.stderr


GUARDED = [
    # (-D as typed, how the message names it)
    ("0.0.0.0:0", "0.0.0.0:0"),
    ("*:0", "*:0"),
    (":0", "*:0"),
    ("[::]:0", "[::]:0"),
    ("192.0.2.1:0", "192.0.2.1:0"),  # any address that is not loopback, bound or not
]


def test_a_host_name_is_guarded_too(closed_port: int) -> None:
    # A name may resolve to anything. This machine's own name resolves locally (no DNS
    # query leaves the machine even if the guard failed and pytunnel tried to bind it).
    name = socket.gethostname()
    if name.lower() in ("localhost", "ip6-localhost", "ip6-loopback") or not name:
        pytest.skip(f"this machine's name {name!r} is a loopback name")
    result = run_pytunnel(["-D", f"{name}:0", *unreachable_ssh(closed_port)], timeout=GUARD_TIMEOUT)
    assert_guarded(result, f"{name}:0")


@pytest.mark.parametrize(("spec", "shown"), GUARDED, ids=[g[0] for g in GUARDED])
def test_non_loopback_listener_without_auth_is_refused(
    spec: str, shown: str, closed_port: int
) -> None:
    result = run_pytunnel(["-D", spec, *unreachable_ssh(closed_port)], timeout=GUARD_TIMEOUT)
    assert_guarded(result, shown)


def test_gateway_ports_flag_is_guarded(closed_port: int) -> None:
    result = run_pytunnel(["-g", "-D", "0", *unreachable_ssh(closed_port)], timeout=GUARD_TIMEOUT)
    assert_guarded(result, "*:0")


def test_one_open_listener_among_loopback_ones_is_enough(closed_port: int) -> None:
    result = run_pytunnel(
        ["-D", "127.0.0.1:0", "-D", "0.0.0.0:0", *unreachable_ssh(closed_port)],
        timeout=GUARD_TIMEOUT,
    )
    assert_guarded(result, "0.0.0.0:0")


def test_json_mode_reports_the_refusal_as_an_event(closed_port: int) -> None:
    result = run_pytunnel(
        ["--json", "-D", "0.0.0.0:0", *unreachable_ssh(closed_port)], timeout=GUARD_TIMEOUT
    )
    assert result.returncode == 2, result.describe()
    [event] = result.events
    assert event["event"] == "error"
    assert event["exit_status"] == 2
    assert "--allow-open-proxy" in event["message"]


@pytest.mark.parametrize(
    ("config", "shown"),
    [
        ("DynamicForward 0.0.0.0:0", "0.0.0.0:0"),
        ("GatewayPorts yes", "*:0"),
    ],
    ids=["DynamicForward", "GatewayPorts"],
)
def test_ssh_config_cannot_open_the_proxy_either(
    config: str, shown: str, closed_port: int, tmp_path: Path
) -> None:
    path = tmp_path / "ssh_config"
    path.write_text(f"Host *\n  {config}\n")
    spec = "127.0.0.1:0" if config.startswith("DynamicForward") else "0"
    args = ["-F", str(path), "-D", spec, "-o", "ConnectTimeout=5", "-p", str(closed_port)]
    result = run_pytunnel([*args, "nobody@127.0.0.1"], timeout=GUARD_TIMEOUT)
    assert_guarded(result, shown)


# ---- what is allowed -----------------------------------------------------------------------


def test_allow_open_proxy_starts_and_serves(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    tunnel = pytunnel_factory(["-D", "0.0.0.0:0", "--allow-open-proxy", *server_args(sshd)])
    assert [host for host, _ in tunnel.listeners] == ["0.0.0.0"]
    # Only ever used from loopback here.
    sock, reply = socks5_open(("127.0.0.1", tunnel.port), "127.0.0.1", echo_target.port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"ping")


def test_proxy_auth_starts_and_demands_a_password(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer
) -> None:
    tunnel = pytunnel_factory(
        ["-D", "0.0.0.0:0", "--proxy-auth", "bob", *server_args(sshd)], env=PASSWORD_ENV
    )
    assert [host for host, _ in tunnel.listeners] == ["0.0.0.0"]
    with socket.create_connection(("127.0.0.1", tunnel.port), timeout=10) as sock:
        sock.sendall(socks5_greeting(b"\x00"))
        assert recv_exact(sock, 2) == b"\x05\xff"
        assert closed_by_peer(sock) == b""


def test_gateway_ports_with_proxy_auth_starts(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer
) -> None:
    tunnel = pytunnel_factory(
        ["-g", "-D", "0", "--proxy-auth", "bob", *server_args(sshd)], env=PASSWORD_ENV
    )
    assert {host for host, _ in tunnel.listeners} <= {"0.0.0.0", "::"}


LOOPBACK_SPECS = [
    ("localhost:0", {"127.0.0.1", "::1"}),
    ("127.0.0.2:0", {"127.0.0.2"}),
    ("127.0.0.1:0", {"127.0.0.1"}),
    ("0", {"127.0.0.1", "::1"}),
]


@pytest.mark.parametrize(("spec", "hosts"), LOOPBACK_SPECS, ids=[s for s, _ in LOOPBACK_SPECS])
def test_loopback_listeners_need_no_flag(
    pytunnel_factory: PytunnelFactory,
    sshd: SshdServer,
    echo_target: EchoTarget,
    spec: str,
    hosts: set[str],
) -> None:
    tunnel = pytunnel_factory(["-D", spec, *server_args(sshd)])
    bound = {host for host, _ in tunnel.listeners}
    assert bound <= hosts
    assert bound & {"127.0.0.1", "127.0.0.2"}
    host, port = next((h, p) for h, p in tunnel.listeners if not h.startswith("::"))
    sock, reply = socks5_open((host, port), "127.0.0.1", echo_target.port)
    with sock:
        assert reply == SOCKS5_OK


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6_loopback_needs_no_flag(pytunnel_factory: PytunnelFactory, sshd: SshdServer) -> None:
    tunnel = pytunnel_factory(["-D", "[::1]:0", *server_args(sshd)])
    assert [host for host, _ in tunnel.listeners] == ["::1"]


# ---- loopback names are bound as literals, whatever the resolver says ---------------------

# Every loopback name means every interface here: what a hostile /etc/hosts or resolver
# could answer. Only pytunnel sees it, in its own mount namespace; nothing is looked up
# beyond this file, and the SSH server is reached by address.
HOSTILE_HOSTS = "0.0.0.0 localhost ip6-localhost ip6-loopback\n"


def hostile_hosts_prefix(tmp_path: Path) -> list[str]:
    """The command that runs pytunnel with HOSTILE_HOSTS as its /etc/hosts."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private /etc/hosts")
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTILE_HOSTS)
    wrap = ["unshare", "--mount", "sh", "-c", 'mount --bind "$1" /etc/hosts && shift && exec "$@"']
    probe = subprocess.run(
        [*wrap, "sh", str(hosts), "getent", "ahostsv4", "ip6-localhost"],
        capture_output=True,
        text=True,
        timeout=GUARD_TIMEOUT,
        check=False,
    )
    if probe.returncode != 0 or "0.0.0.0" not in probe.stdout:
        pytest.skip(f"cannot give pytunnel a private /etc/hosts: {probe.stderr.strip()}")
    return [*wrap, "sh", str(hosts), str(PYTUNNEL)]


NAMED_LOOPBACK = [
    ("LOCALHOST:0", {"127.0.0.1", "::1"}),
    ("Localhost:0", {"127.0.0.1", "::1"}),
    ("ip6-localhost:0", {"::1"}),
    ("IP6-LOOPBACK:0", {"::1"}),
]


@pytest.mark.parametrize(("spec", "hosts"), NAMED_LOOPBACK, ids=[s for s, _ in NAMED_LOOPBACK])
def test_loopback_names_bind_loopback_even_if_the_resolver_says_otherwise(
    sshd: SshdServer, tmp_path: Path, spec: str, hosts: set[str]
) -> None:
    if hosts == {"::1"} and not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback")
    prefix = hostile_hosts_prefix(tmp_path)
    # The command ends the tunnel once it is up, so the run has an end.
    result = run_pytunnel(
        ["--json", "-D", spec, *server_args(sshd), "--", "true"],
        executable=prefix,
        timeout=GUARD_TIMEOUT,
    )
    assert result.returncode == 0, result.describe()
    [ready] = [event for event in result.events if event["event"] == "ready"]
    bound = {item["host"] for item in ready["listeners"]}
    assert bound, result.describe()
    assert bound <= hosts, result.describe()


# ---- where the password comes from -----------------------------------------------------------


def test_proxy_auth_without_a_password_is_a_usage_error(closed_port: int) -> None:
    result = run_pytunnel(
        ["-D", "0.0.0.0:0", "--proxy-auth", "bob", *unreachable_ssh(closed_port)],
        timeout=GUARD_TIMEOUT,
    )
    assert result.returncode == 2, result.describe()
    [line] = result.stderr_lines
    assert "PYTUNNEL_PROXY_PASSWORD" in line
    assert "--proxy-password-file" in line


def test_password_file_without_proxy_auth_is_a_usage_error(
    closed_port: int, tmp_path: Path
) -> None:
    path = tmp_path / "pw"
    path.write_text("secret\n")
    result = run_pytunnel(
        ["-D", "0", "--proxy-password-file", str(path), *unreachable_ssh(closed_port)],
        timeout=GUARD_TIMEOUT,
    )
    assert result.returncode == 2, result.describe()
    assert "--proxy-auth" in result.stderr


def test_unreadable_password_file_is_a_usage_error(closed_port: int, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    args = ["-D", "0", "--proxy-auth", "bob", "--proxy-password-file", str(missing)]
    result = run_pytunnel([*args, *unreachable_ssh(closed_port)], timeout=GUARD_TIMEOUT)
    assert result.returncode == 2, result.describe()
    assert str(missing) in result.stderr


async def test_a_check_after_binding_sees_every_address_and_can_refuse_them_all() -> None:
    # What serve() does with guard_bound: the addresses the sockets report, before any
    # accept; a refusal closes every socket and announces none.
    seen: list[object] = []
    offered: list[list[tuple[str, int]]] = []

    def refuse(bound: list[tuple[str, int]]) -> None:
        offered.append(bound)
        raise ConfigError("refused")

    proxy = ProxyServer(Direct(GUARD_TIMEOUT), seen.append)
    with pytest.raises(ConfigError):
        await proxy.listen([("127.0.0.1", 0), ("127.0.0.2", 0)], check=refuse)
    [[(first, port), (second, _)]] = offered
    assert (first, second) == ("127.0.0.1", "127.0.0.2")
    assert seen == []
    assert proxy.listeners == []
    # The refused socket is closed: its port can be bound again at once.
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))
