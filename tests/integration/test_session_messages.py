"""What the SSH side says when something goes wrong, and what it reports when all goes
well: each message says one thing once and names what to check (issue 19)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from fixtures.in_process import sshd_config
from fixtures.pytunnel_proc import run_pytunnel, server_args
from fixtures.sshd import SshdServer

from tunnel import events, fastpath
from tunnel.session import Session


def error_line(stderr_lines: list[str]) -> str:
    [line] = [ln for ln in stderr_lines if ln.startswith("pytunnel: ")]
    return line


def test_a_missing_identity_file_is_named_once(sshd: SshdServer) -> None:
    # Only the missing file: authentication fails, and the failure must not list it as
    # tried after it was reported as not there.
    args = server_args(sshd, key="/nonexistent/key")
    result = run_pytunnel(["-D", "127.0.0.1:0", "-o", "BatchMode=yes", *args])
    assert result.returncode == 255, result.describe()
    assert "identity file /nonexistent/key not accessible" in result.stderr
    assert result.stderr.count("/nonexistent/key") == 1, result.describe()


def test_wrong_user_is_one_sentence(sshd: SshdServer) -> None:
    args = server_args(sshd, user="nosuchuser")
    result = run_pytunnel(["-D", "127.0.0.1:0", "-o", "BatchMode=yes", *args])
    assert result.returncode == 255, result.describe()
    line = error_line(result.stderr_lines)
    assert len(re.findall("permission denied", line, re.IGNORECASE)) == 1, line
    assert "for user nosuchuser" in line
    assert f"tried key {sshd.client_key}" in line
    assert "no password was asked for" in line
    assert line.count("(") <= 2, line  # no parenthesis inside a parenthesis inside one


def test_an_unreachable_jump_host_points_at_the_jump_not_at_p(
    sshd: SshdServer, closed_port: int
) -> None:
    result = run_pytunnel(
        ["-D", "127.0.0.1:0", "-J", f"{sshd.user}@127.0.0.1:{closed_port}", *server_args(sshd)]
    )
    assert result.returncode == 255, result.describe()
    line = error_line(result.stderr_lines)
    assert f"jump host {sshd.user}@127.0.0.1:{closed_port}" in line
    assert "-J" in line
    assert "(-p)" not in line


async def test_session_up_names_the_key_exchange(
    sshd: SshdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    seen: list[events.Event] = []
    config = sshd_config(sshd, connect_timeout=30.0, algorithms={"kex": "curve25519-sha256"})
    session = Session(config, seen.append)
    try:
        await asyncio.wait_for(session.connect(), 60)
    finally:
        await session.close()
    [up] = [event for event in seen if isinstance(event, events.SessionUp)]
    # The fast path learns it; stock asyncssh (another version) does not say.
    assert up.kex == ("curve25519-sha256" if fastpath.supported() else "")


STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d \S")


def test_verbose_lines_have_one_format_and_say_where_they_connect(
    sshd: SshdServer, tmp_path: Path
) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host tun\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile {sshd.known_hosts}\n"
        "  StrictHostKeyChecking yes\n"
    )
    result = run_pytunnel(["-v", "-D", "127.0.0.1:0", "-F", str(config), "tun", "--", "true"])
    assert result.returncode == 0, result.describe()
    lines = result.stderr_lines
    assert lines
    assert [line for line in lines if not STAMPED.match(line)] == [], result.describe()
    # The port and user come from ssh_config: named, not "from ssh_config or 22".
    assert any(
        f"connecting to {sshd.host} port {sshd.port} as {sshd.user};" in line for line in lines
    ), result.describe()


def test_verbose_connecting_line_names_the_jump_host(sshd: SshdServer) -> None:
    jump = f"{sshd.user}@{sshd.host}:{sshd.port}"
    result = run_pytunnel(["-v", "-D", "127.0.0.1:0", "-J", jump, *server_args(sshd), "--", "true"])
    assert result.returncode == 0, result.describe()
    assert any(
        f"connecting to {sshd.host} port {sshd.port} through jump host {jump} as" in line
        for line in result.stderr_lines
    ), result.describe()
