"""Host-key trust and authentication against the real sshd, through the console script.

Failures must be one clear ``pytunnel:`` line on stderr (never a traceback) and exit 255,
before any listener is announced as ready.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from fixtures.keys import generate_ed25519
from fixtures.pytunnel_proc import (
    Finished,
    PytunnelFactory,
    PytunnelStartError,
    error_lines,
    recv_all,
    run_pytunnel,
    server_args,
    socks5_open,
)
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget

pytestmark = pytest.mark.timeout(60)


def fingerprint(public_line: str) -> str:
    return str(asyncssh.import_public_key(public_line).get_fingerprint("sha256"))


def other_host_key_line() -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def host_pattern(sshd: SshdServer) -> str:
    return f"[127.0.0.1]:{sshd.port}"


def run_against(
    sshd: SshdServer,
    known_hosts: Path,
    *extra: str,
    strict: str = "yes",
    command: Sequence[str] = (),
) -> Finished:
    args = server_args(sshd, known_hosts=known_hosts, strict=strict)
    return run_pytunnel(["--json", "-D", "127.0.0.1:0", *extra, *args, *command])


TRUE = ("--", "true")


def touch(mark: Path) -> tuple[str, ...]:
    """A command that leaves a mark if the tunnel came up and ran it."""
    return ("--", "touch", str(mark))


def as_host(args: list[str], host: str) -> list[str]:
    """server_args that reach the same sshd under another name (the last argument)."""
    login, _, _ = args[-1].rpartition("@")
    return [*args[:-1], f"{login}@{host}"]


def hashed(path: Path) -> Path:
    """Hash the names of a known_hosts file in place, with ssh-keygen (not our code)."""
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen not installed")
    subprocess.run(
        [keygen, "-q", "-H", "-f", str(path)], check=True, capture_output=True, timeout=30
    )
    assert path.read_text().startswith("|1|")
    return path


def assert_refused(result: Finished, *words: str) -> str:
    assert result.returncode == 255, result.describe()
    [line] = error_lines(result)
    for word in words:
        assert word.lower() in line.lower(), result.describe()
    return line


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


# -- StrictHostKeyChecking=no never accepts a changed or revoked key --------------------------

ALL_POLICIES = ["yes", "ask", "accept-new", "no", "off"]


@pytest.mark.parametrize("strict", ALL_POLICIES)
def test_changed_key_is_refused_whatever_the_policy(
    sshd: SshdServer, changed_known_hosts: Path, tmp_path: Path, strict: str
) -> None:
    # The command would leave a mark if the tunnel came up (ssh -o
    # StrictHostKeyChecking=no goes on with forwarding disabled; a tunnel has no use then).
    mark = tmp_path / "command-ran"
    before = changed_known_hosts.read_text()
    result = run_against(sshd, changed_known_hosts, strict=strict, command=touch(mark))
    line = assert_refused(result, "changed", host_pattern(sshd), fingerprint(sshd.host_key_pub))
    assert line.startswith(f"pytunnel: HOST KEY CHANGED for {host_pattern(sshd)}: ")
    assert not mark.exists()
    assert changed_known_hosts.read_text() == before


@pytest.mark.parametrize("strict", ALL_POLICIES)
def test_revoked_key_is_refused_whatever_the_policy(
    sshd: SshdServer, revoked_known_hosts: Path, tmp_path: Path, strict: str
) -> None:
    mark = tmp_path / "command-ran"
    before = revoked_known_hosts.read_text()
    result = run_against(sshd, revoked_known_hosts, strict=strict, command=touch(mark))
    assert_refused(result, "revoked")
    assert not mark.exists()
    assert revoked_known_hosts.read_text() == before


@pytest.mark.parametrize("strict", ["no", "off"])
def test_strict_no_records_an_unknown_key_as_ssh_does(
    sshd: SshdServer,
    empty_known_hosts: Path,
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
    strict: str,
) -> None:
    args = server_args(sshd, known_hosts=empty_known_hosts, strict=strict)
    running = pytunnel_factory(["-D", "127.0.0.1:0", *args])
    assert_relays(running.address, echo_target)
    lines = empty_known_hosts.read_text().splitlines()
    assert [line.split()[:3] for line in lines] == [
        [host_pattern(sshd), *sshd.host_key_pub.split()]
    ]
    # What "no" wrote is what strict checking trusts next time.
    again = run_against(sshd, empty_known_hosts, command=TRUE)
    assert again.returncode == 0, again.describe()


def test_strict_no_with_dev_null_known_hosts_connects_every_time(
    sshd: SshdServer, tmp_path: Path
) -> None:
    # The CI idiom: -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no.
    mark = tmp_path / "command-ran"
    for _ in range(2):
        result = run_against(sshd, Path("/dev/null"), strict="no", command=touch(mark))
        assert result.returncode == 0, result.describe()
        # As ssh: a note that the key was "added" (to /dev/null), nothing else.
        [note] = error_lines(result)
        assert "Permanently added" in note, result.describe()
        assert "failed" not in result.stderr.lower(), result.describe()
        assert mark.exists()
        mark.unlink()


# -- [host]:port and host are different hosts; addresses are not looked up --------------------


@pytest.fixture
def port_22_entry_other_key(tmp_path: Path, sshd: SshdServer) -> Path:
    """An entry for the sshd's host on port 22 (it listens elsewhere), with another key."""
    path = tmp_path / "known_hosts_port22"
    path.write_text(f"{sshd.host} {other_host_key_line()}\n")
    return path


