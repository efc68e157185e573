"""The ssh-compatible command line: every option, every ``-o`` key, precedence, usage
errors as one line with exit status 2, and every exit status of the real console script.

Most tests drive click's :class:`CliRunner` with ``app.run`` replaced by a recorder, so
the whole option layer runs but nothing connects; ``main()`` is checked under
``pytest.raises(SystemExit)`` for the one-line error contract.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fixtures.pytunnel_proc import PytunnelFactory, error_lines, run_pytunnel, server_args
from fixtures.sshd import SshdServer

from tunnel import __version__, cli
from tunnel.config import (
    OPTION_KEYS,
    AddressFamily,
    Config,
    Destination,
    Forward,
    HostKeyPolicy,
)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Recorded:
    """What ``app.run`` was called with."""

    calls: list[tuple[Config, list[str]]]

    @property
    def config(self) -> Config:
        assert len(self.calls) == 1, self.calls
        return self.calls[0][0]


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """``command`` reconfigures the root logger; give pytest its handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("tunnel", "asyncssh")}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, saved in levels.items():
            logging.getLogger(name).setLevel(saved)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    record = Recorded([])

    def fake_run(config: Config, emit: Any, command: Any = (), *rest: Any) -> int:
        record.calls.append((config, list(command)))
        return 0

    monkeypatch.setattr("tunnel.app.run", fake_run)
    return record


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.command, list(args), prog_name="pytunnel")


def accepted(recorded: Recorded, *args: str) -> Config:
    result = invoke(*args)
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return recorded.config


UsageError = Callable[..., str]


