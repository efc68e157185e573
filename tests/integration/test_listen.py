"""Where pytunnel listens: ``-D`` forms, the ``ready`` report, and a port already taken.

The kernel's own table (/proc/net/tcp, /proc/net/tcp6) is the witness for "listens here
and nowhere else"; a SOCKS request through each reported listener proves it is ours.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.net import ipv6_loopback_available
from fixtures.pytunnel_proc import (
    PYTUNNEL,
    Running,
    recv_all,
    run_pytunnel,
    server_args,
    socks5_open,
)
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget

from tunnel.errors import ListenError
from tunnel.proxy import ProxyServer, _bind_group
from tunnel.upstreams import Direct

pytestmark = pytest.mark.timeout(60)

Start = Callable[..., Running]
TCP_LISTEN = "0A"
PORT_ATTEMPTS = 5

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")


def _hex_to_address(text: str) -> str:
    """Decode /proc/net/tcp{,6} addresses: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words)


def listening_addresses(port: int) -> set[str]:
    """Every local address with a TCP socket in LISTEN on ``port`` (any process)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] == TCP_LISTEN and int(port_hex, 16) == port:
                found.add(_hex_to_address(address))
    return found


def loopbacks() -> set[str]:
    return {"127.0.0.1", "::1"} if ipv6_loopback_available() else {"127.0.0.1"}


def free_port_everywhere() -> int:
    """A port free on 127.0.0.1 and (if present) ::1 at this instant."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not ipv6_loopback_available():
            return port
        try:
            with socket.socket(socket.AF_INET6) as probe6:
                probe6.bind(("::1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on both loopbacks")


def assert_relays(address: tuple[str, int], echo_target: EchoTarget) -> None:
    sock, reply = socks5_open(address, "127.0.0.1", echo_target.port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"listener check")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"listener check")


def start_on_fixed_port(
    pytunnel_factory: Start, sshd: SshdServer, spec: Callable[[int], str]
) -> tuple[Running, int]:
    """Start with a port we picked; retry if someone else took it in between (exit 3)."""
    last = ""
    for _ in range(PORT_ATTEMPTS):
        port = free_port_everywhere()
        running = pytunnel_factory(["-D", spec(port), *server_args(sshd)], wait_ready=False)
        try:
            running.wait_ready()
        except AssertionError as exc:
            if running.proc.returncode == 3:
                last = str(exc)
                continue
            raise
        return running, port
    raise AssertionError(f"could not start on a fixed port: {last}")


