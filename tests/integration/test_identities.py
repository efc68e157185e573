"""Identity files as ssh treats them: -i and ssh_config's IdentityFile are both offered,
a missing one is reported and skipped; and a --pidfile that cannot be written is a usage
error before anything starts."""

from __future__ import annotations

from pathlib import Path

from fixtures.keys import generate_ed25519
from fixtures.pytunnel_proc import run_pytunnel, server_args
from fixtures.sshd import SshdServer


def _without(args: list[str], option: str) -> list[str]:
    """``server_args`` minus one option and its value (to put our own in its place)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        else:
            out.append(arg)
    return out


def test_missing_identity_is_reported_and_the_others_still_used(sshd: SshdServer) -> None:
    args = ["-i", "/nonexistent/key", *server_args(sshd)]
    result = run_pytunnel(["-D", "127.0.0.1:0", "--json", *args, "--", "true"])
    assert result.returncode == 0, result.describe()
    assert "identity file /nonexistent/key not accessible" in result.stderr
    assert "Traceback" not in result.stderr


def test_dash_i_adds_to_the_config_identity_files(sshd: SshdServer, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_key"
    generate_ed25519(wrong, "not authorized")
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host tun\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n"
        f"  UserKnownHostsFile {sshd.known_hosts}\n  StrictHostKeyChecking yes\n"
    )
    # As ssh: the wrong -i key is tried, and the config's right one after it.
    result = run_pytunnel(
        ["-D", "127.0.0.1:0", "-F", str(config), "-i", str(wrong), "tun", "--", "true"]
    )
    assert result.returncode == 0, result.describe()


def test_unwritable_pidfile_is_a_usage_error_before_connecting(sshd: SshdServer) -> None:
    mark = sshd.log_mark()
    args = ["-D", "127.0.0.1:0", "--pidfile", "/nonexistent/dir/p", *server_args(sshd)]
    result = run_pytunnel(args)
    assert result.returncode == 2, result.describe()
    [line] = result.stderr.strip().splitlines()
    assert "--pidfile" in line
    assert "Accepted publickey" not in sshd.log_text(since=mark)


def test_wrong_identity_alone_names_the_file_it_tried(sshd: SshdServer, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_key"
    generate_ed25519(wrong, "not authorized")
    args = _without(server_args(sshd), "-i")
    result = run_pytunnel(["-D", "127.0.0.1:0", "-i", str(wrong), *args])
    assert result.returncode == 255, result.describe()
    assert str(wrong) in result.stderr
