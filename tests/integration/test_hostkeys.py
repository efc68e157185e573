"""Host-key trust and authentication against the real sshd, through the console script.

Failures must be one clear ``pytunnel:`` line on stderr (never a traceback) and exit 255,
before any listener is announced as ready.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import asyncssh
import pytest
from fixtures.keys import generate_ed25519
from fixtures.pytunnel_proc import (
    Finished,
    PytunnelFactory,
    PytunnelStartError,
    recv_all,
    run_pytunnel,
    server_args,
    socks5_open,
)
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget

pytestmark = pytest.mark.timeout(60)

SOCKS5_OK = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def fingerprint(public_line: str) -> str:
    return str(asyncssh.import_public_key(public_line).get_fingerprint("sha256"))


def other_host_key_line() -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def host_pattern(sshd: SshdServer) -> str:
    return f"[127.0.0.1]:{sshd.port}"


def error_lines(result: Finished) -> list[str]:
    assert "Traceback" not in result.stderr, result.describe()
    assert "Traceback" not in result.stdout, result.describe()
    return [line for line in result.stderr_lines if line.startswith("pytunnel: ")]


def run_against(sshd: SshdServer, known_hosts: Path, *extra: str, strict: str = "yes") -> Finished:
    args = server_args(sshd, known_hosts=known_hosts, strict=strict)
    return run_pytunnel(["--json", "-D", "127.0.0.1:0", *extra, *args])


def assert_relays(address: tuple[str, int], echo_target: EchoTarget) -> None:
    sock, reply = socks5_open(address, "127.0.0.1", echo_target.port)
    with sock:
        assert reply == SOCKS5_OK
        sock.sendall(b"trusted")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(b"trusted")


@pytest.fixture
def empty_known_hosts(tmp_path: Path) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text("")
    return path


@pytest.fixture
def changed_known_hosts(tmp_path: Path, sshd: SshdServer) -> Path:
    path = tmp_path / "known_hosts_changed"
    path.write_text(f"{host_pattern(sshd)} {other_host_key_line()}\n")
    return path


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_unknown_host_key_is_refused(
    sshd: SshdServer, empty_known_hosts: Path, quiet: bool
) -> None:
    result = run_against(sshd, empty_known_hosts, *(["-q"] if quiet else []))
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    assert host_pattern(sshd) in line
    assert "ssh-ed25519" in line
    assert fingerprint(sshd.host_key_pub) in line
    assert "not known" in line.lower()
    if quiet:
        assert result.stderr_lines == [line]
    assert [ev["event"] for ev in result.events] == ["error"]
    assert result.events[0]["exit_status"] == 255
    assert empty_known_hosts.read_text() == ""  # "yes" never writes


def test_missing_known_hosts_file_is_an_unknown_key(sshd: SshdServer, tmp_path: Path) -> None:
    result = run_against(sshd, tmp_path / "nope" / "known_hosts")
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    assert fingerprint(sshd.host_key_pub) in line
    assert not (tmp_path / "nope").exists()


def test_changed_host_key_is_refused_loudly(sshd: SshdServer, changed_known_hosts: Path) -> None:
    before = changed_known_hosts.read_text()
    result = run_against(sshd, changed_known_hosts)
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    assert "CHANGED" in line.upper()
    assert host_pattern(sshd) in line
    assert fingerprint(sshd.host_key_pub) in line
    assert changed_known_hosts.read_text() == before


def test_accept_new_records_an_unknown_key(
    sshd: SshdServer,
    empty_known_hosts: Path,
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    args = server_args(sshd, known_hosts=empty_known_hosts, strict="accept-new")
    running = pytunnel_factory(["-D", "127.0.0.1:0", *args])
    assert_relays(running.address, echo_target)
    lines = empty_known_hosts.read_text().splitlines()
    assert len(lines) == 1
    fields = lines[0].split()
    assert fields[:3] == [host_pattern(sshd), *sshd.host_key_pub.split()]
    # The recorded line is good enough for strict checking next time.
    again = pytunnel_factory(
        ["-D", "127.0.0.1:0", *server_args(sshd, known_hosts=empty_known_hosts)]
    )
    assert_relays(again.address, echo_target)
    assert len(empty_known_hosts.read_text().splitlines()) == 1


def test_accept_new_creates_the_file(
    sshd: SshdServer, tmp_path: Path, pytunnel_factory: PytunnelFactory
) -> None:
    path = tmp_path / "fresh" / "known_hosts"
    pytunnel_factory(
        ["-D", "127.0.0.1:0", *server_args(sshd, known_hosts=path, strict="accept-new")]
    )
    assert path.read_text().split()[:3] == [host_pattern(sshd), *sshd.host_key_pub.split()]


def test_accept_new_never_accepts_a_changed_key(
    sshd: SshdServer, changed_known_hosts: Path
) -> None:
    before = changed_known_hosts.read_text()
    result = run_against(sshd, changed_known_hosts, strict="accept-new")
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    assert "CHANGED" in line.upper()
    assert changed_known_hosts.read_text() == before


def test_strict_no_connects_despite_a_changed_key(
    sshd: SshdServer,
    changed_known_hosts: Path,
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    before = changed_known_hosts.read_text()
    args = server_args(sshd, known_hosts=changed_known_hosts, strict="no")
    running = pytunnel_factory(["-D", "127.0.0.1:0", *args])
    assert_relays(running.address, echo_target)
    assert changed_known_hosts.read_text() == before


def test_hashed_known_hosts_entry_is_trusted(
    sshd: SshdServer, tmp_path: Path, pytunnel_factory: PytunnelFactory, echo_target: EchoTarget
) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen not installed")
    path = tmp_path / "known_hosts_hashed"
    path.write_text(f"{host_pattern(sshd)} {sshd.host_key_pub}\n")
    subprocess.run(
        [keygen, "-q", "-H", "-f", str(path)], check=True, capture_output=True, timeout=30
    )
    assert path.read_text().startswith("|1|")
    running = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(sshd, known_hosts=path)])
    assert_relays(running.address, echo_target)


def test_wrong_client_key_is_permission_denied(sshd: SshdServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    generate_ed25519(stranger, "not-authorized")
    mark = sshd.log_mark()
    result = run_pytunnel(["--json", "-D", "127.0.0.1:0", *server_args(sshd, key=stranger)])
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    assert "permission denied" in line.lower()
    assert [ev["event"] for ev in result.events] == ["error"]
    # sshd saw the attempt and refused it: it was the key, not the connection.
    assert "Accepted publickey" not in sshd.log_text(mark)


def test_unknown_user_is_permission_denied(sshd: SshdServer) -> None:
    result = run_pytunnel(["-D", "127.0.0.1:0", *server_args(sshd, user="no-such-user-here")])
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    assert "permission denied" in line.lower()


# -- revoked keys and keys of another type ---------------------------------------------------


@pytest.fixture
def revoked_known_hosts(tmp_path: Path, sshd: SshdServer) -> Path:
    path = tmp_path / "known_hosts_revoked"
    path.write_text(f"@revoked {host_pattern(sshd)} {sshd.host_key_pub}\n")
    return path


def test_accept_new_never_accepts_a_revoked_key(
    sshd: SshdServer, revoked_known_hosts: Path, pytunnel_factory: PytunnelFactory
) -> None:
    before = revoked_known_hosts.read_text()
    args = server_args(sshd, known_hosts=revoked_known_hosts, strict="accept-new")
    running = pytunnel_factory(["-D", "127.0.0.1:0", *args], wait_ready=False)
    try:
        with pytest.raises(PytunnelStartError):
            running.wait_ready()  # "ready" would mean it trusted the revoked key
        assert running.proc.returncode == 255, running.describe()
    finally:
        assert revoked_known_hosts.read_text() == before


def test_revoked_key_is_reported_as_revoked(sshd: SshdServer, revoked_known_hosts: Path) -> None:
    result = run_against(sshd, revoked_known_hosts)
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    assert "revoked" in line.lower()
    assert "accept-new" not in line


def test_known_key_of_another_type_gives_a_host_key_message(
    sshd: SshdServer, tmp_path: Path
) -> None:
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    path = tmp_path / "known_hosts_rsa"
    path.write_text(f"{host_pattern(sshd)} {rsa.export_public_key().decode().strip()}\n")
    result = run_against(sshd, path)
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    assert host_pattern(sshd) in line
    assert "host key" in line.lower()