@pytest.mark.parametrize("form", ["plain", "hashed"])
def test_port_22_entry_does_not_make_another_port_changed(
    sshd: SshdServer, port_22_entry_other_key: Path, form: str
) -> None:
    path = hashed(port_22_entry_other_key) if form == "hashed" else port_22_entry_other_key
    before = path.read_text()
    result = run_against(sshd, path)
    line = assert_refused(result, "not known", host_pattern(sshd), fingerprint(sshd.host_key_pub))
    assert "HOST KEY CHANGED" not in line
    assert path.read_text() == before


@pytest.mark.parametrize("form", ["plain", "hashed"])
def test_accept_new_adds_the_port_form_beside_a_port_22_entry(
    sshd: SshdServer, port_22_entry_other_key: Path, echo_target: EchoTarget,
    pytunnel_factory: PytunnelFactory, form: str,
) -> None:  # fmt: skip
    path = hashed(port_22_entry_other_key) if form == "hashed" else port_22_entry_other_key
    before = path.read_text().splitlines()
    args = server_args(sshd, known_hosts=path, strict="accept-new")
    running = pytunnel_factory(["-D", "127.0.0.1:0", *args])
    assert_relays(running.address, echo_target)
    lines = path.read_text().splitlines()
    assert lines[:-1] == before
    assert lines[-1].split()[1:3] == sshd.host_key_pub.split()
    if form == "plain":
        assert lines[-1].split()[0] == host_pattern(sshd)
    else:  # a hashed file gets hashed names
        assert lines[-1].startswith("|1|")
    again = run_against(sshd, path, command=TRUE)
    assert again.returncode == 0, again.describe()


@pytest.mark.parametrize("form", ["plain", "hashed"])
def test_port_22_entry_with_the_same_key_is_trusted_on_another_port(
    sshd: SshdServer, tmp_path: Path, form: str
) -> None:
    # ssh's "checking without port identifier": the bare host's key, when it is the
    # server's, is trusted on any port.
    path = tmp_path / "known_hosts_bare"
    path.write_text(f"{sshd.host} {sshd.host_key_pub}\n")
    if form == "hashed":
        hashed(path)
    result = run_against(sshd, path, command=TRUE)
    assert result.returncode == 0, result.describe()


def test_entry_for_another_port_says_nothing(sshd: SshdServer, tmp_path: Path) -> None:
    path = tmp_path / "known_hosts_other_port"
    other_port = sshd.port + 1 if sshd.port < 65535 else sshd.port - 1
    path.write_text(
        f"[{sshd.host}]:{other_port} {other_host_key_line()}\n"
        f"[{sshd.host}]:{other_port} {sshd.host_key_pub}\n"
    )
    result = run_against(sshd, path)
    line = assert_refused(result, "not known", host_pattern(sshd))
    assert "HOST KEY CHANGED" not in line


@pytest.mark.parametrize("form", ["plain", "hashed"])
def test_address_entry_does_not_vouch_for_a_host_name(
    sshd: SshdServer, tmp_path: Path, form: str
) -> None:
    # ssh looks a host up by the name it was given (CheckHostIP is off by default): a line
    # for the address localhost reached is not a line for localhost.
    assert sshd.host == "127.0.0.1"
    path = tmp_path / "known_hosts_address"
    path.write_text(f"{host_pattern(sshd)} {sshd.host_key_pub}\n")
    if form == "hashed":
        hashed(path)
    args = as_host(server_args(sshd, known_hosts=path), "localhost")
    result = run_pytunnel(["--json", "-D", "127.0.0.1:0", *args, *TRUE])
    assert_refused(result, "not known", f"[localhost]:{sshd.port}")


def test_address_entry_with_another_key_is_not_a_changed_key(
    sshd: SshdServer, changed_known_hosts: Path
) -> None:
    args = as_host(server_args(sshd, known_hosts=changed_known_hosts), "localhost")
    result = run_pytunnel(["--json", "-D", "127.0.0.1:0", *args, *TRUE])
    line = assert_refused(result, "not known", f"[localhost]:{sshd.port}")
    assert "HOST KEY CHANGED" not in line