@pytest.fixture
def usage_error(capsys: pytest.CaptureFixture[str]) -> UsageError:
    """``usage_error(*args)`` runs ``main(args)`` and asserts exit status 2 with exactly
    one ``pytunnel:`` line on stderr, nothing on stdout and no traceback; returns the line."""

    def run(*args: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as caught:
            cli.main(list(args))
        out, err = capsys.readouterr()
        assert caught.value.code == 2, (args, out, err)
        assert "Traceback" not in out + err
        lines = err.splitlines()
        assert len(lines) == 1, f"not one line for {args}: {err!r}"
        assert lines[0].startswith("pytunnel: "), lines
        assert out == ""
        return lines[0]

    return run


# == -D =====================================================================================


@pytest.mark.parametrize(
    ("spec", "forward"),
    [
        ("1080", Forward(None, 1080)),
        ("0", Forward(None, 0)),
        ("localhost:1080", Forward("localhost", 1080)),
        ("127.0.0.1:0", Forward("127.0.0.1", 0)),
        ("*:1080", Forward("", 1080)),
        (":1080", Forward("", 1080)),
        ("[::1]:1080", Forward("::1", 1080)),
        ("host/1080", Forward("host", 1080)),
    ],
)
def test_dynamic_forward_forms(recorded: Recorded, spec: str, forward: Forward) -> None:
    assert accepted(recorded, "-D", spec, "host").forwards == (forward,)


def test_dynamic_forwards_accumulate_without_repeats(recorded: Recorded) -> None:
    config = accepted(
        recorded,
        "-D", "1080", "-D", "127.0.0.1:2000", "-D", "1080",
        "-o", "DynamicForward=3000", "-o", "DynamicForward 127.0.0.1:2000",
        "host",
    )  # fmt: skip
    assert config.forwards == (Forward(None, 1080), Forward("127.0.0.1", 2000), Forward(None, 3000))


def test_dynamic_forward_from_o_alone_is_enough(recorded: Recorded) -> None:
    assert accepted(recorded, "-o", "DynamicForward=1080", "host").forwards == (
        Forward(None, 1080),
    )


@pytest.mark.parametrize("spec", ["x", "65536", "1080x", "::1:1080", "[::1:1080", "bad host:1"])
def test_bad_dynamic_forward(spec: str, usage_error: UsageError) -> None:
    line = usage_error("-D", spec, "host")
    assert "-D" in line


def test_nothing_to_forward(usage_error: UsageError) -> None:
    line = usage_error("-F", "none", "host")
    assert "nothing to forward" in line
    assert "-D" in line


# == destination, -p, -l ===================================================================


def test_a_later_bad_value_of_a_key_is_still_an_error(usage_error: UsageError) -> None:
    # ssh checks every -o it is given, even when an earlier one already set the key.
    line = usage_error("-D", "1080", "-o", "Port=22", "-o", "Port=x", "host")
    assert "Port" in line


@pytest.mark.parametrize(
    ("args", "destination"),
    [
        (["host"], Destination("host")),
        (["bob@host"], Destination("host", "bob")),
        (["bob@host:2222"], Destination("host", "bob", 2222)),
        (["ssh://bob@host:2222"], Destination("host", "bob", 2222)),
        (["ssh://host"], Destination("host")),
        (["bob@[::1]:2222"], Destination("::1", "bob", 2222)),
        (["-p", "2200", "host"], Destination("host", None, 2200)),
        (["-l", "al", "host"], Destination("host", "al")),
        # As ssh: -l and -o User beat user@, -p and -o Port beat :port; flags beat -o.
        (["-l", "al", "bob@host"], Destination("host", "al")),
        (["-p", "2200", "ssh://bob@host:2222"], Destination("host", "bob", 2200)),
        (["-o", "User=zed", "bob@host"], Destination("host", "zed")),
        (["-o", "Port=2022", "bob@host:2222"], Destination("host", "bob", 2022)),
        (["-o", "User=zed", "-l", "al", "host"], Destination("host", "al")),
        (["-o", "User=zed", "host"], Destination("host", "zed")),
        (["-o", "Port=2022", "-p", "2200", "host"], Destination("host", None, 2200)),
        (["-o", "Port=2022", "host"], Destination("host", None, 2022)),
        (["-o", "HostName=127.0.0.2", "alias"], Destination("127.0.0.2")),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_destination_precedence(
    recorded: Recorded, args: list[str], destination: Destination
) -> None:
    assert accepted(recorded, "-D", "1080", *args).destination == destination


@pytest.mark.parametrize(
    "args",
    [
        ["-p", "0", "host"],
        ["-p", "65536", "host"],
        ["-p", "ssh", "host"],
        ["host:99999"],
        ["@host"],
        ["ftp://host"],
        ["bad host"],
    ],
)
def test_bad_destination_or_port(args: list[str], usage_error: UsageError) -> None:
    usage_error("-D", "1080", *args)


# == -i, -J, -F ===========================================================================


def test_identities_accumulate_in_order(recorded: Recorded) -> None:
    config = accepted(
        recorded,
        "-D", "1080", "-i", "/keys/a", "-o", "IdentityFile=/keys/c", "-i", "/keys/b",
        "-o", "IdentityFile /keys/d", "host",
    )  # fmt: skip
    assert config.identities == ("/keys/a", "/keys/b", "/keys/c", "/keys/d")


def test_jump_hosts(recorded: Recorded) -> None:
    config = accepted(recorded, "-D", "1080", "-J", "a,b@c:2222", "host")
    assert config.jump_hosts == (Destination("a"), Destination("c", "b", 2222))


def test_jump_flag_beats_proxyjump_option(recorded: Recorded) -> None:
    config = accepted(recorded, "-D", "1080", "-o", "ProxyJump=x", "-J", "y", "host")
    assert config.jump_hosts == (Destination("y"),)


def test_proxyjump_none(recorded: Recorded) -> None:
    assert accepted(recorded, "-D", "1080", "-J", "none", "host").jump_hosts == ()


@pytest.mark.parametrize(
    ("options", "jumps", "command"),
    [
        (["ProxyJump=j1", "ProxyCommand=nc %h %p"], (Destination("j1"),), None),
        (["ProxyCommand=nc %h %p", "ProxyJump=j1"], None, "nc %h %p"),
        (["ProxyJump=none", "ProxyCommand=nc %h %p"], (), None),
        (["ProxyCommand=none", "ProxyJump=j1"], None, "none"),
    ],
    ids=["jump-first", "command-first", "jump-none-first", "command-none-first"],
)
def test_proxyjump_and_proxycommand_first_given_wins(
    recorded: Recorded, options: list[str], jumps: object, command: object
) -> None:
    args = [arg for option in options for arg in ("-o", option)]
    config = accepted(recorded, "-D", "1080", *args, "host")
    assert (config.jump_hosts, config.proxy_command) == (jumps, command)


def test_jump_flag_beats_proxycommand_option(recorded: Recorded) -> None:
    config = accepted(recorded, "-D", "1080", "-o", "ProxyCommand=nc %h %p", "-J", "y", "host")
    assert (config.jump_hosts, config.proxy_command) == ((Destination("y"),), None)


def test_no_route_given_leaves_it_to_ssh_config(recorded: Recorded) -> None:
    config = accepted(recorded, "-D", "1080", "host")
    assert (config.jump_hosts, config.proxy_command) == (None, None)


@pytest.mark.parametrize("value", ["nc %h %p %", "nc %u %p", "nc %C", "nc %%% %p"])
def test_bad_proxycommand_token_is_one_line(usage_error: UsageError, value: str) -> None:
    line = usage_error("-D", "1080", "-o", f"ProxyCommand={value}", "host")
    assert "ProxyCommand" in line
    assert "token" in line or "lone %" in line


def test_a_later_bad_proxycommand_is_still_refused(usage_error: UsageError) -> None:
    usage_error("-D", "1080", "-o", "ProxyJump=j1", "-o", "ProxyCommand=nc %x", "host")


def test_bad_jump_host(usage_error: UsageError) -> None:
    usage_error("-D", "1080", "-J", "a,,b", "host")


@pytest.mark.parametrize(
    ("args", "ssh_config"),
    [([], None), (["-F", "none"], ()), (["-F", "/etc/cfg"], ("/etc/cfg",))],
    ids=["default", "none", "path"],
)
def test_config_file(
    recorded: Recorded, args: list[str], ssh_config: tuple[str, ...] | None
) -> None:
    assert accepted(recorded, "-D", "1080", *args, "host").ssh_config == ssh_config


# == flags ================================================================================


def test_ssh_compatible_flags_are_accepted(recorded: Recorded) -> None:
    config = accepted(recorded, "-N", "-T", "-q", "-C", "-g", "-v", "-D", "1080", "host")
    assert config.compression is True
    assert config.gateway_ports is True


@pytest.mark.parametrize(
    ("flag", "family"), [("-4", AddressFamily.INET), ("-6", AddressFamily.INET6)]
)
def test_address_family_flags(recorded: Recorded, flag: str, family: AddressFamily) -> None:
    config = accepted(recorded, flag, "-o", "AddressFamily=any", "-D", "1080", "host")
    assert config.address_family is family


def test_four_and_six_together(usage_error: UsageError) -> None:
    line = usage_error("-4", "-6", "-D", "1080", "host")
    assert "-4" in line
    assert "-6" in line


def test_background_with_a_command(usage_error: UsageError) -> None:
    line = usage_error("-f", "-D", "1080", "host", "--", "true")
    assert "-f" in line


def test_command_after_double_dash_is_not_parsed(recorded: Recorded) -> None:
    accepted(recorded, "-D", "1080", "host", "--", "curl", "-o", "Foo=bar", "-D", "x")
    assert recorded.calls[0][1] == ["curl", "-o", "Foo=bar", "-D", "x"]


def test_version() -> None:
    for flag in ("-V", "--version"):
        result = invoke(flag)
        assert result.exit_code == 0
        assert result.stdout.strip() == f"pytunnel, version {__version__}"


def test_help_lists_every_option() -> None:
    result = invoke("-h")
    assert result.exit_code == 0
    for option in ("-D", "-p", "-l", "-i", "-J", "-F", "-o", "-4", "-6", "-C", "-g", "-N",
                   "-T", "-f", "-q", "-v", "-E", "-V", "--json", "--demo"):  # fmt: skip
        assert re.search(rf"^\s+(-\w, )?{option}[ ,]", result.stdout, re.M), option
    assert "Exit status" in result.stdout


def test_main_help_and_version_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("-h", "-V"):
        with pytest.raises(SystemExit) as caught:
            cli.main([flag])
        assert caught.value.code == 0
    assert "Usage: pytunnel" in capsys.readouterr().out


# == -o ===================================================================================


Getter = Callable[[Config], object]

# key -> (a valid value, what it sets, the expected setting)
VALID: dict[str, tuple[str, Getter, object]] = {
    "StrictHostKeyChecking": (
        "accept-new", lambda c: c.host_key_policy, HostKeyPolicy.ACCEPT_NEW
    ),
    "UserKnownHostsFile": ("/kh/one /kh/two", lambda c: c.known_hosts, ("/kh/one", "/kh/two")),
    "GlobalKnownHostsFile": ("/kh/global", lambda c: c.global_known_hosts, ("/kh/global",)),
    "ConnectTimeout": ("2.5", lambda c: c.connect_timeout, 2.5),
    "Port": ("2222", lambda c: c.destination.port, 2222),
    "User": ("carol", lambda c: c.destination.user, "carol"),
    "IdentityFile": ("/keys/id", lambda c: c.identities, ("/keys/id",)),
    "DynamicForward": (
        "127.0.0.1:2000", lambda c: c.forwards, (Forward(None, 1080), Forward("127.0.0.1", 2000))
    ),
    "RemoteForward": ("[::1]:0", lambda c: c.reverse_forwards, (Forward("::1", 0),)),
    "ServerAliveInterval": ("0", lambda c: c.keepalive_interval, 0.0),
    "ServerAliveCountMax": ("5", lambda c: c.keepalive_count, 5),
    "HostName": ("127.0.0.2", lambda c: c.destination.host, "127.0.0.2"),
    "IdentitiesOnly": ("yes", lambda c: c.identities_only, True),
    "ProxyJump": (
        "j1,u@j2:2200", lambda c: c.jump_hosts, (Destination("j1"), Destination("j2", "u", 2200))
    ),
    "ProxyCommand": ("nc %h %p", lambda c: c.proxy_command, "nc %h %p"),
    "BatchMode": ("yes", lambda c: c.batch_mode, True),
    "PubkeyAuthentication": ("no", lambda c: dict(c.auth_methods), {"publickey": False}),
    "PasswordAuthentication": ("no", lambda c: dict(c.auth_methods), {"password": False}),
    "KbdInteractiveAuthentication": (
        "no", lambda c: dict(c.auth_methods), {"keyboard-interactive": False}
    ),
    "PreferredAuthentications": (
        "password,publickey", lambda c: c.preferred_auth, ("password", "publickey")
    ),
    "Compression": ("yes", lambda c: c.compression, True),
    "Ciphers": ("aes128-ctr,aes256-ctr", lambda c: dict(c.algorithms),
                {"ciphers": "aes128-ctr,aes256-ctr"}),
    "KexAlgorithms": ("+diffie-hellman-group14-sha256", lambda c: dict(c.algorithms),
                      {"kex": "+diffie-hellman-group14-sha256"}),
    "HostKeyAlgorithms": ("ssh-ed25519", lambda c: dict(c.algorithms),
                          {"host_key_algorithms": "ssh-ed25519"}),
    "MACs": ("-hmac-sha1", lambda c: dict(c.algorithms), {"macs": "-hmac-sha1"}),
    "AddressFamily": ("inet6", lambda c: c.address_family, AddressFamily.INET6),
    "GatewayPorts": ("yes", lambda c: c.gateway_ports, True),
    # Accepted for ssh compatibility; nothing in the Config changes.
    "ExitOnForwardFailure": ("no", lambda c: c.forwards, (Forward(None, 1080),)),
    "LogLevel": ("DEBUG2", lambda c: c.forwards, (Forward(None, 1080),)),
    "ControlPath": ("~/.ssh/%C", lambda c: c.control_path, "~/.ssh/%C"),
    "ControlMaster": ("AutoAsk", lambda c: c.control_master, "autoask"),
}  # fmt: skip

# Keys whose value is free text: only an empty value is bad.
_FREE_TEXT = ("UserKnownHostsFile", "GlobalKnownHostsFile", "User", "IdentityFile")


BAD: dict[str, str] = {
    "StrictHostKeyChecking": "maybe",
    "UserKnownHostsFile": "",
    "GlobalKnownHostsFile": "",
    "ConnectTimeout": "-1",
    "Port": "70000",
    "User": "",
    "IdentityFile": "",
    "DynamicForward": "127.0.0.1:x",
    "RemoteForward": "8080:localhost:80",
    "ServerAliveInterval": "often",
    "ServerAliveCountMax": "many",
    "HostName": "bad host!",
    "IdentitiesOnly": "maybe",
    "ProxyJump": "a,,b",
    "ProxyCommand": "nc %x %p",
    "BatchMode": "2",
    "PubkeyAuthentication": "maybe",
    "PasswordAuthentication": "maybe",
    "KbdInteractiveAuthentication": "maybe",
    "PreferredAuthentications": "telepathy",
    "Compression": "fast",
    "Ciphers": "aes 128",
    "KexAlgorithms": "+",
    "HostKeyAlgorithms": "a;b",
    "MACs": ",",
    "AddressFamily": "inet5",
    "GatewayPorts": "sometimes",
    "ExitOnForwardFailure": "maybe",
    "LogLevel": "LOUD",
    "ControlPath": "",
    "ControlMaster": "always",
}

# Where the error line for a bad value does not name the -o key the user wrote.

_BAD_PARAMS = [pytest.param(key, id=key) for key in BAD]


def test_tables_cover_every_option_key() -> None:
    names = {key.name for key in OPTION_KEYS.values()}
    assert set(VALID) == names
    assert set(BAD) == names
    assert set(OPTION_KEYS) == {name.lower() for name in names}


@pytest.mark.parametrize("key", list(VALID))
def test_every_key_accepts_a_valid_value(recorded: Recorded, key: str) -> None:
    value, getter, expected = VALID[key]
    config = accepted(recorded, "-D", "1080", "-o", f"{key}={value}", "host")
    assert getter(config) == expected


@pytest.mark.parametrize("key", list(VALID))
def test_every_key_is_case_insensitive_and_takes_a_space(recorded: Recorded, key: str) -> None:
    value, getter, expected = VALID[key]
    config = accepted(recorded, "-D", "1080", "-o", f"{key.upper()} {value}", "host")
    assert getter(config) == expected


@pytest.mark.parametrize("key", _BAD_PARAMS)
def test_every_key_rejects_a_bad_value(
    recorded: Recorded, key: str, usage_error: UsageError
) -> None:
    line = usage_error("-D", "1080", "-o", f"{key}={BAD[key]}", "host")
    assert key.lower() in line.lower(), line
    assert recorded.calls == []


@pytest.mark.parametrize("key", [k for k in BAD if k not in _FREE_TEXT])
def test_bad_value_through_click_runner(recorded: Recorded, key: str) -> None:
    result = invoke("-D", "1080", "-o", f"{key}={BAD[key]}", "host")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert recorded.calls == []


@pytest.mark.parametrize(
    "text", ["Port=2222", "Port 2222", "Port = 2222", " Port=2222 ", "port\t2222"]
)
def test_option_spellings(recorded: Recorded, text: str) -> None:
    assert accepted(recorded, "-D", "1080", "-o", text, "host").destination.port == 2222


@pytest.mark.parametrize("text", ["Port", "Port=", "=2222", "Port==2222x"])
def test_malformed_option(text: str, usage_error: UsageError) -> None:
    usage_error("-D", "1080", "-o", text, "host")


def test_unknown_key(usage_error: UsageError) -> None:
    line = usage_error("-D", "1080", "-o", "LocalForward=8080:localhost:80", "host")
    assert "LocalForward" in line
    assert "unsupported" in line


@pytest.mark.parametrize(
    ("first", "second", "getter", "expected"),
    [
        ("StrictHostKeyChecking=no", "StrictHostKeyChecking=yes",
         lambda c: c.host_key_policy, HostKeyPolicy.NO),
        ("Port=2022", "port=2023", lambda c: c.destination.port, 2022),
        ("User=first", "User=second", lambda c: c.destination.user, "first"),
        ("ConnectTimeout=3", "ConnectTimeout=4", lambda c: c.connect_timeout, 3.0),
        ("Ciphers=aes128-ctr", "Ciphers=aes256-ctr", lambda c: dict(c.algorithms),
         {"ciphers": "aes128-ctr"}),
        ("ProxyJump=j1", "ProxyJump=j2", lambda c: c.jump_hosts, (Destination("j1"),)),
        ("ProxyCommand=nc %h %p", "ProxyCommand=false", lambda c: c.proxy_command,
         "nc %h %p"),
        ("PubkeyAuthentication=no", "PubkeyAuthentication=yes", lambda c: dict(c.auth_methods),
         {"publickey": False}),
        ("UserKnownHostsFile=/a", "UserKnownHostsFile=/b", lambda c: c.known_hosts, ("/a",)),
    ],
    ids=lambda value: value if isinstance(value, str) and "=" in value else None,
)  # fmt: skip
def test_first_option_value_wins(
    recorded: Recorded, first: str, second: str, getter: Getter, expected: object
) -> None:
    config = accepted(recorded, "-D", "1080", "-o", first, "-o", second, "host")
    assert getter(config) == expected


# == usage errors are one line, never a traceback ==========================================


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-Z"],
        ["-D"],
        ["-D", "1080", "-p"],
        ["-D", "1080", "--max-connections", "0", "host"],
        ["-D", "1080", "--open-timeout", "soon", "host"],
        ["-D", "1080", "-o", "Foo=bar", "host"],
        ["-D", "1080", "--demo", "host"],
        ["-D", "1080", "-E", "/nonexistent-dir/pytunnel.log", "host"],
        ["-4", "-6", "-D", "1080", "host"],
        ["-f", "-D", "1080", "host", "--", "true"],
        ["-D", "1080", "one", "two"],
    ],
    ids=lambda args: " ".join(args) or "nothing",
)
def test_usage_errors_are_one_line(args: list[str], usage_error: UsageError) -> None:
    usage_error(*args)


def test_json_usage_error_is_also_a_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["--json", "-D", "1080", "-o", "Port=0", "host"])
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1
    [line] = out.splitlines()
    assert '"event":"error"' in line
    assert '"exit_status":2' in line