def test_default_bind_is_loopback_on_both_families(
    pytunnel_factory: Start, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    running, port = start_on_fixed_port(pytunnel_factory, sshd, str)
    assert set(running.listeners) == {(host, port) for host in loopbacks()}
    assert listening_addresses(port) == loopbacks()
    for address in running.listeners:
        assert_relays(address, echo_target)
    # Another loopback address of 127/8 is not served: bound to 127.0.0.1 exactly.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_ready_line(tunnel: Running, sshd: SshdServer) -> None:
    [listener] = tunnel.ready["listeners"]
    assert listener == {
        "host": "127.0.0.1",
        "port": tunnel.port,
        "url": f"socks5h://127.0.0.1:{tunnel.port}",
        "remote": False,
    }
    assert tunnel.ready["server"] == f"{sshd.user}@127.0.0.1:{sshd.port}"
    assert tunnel.ready["server_version"].startswith("SSH-2.0-OpenSSH")


def test_port_zero_reports_the_chosen_port(
    pytunnel_factory: Start, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    running = pytunnel_factory(["-D", "0", *server_args(sshd)])
    ports = {port for _, port in running.listeners}
    assert len(ports) == 1, running.listeners  # one port number shared by both families
    port = ports.pop()
    assert port != 0
    assert {host for host, _ in running.listeners} == loopbacks()
    assert listening_addresses(port) == loopbacks()
    for address in running.listeners:
        assert_relays(address, echo_target)


def test_localhost_port_zero(pytunnel_factory: Start, sshd: SshdServer) -> None:
    running = pytunnel_factory(["-D", "localhost:0", *server_args(sshd)])
    assert {host for host, _ in running.listeners} == loopbacks()
    assert len({port for _, port in running.listeners}) == 1
    assert listening_addresses(running.port) == loopbacks()


def test_ipv4_address_only(tunnel: Running) -> None:
    assert tunnel.listeners == [("127.0.0.1", tunnel.port)]
    assert listening_addresses(tunnel.port) == {"127.0.0.1"}


@needs_ipv6
def test_ipv6_loopback_only(
    pytunnel_factory: Start, sshd: SshdServer, echo_target: EchoTarget
) -> None:
    running = pytunnel_factory(["-D", "[::1]:0", *server_args(sshd)])
    assert running.listeners == [("::1", running.port)]
    assert running.ready["listeners"][0]["url"] == f"socks5h://[::1]:{running.port}"
    assert listening_addresses(running.port) == {"::1"}
    assert_relays(running.address, echo_target)


def test_two_forwards(pytunnel_factory: Start, sshd: SshdServer, echo_target: EchoTarget) -> None:
    running = pytunnel_factory(["-D", "127.0.0.1:0", "-D", "localhost:0", *server_args(sshd)])
    first, *rest = running.listeners
    assert first[0] == "127.0.0.1"
    assert {host for host, _ in rest} == loopbacks()
    assert len({port for _, port in rest}) == 1
    assert first[1] != rest[0][1]
    for address in running.listeners:
        assert_relays(address, echo_target)


def test_a_port_the_system_picks_is_not_handed_to_anyone_else_before_it_listens() -> None:
    # -D 0 is bound at start and listens only once the tunnel is up. With SO_REUSEADDR on
    # both, Linux lets another socket bind that port meanwhile (and pick it for bind(0)),
    # and whoever listens second fails; without it on ours, the port stays ours alone.
    [ours] = _bind_group(("127.0.0.1",), 0, None)
    with ours, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError, match="in use") as refused:
            other.bind(ours.getsockname())
    assert refused.value.errno == errno.EADDRINUSE


def test_a_port_asked_for_by_number_may_be_bound_again_over_time_wait() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    [ours] = _bind_group(("127.0.0.1",), port, None)
    with ours:
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0


@pytest.mark.parametrize("spec", ["{port}", "127.0.0.1:{port}"])
def test_port_in_use_exits_3_before_connecting(sshd: SshdServer, spec: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        mark = sshd.log_mark()
        result = run_pytunnel(["--json", "-D", spec.format(port=port), *server_args(sshd)])
    assert result.returncode == 3, result.describe()
    assert "Traceback" not in result.stderr
    [line] = result.stderr_lines
    assert line.startswith("pytunnel: ")
    assert str(port) in line
    assert "in use" in line.lower()
    [event] = result.events
    assert (event["event"], event["exit_status"]) == ("error", 3)
    assert str(port) in event["message"]
    # The listeners come first: no SSH connection was even attempted.
    assert "Connection from" not in sshd.log_text(mark)


def test_second_forward_in_use_binds_nothing_and_prints_only_the_error_line(
    sshd: SshdServer,
) -> None:
    # A listener bound before a later -D fails is closed again: it must not be announced.
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        mark = sshd.log_mark()
        result = run_pytunnel(["-D", "127.0.0.1:0", "-D", f"127.0.0.1:{port}", *server_args(sshd)])
    assert result.returncode == 3, result.describe()
    assert "Traceback" not in result.stderr
    [line] = result.stderr_lines
    assert line.startswith("pytunnel: ")
    assert str(port) in line
    assert "Connection from" not in sshd.log_text(mark)


# ---- a bind address that does not resolve -----------------------------------------------


async def test_unresolvable_bind_address_says_so_not_pick_another_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Answered in process: the name never reaches the machine's resolver.
    def no_such_name(host: object, *args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    proxy = ProxyServer(Direct(1.0), lambda event: None)
    with pytest.raises(ListenError) as caught:
        proxy.bind([("foo.invalid", 1080)])
    error = caught.value
    assert error.message == (
        "cannot listen on foo.invalid:1080: cannot resolve foo.invalid (Name or service not known)"
    )
    assert error.hint is not None
    assert "port" not in error.hint
    assert error.exit_status == 3


def test_unresolvable_bind_address_exits_3_with_one_line() -> None:
    # In a private network namespace no resolver is reachable: the lookup fails here,
    # whatever the machine's DNS would say.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private network namespace")
    result = run_pytunnel(
        ["-D", "foo.invalid:1080", "--allow-open-proxy", "nobody@127.0.0.1"],
        executable=["unshare", "--net", str(PYTUNNEL)],
    )
    assert result.returncode == 3, result.describe()
    assert "Traceback" not in result.stderr
    [line] = result.stderr_lines
    assert line.startswith(
        "pytunnel: cannot listen on foo.invalid:1080: cannot resolve foo.invalid"
    )
    assert "pick another port" not in line