# -- appending to known_hosts ------------------------------------------------------------


def test_append_to_a_file_without_a_final_newline_keeps_both_entries(
    sshd: SshdServer, tmp_path: Path
) -> None:
    path = tmp_path / "known_hosts_unterminated"
    path.write_text(f"[localhost]:{sshd.port} {sshd.host_key_pub}")  # no newline at the end
    added = run_against(sshd, path, strict="accept-new", command=TRUE)
    assert added.returncode == 0, added.describe()
    lines = path.read_text().splitlines()
    assert [line.split()[0] for line in lines] == [f"[localhost]:{sshd.port}", host_pattern(sshd)]
    # Both lines still verify, strictly: the old one (as localhost) and the new one.
    by_address = run_against(sshd, path, command=TRUE)
    assert by_address.returncode == 0, by_address.describe()
    args = as_host(server_args(sshd, known_hosts=path), "localhost")
    by_name = run_pytunnel(["-D", "127.0.0.1:0", *args, *TRUE])
    assert by_name.returncode == 0, by_name.describe()
    assert len(path.read_text().splitlines()) == 2


# -- HostKeyAlias (ssh_config): the alias alone names the key, on any port ----------------------

ALIAS = "tunnel-alias.test"


def run_with_alias(sshd: SshdServer, tmp_path: Path, known_hosts: Path, strict: str) -> Finished:
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host viaalias\n"
        f"    HostName {sshd.host}\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile {sshd.client_key}\n"
        f"    HostKeyAlias {ALIAS}\n"
        f"    UserKnownHostsFile {known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        f"    StrictHostKeyChecking {strict}\n"
        "    ConnectTimeout 10\n"
    )
    return run_pytunnel(["--json", "-F", str(config), "-D", "127.0.0.1:0", "viaalias", *TRUE])


@pytest.mark.parametrize("strict", ALL_POLICIES)
def test_alias_entry_with_another_key_is_a_changed_key(
    sshd: SshdServer, tmp_path: Path, strict: str
) -> None:
    path = tmp_path / "known_hosts_alias"
    path.write_text(f"{ALIAS} {other_host_key_line()}\n")
    before = path.read_text()
    result = run_with_alias(sshd, tmp_path, path, strict)
    line = assert_refused(result, fingerprint(sshd.host_key_pub))
    assert line.startswith(f"pytunnel: HOST KEY CHANGED for {ALIAS}: ")
    assert path.read_text() == before


def test_alias_entry_is_trusted_on_any_port(sshd: SshdServer, tmp_path: Path) -> None:
    path = tmp_path / "known_hosts_alias"
    path.write_text(f"{ALIAS} {sshd.host_key_pub}\n")
    result = run_with_alias(sshd, tmp_path, path, "yes")
    assert result.returncode == 0, result.describe()


def test_accept_new_records_the_alias_without_a_port(sshd: SshdServer, tmp_path: Path) -> None:
    path = tmp_path / "known_hosts_alias"
    path.write_text("")
    added = run_with_alias(sshd, tmp_path, path, "accept-new")
    assert added.returncode == 0, added.describe()
    assert [line.split()[:3] for line in path.read_text().splitlines()] == [
        [ALIAS, *sshd.host_key_pub.split()]
    ]


# -- OpenSSH as the oracle: the same known_hosts, the same verdict, the same file after ----------


@dataclass(frozen=True)
class Case:
    id: str
    known_hosts: str  # {host} {port} {key} {other} {rsa} are filled in
    policies: tuple[str, ...]
    connect_as: str = "127.0.0.1"


CASES = [
    Case("empty", "", ("yes", "ask", "accept-new", "no")),
    Case("bare host, another key", "{host} {other}\n", ("yes", "accept-new", "no")),
    Case("bare host, this key", "{host} {key}\n", ("yes",)),
    Case("this port, another key", "[{host}]:{port} {other}\n", ("yes", "ask", "accept-new")),
    Case("another port, this key", "[{host}]:{next_port} {key}\n", ("yes", "accept-new")),
    Case("another key type", "[{host}]:{port} {rsa}\n", ("yes", "ask", "accept-new")),
    Case("bare host, another key type", "{host} {rsa}\n", ("yes", "accept-new")),
    Case("another type, bare host this key", "[{host}]:{port} {rsa}\n{host} {key}\n", ("yes",)),
    Case("revoked for all", "[{host}]:{port} {key}\n@revoked * {key}\n", ("yes", "accept-new")),
    Case("revoked for the bare host", "@revoked {host} {key}\n", ("yes",)),
    Case("pattern list", "nowhere.invalid,[{host}]:{port} {key}\n", ("yes",)),
    Case("negated pattern", "[{host}]:*,![{host}]:{port} {key}\n", ("yes", "accept-new")),
    Case("address only", "[127.0.0.1]:{port} {key}\n", ("yes", "accept-new"), "localhost"),
    Case("address, another key", "[127.0.0.1]:{port} {other}\n", ("accept-new",), "localhost"),
]