# == exit statuses of the real console script ==============================================


def test_exit_0_on_sigterm(pytunnel_factory: PytunnelFactory, sshd: SshdServer) -> None:
    running = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(sshd)])
    assert running.stop(signal.SIGTERM) == 0, running.describe()


def test_exit_130_on_sigint(pytunnel_factory: PytunnelFactory, sshd: SshdServer) -> None:
    running = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(sshd)])
    assert running.stop(signal.SIGINT) == 130, running.describe()
    assert running.events("stopping", reason="interrupted")


def test_exit_2_on_a_usage_error() -> None:
    result = run_pytunnel(["-D", "127.0.0.1:0", "-o", "NoSuchKey=1", "host"])
    assert result.returncode == 2, result.describe()
    assert result.stderr_lines == error_lines(result.stderr), result.describe()
    assert len(result.stderr_lines) == 1


def test_exit_3_when_the_port_is_taken(sshd: SshdServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_pytunnel(["-D", f"127.0.0.1:{port}", *server_args(sshd)])
    assert result.returncode == 3, result.describe()
    [line] = error_lines(result.stderr)
    assert str(port) in line


def test_exit_255_when_ssh_fails(closed_port: int, sshd: SshdServer) -> None:
    args = server_args(sshd)
    args[args.index("-p") + 1] = str(closed_port)
    result = run_pytunnel(["-D", "127.0.0.1:0", *args])
    assert result.returncode == 255, result.describe()
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "refused" in line.lower()


def test_unknown_key_names_the_closest_and_the_man_page(usage_error: UsageError) -> None:
    line = usage_error("-D", "1080", "-o", "StrictHostKeyCheking=no", "host")
    assert "-o StrictHostKeyCheking: unsupported option" in line
    assert "did you mean StrictHostKeyChecking?" in line
    assert "man pytunnel" in line
    # Not the whole list of keys on one line any more.
    assert "UserKnownHostsFile" not in line


def test_unknown_key_of_ssh_is_named_as_such(usage_error: UsageError) -> None:
    # LocalForward is close to RemoteForward, which means something else entirely.
    line = usage_error("-D", "1080", "-o", "LocalForward=8080:localhost:80", "host")
    assert "LocalForward is an ssh option pytunnel does not use" in line
    assert "did you mean" not in line
    assert "man pytunnel" in line


def test_unknown_key_far_from_any_suggests_nothing(usage_error: UsageError) -> None:
    line = usage_error("-D", "1080", "-o", "Xyzzy=1", "host")
    assert "did you mean" not in line
    assert "man pytunnel" in line


@pytest.mark.parametrize(
    ("flag", "key", "field", "spec"),
    [
        ("-c", "Ciphers", "ciphers", "aes128-ctr,aes256-gcm@openssh.com"),
        ("-m", "MACs", "macs", "hmac-sha2-256"),
    ],
)
def test_cipher_and_mac_flags_are_their_o_keys(
    recorded: Recorded, flag: str, key: str, field: str, spec: str
) -> None:
    by_flag = accepted(recorded, "-D", "1080", flag, spec, "host")
    recorded.calls.clear()
    by_option = accepted(recorded, "-D", "1080", "-o", f"{key}={spec}", "host")
    assert by_flag.algorithms == by_option.algorithms == {field: spec}
    recorded.calls.clear()
    # As the other flags: the flag wins over -o.
    both = accepted(recorded, "-D", "1080", "-o", f"{key}=+{spec}", flag, spec, "host")
    assert both.algorithms == by_flag.algorithms


@pytest.mark.parametrize("flag", ["-c", "-m"])
def test_cipher_and_mac_flags_check_their_value(flag: str, usage_error: UsageError) -> None:
    usage_error("-D", "1080", flag, "aes128-ctr,,aes256-ctr", "host")