def oracle_cases() -> list[pytest.param]:  # type: ignore[valid-type]
    return [
        pytest.param(case, strict, id=f"{case.id}-{strict}")
        for case in CASES
        for strict in case.policies
    ]


def run_ssh(sshd: SshdServer, known_hosts: Path, strict: str, host: str) -> int:
    ssh = shutil.which("ssh")
    if ssh is None:
        pytest.skip("OpenSSH client not installed")
    cmd = [
        ssh, "-F", "/dev/null", "-i", sshd.client_key, "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"StrictHostKeyChecking={strict}", "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=10", "-p", str(sshd.port), f"{sshd.user}@{host}", "true",
    ]  # fmt: skip
    return subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False
    ).returncode


@pytest.mark.parametrize(("case", "strict"), oracle_cases())
def test_same_verdict_and_file_as_openssh(
    sshd: SshdServer, tmp_path: Path, case: Case, strict: str
) -> None:
    text = case.known_hosts.format(
        host=sshd.host,
        port=sshd.port,
        next_port=sshd.port + 1,
        key=sshd.host_key_pub,
        other=other_host_key_line(),
        rsa=asyncssh.generate_private_key("ssh-rsa", key_size=2048).export_public_key().decode(),
    )
    for_ssh = tmp_path / "for_ssh"
    for_us = tmp_path / "for_pytunnel"
    for_ssh.write_text(text)
    for_us.write_text(text)
    ssh_status = run_ssh(sshd, for_ssh, strict, case.connect_as)
    args = as_host(server_args(sshd, known_hosts=for_us, strict=strict), case.connect_as)
    ours = run_pytunnel(["-o", "BatchMode=yes", "-D", "127.0.0.1:0", *args, *TRUE])
    assert ssh_status in (0, 255)
    assert ours.returncode == ssh_status, ours.describe()
    assert for_us.read_text() == for_ssh.read_text()


def test_strict_no_with_a_changed_key_is_where_pytunnel_is_stricter(
    sshd: SshdServer, changed_known_hosts: Path, tmp_path: Path
) -> None:
    # ssh -o StrictHostKeyChecking=no logs in despite the changed key (it only turns off
    # forwarding and password logins); pytunnel refuses outright.
    copy = tmp_path / "for_ssh"
    copy.write_text(changed_known_hosts.read_text())
    assert run_ssh(sshd, copy, "no", sshd.host) == 0
    result = run_against(sshd, changed_known_hosts, strict="no", command=TRUE)
    assert_refused(result, "HOST KEY CHANGED")


@pytest.mark.parametrize("strict", ["accept-new", "no"])
def test_key_revoked_for_the_bare_host_is_where_pytunnel_is_stricter(
    sshd: SshdServer, tmp_path: Path, strict: str
) -> None:
    # ssh only looks at @revoked lines for the name it checks, [host]:port; pytunnel also
    # honours the bare host's, so a key withdrawn for "host" is not accepted on a port.
    text = f"@revoked {sshd.host} {sshd.host_key_pub}\n"
    for_ssh = tmp_path / "for_ssh"
    for_ssh.write_text(text)
    assert run_ssh(sshd, for_ssh, strict, sshd.host) == 0
    for_us = tmp_path / "for_pytunnel"
    for_us.write_text(text)
    assert_refused(run_against(sshd, for_us, strict=strict, command=TRUE), "revoked")
    assert for_us.read_text() == text


def test_unterminated_last_line_gets_the_line_ssh_would_add(
    sshd: SshdServer, tmp_path: Path
) -> None:
    # The same new line as ssh's, on a line of its own: OpenSSH 9.2 writes it right after
    # an unterminated last line, gluing both entries into one that matches nothing.
    text = f"[localhost]:{sshd.port} {sshd.host_key_pub}"
    for_ssh = tmp_path / "for_ssh"
    for_ssh.write_text(text)
    run_ssh(sshd, for_ssh, "accept-new", sshd.host)
    for_us = tmp_path / "for_pytunnel"
    for_us.write_text(text)
    assert run_against(sshd, for_us, strict="accept-new", command=TRUE).returncode == 0
    assert for_us.read_text().splitlines()[0] == text
    assert for_us.read_text() == f"{text}\n{for_ssh.read_text()[len(text) :].lstrip()}"
