"""ssh_config files (``-F``): aliases, ``Host`` patterns, first match wins, the keys a
tunnel needs (DynamicForward, StrictHostKeyChecking, ...), the command line winning, and
``-F none``.

:func:`apply_ssh_config` is checked directly for what it merges into the Config; the rest
runs the real console script against the real sshd, with everything it needs to log in
taken from the config file.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.net import free_port
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

from tunnel.config import AddressFamily, Config, Destination, Forward, HostKeyPolicy
from tunnel.errors import ConfigError
from tunnel.sshconfig import apply_ssh_config

pytestmark = pytest.mark.timeout(60)

WriteConfig = Callable[[str], Path]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    counter = iter(range(1000))

    def write(text: str) -> Path:
        path = tmp_path / f"ssh_config{next(counter)}"
        path.write_text(text)
        return path

    return write


def merged(path: Path | None, host: str = "alias", **fields: object) -> Config:
    ssh_config = None if path is None else (str(path),)
    config = Config(Destination(host), ssh_config=ssh_config, **fields)  # type: ignore[arg-type]
    return apply_ssh_config(config)


# == apply_ssh_config ======================================================================

EVERY_KEY = """\
Host alias
    DynamicForward 127.0.0.1:1080
    DynamicForward 2080
    StrictHostKeyChecking accept-new
    BatchMode yes
    GatewayPorts yes
    Compression yes
    ServerAliveInterval 7
    ServerAliveCountMax 9
    ConnectTimeout 4
    UserKnownHostsFile /kh/one /kh/two
    GlobalKnownHostsFile /kh/global
    Ciphers aes256-ctr,aes128-ctr
"""


def test_every_tunnel_key_is_merged(write_config: WriteConfig) -> None:
    config = merged(write_config(EVERY_KEY))
    assert config.forwards == (Forward("127.0.0.1", 1080), Forward(None, 2080))
    assert config.host_key_policy is HostKeyPolicy.ACCEPT_NEW
    assert config.batch_mode is True
    assert config.gateway_ports is True
    assert config.compression is True
    assert config.keepalive_interval == 7
    assert config.keepalive_count == 9
    assert config.connect_timeout == 4
    assert config.known_hosts == ("/kh/one", "/kh/two")
    assert config.global_known_hosts == ("/kh/global",)
    assert dict(config.algorithms) == {"ciphers": "aes256-ctr,aes128-ctr"}
    # What asyncssh itself applies at connect time stays as given.
    assert config.destination == Destination("alias")


def test_command_line_wins_over_the_file(write_config: WriteConfig) -> None:
    config = merged(
        write_config(EVERY_KEY),
        forwards=(Forward(None, 3080),),
        host_key_policy=HostKeyPolicy.NO,
        batch_mode=False,
        gateway_ports=False,
        compression=False,
        keepalive_interval=0.0,
        keepalive_count=1,
        connect_timeout=30.0,
        known_hosts=("/mine",),
        global_known_hosts=(),
        algorithms={"ciphers": "aes128-gcm@openssh.com"},
        address_family=AddressFamily.INET,
    )
    # -D and DynamicForward add up, the command line's first; everything else is ours.
    assert config.forwards == (
        Forward(None, 3080),
        Forward("127.0.0.1", 1080),
        Forward(None, 2080),
    )
    assert config.host_key_policy is HostKeyPolicy.NO
    assert config.batch_mode is False
    assert config.gateway_ports is False
    assert config.compression is False
    assert config.keepalive_interval == 0.0
    assert config.keepalive_count == 1
    assert config.connect_timeout == 30.0
    assert config.known_hosts == ("/mine",)
    assert config.global_known_hosts == ()
    assert dict(config.algorithms) == {"ciphers": "aes128-gcm@openssh.com"}


def test_first_match_wins(write_config: WriteConfig) -> None:
    path = write_config(
        "Host alias\n    StrictHostKeyChecking no\n    ConnectTimeout 3\n"
        "Host al*\n    StrictHostKeyChecking yes\n    ConnectTimeout 9\n    BatchMode yes\n"
        "Host *\n    BatchMode no\n    GatewayPorts yes\n"
    )
    config = merged(path)
    assert config.host_key_policy is HostKeyPolicy.NO
    assert config.connect_timeout == 3
    assert config.batch_mode is True
    assert config.gateway_ports is True


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("web.test", True),
        ("db.test", True),
        ("skip.test", False),  # negated
        ("web.test.example", False),
        ("test", False),
        ("alias", False),
    ],
)
def test_host_patterns(write_config: WriteConfig, host: str, matches: bool) -> None:
    path = write_config(
        "Host !skip.test *.test\n    DynamicForward 1080\n    StrictHostKeyChecking no\n"
    )
    config = merged(path, host=host)
    assert (config.forwards == (Forward(None, 1080),)) is matches
    assert (config.host_key_policy is HostKeyPolicy.NO) is matches


def test_non_matching_block_adds_no_listener(write_config: WriteConfig) -> None:
    path = write_config("Host other\n    DynamicForward 1080\n")
    assert merged(path, forwards=(Forward(None, 2000),)).forwards == (Forward(None, 2000),)


def test_top_level_lines_apply_to_every_host(write_config: WriteConfig) -> None:
    path = write_config("ServerAliveInterval 5\nHost other\n    ServerAliveInterval 1\n")
    assert merged(path).keepalive_interval == 5


def test_no_file_changes_nothing(write_config: WriteConfig) -> None:
    base = Config(Destination("alias"), ssh_config=())
    assert apply_ssh_config(base) == base


def test_default_is_home_ssh_config_and_none_ignores_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host alias\n    DynamicForward 1080\n")
    monkeypatch.setenv("HOME", str(home))
    assert merged(None).forwards == (Forward(None, 1080),)
    assert apply_ssh_config(Config(Destination("alias"), ssh_config=())).forwards == ()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Host *\n    Port notanumber\n", ["ssh_config", "Port"]),
        ("Host *\n    DynamicForward nope\n", ["ssh_config", "nope"]),
        ("Host *\n    StrictHostKeyChecking sometimes\n", ["ssh_config", "StrictHostKeyChecking"]),
    ],
    ids=["port", "dynamic-forward", "strict"],
)
def test_bad_values_in_the_file(write_config: WriteConfig, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        merged(write_config(text))
    for word in words:
        assert word in str(caught.value)
    assert caught.value.exit_status == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        merged(tmp_path / "nope")
    assert "ssh_config" in str(caught.value)


# == the route: ProxyJump and ProxyCommand ===============================================

ROUTES = """\
Host behind
    HostName 10.0.0.9
    User dest-user
    IdentityFile /keys/behind
    StrictHostKeyChecking accept-new
    ProxyJump inner
Host inner
    HostName 10.0.0.2
    Port 2202
    IdentityFile /keys/inner
    ProxyJump outer
Host outer
    HostName 10.0.0.1
    IdentityFile /keys/outer
    ProxyCommand nc -X connect -x proxy.test:3128 %h %p
Host direct
    ProxyCommand=ssh -W %h:%p %r@gateway
Host two-hops
    ProxyJump outer,u@inner:2200
Host first-jump
    ProxyJump outer
    ProxyCommand never used
Host first-command
    ProxyCommand nc %h %p
    ProxyJump never-used
Host jump-none
    ProxyJump none
    ProxyCommand never used
Host loop-a
    ProxyJump loop-b
Host loop-b
    ProxyJump loop-a
"""


def test_proxyjump_chain_each_hop_with_its_own_block(write_config: WriteConfig) -> None:
    config = merged(write_config(ROUTES), host="behind", identities=("/keys/cli",))
    assert [hop.destination for hop in config.hops] == [Destination("outer"), Destination("inner")]
    outer, inner = config.hops
    # The first hop of the chain runs its own ProxyCommand, tokens expanded for it.
    assert outer.proxy_run == "nc -X connect -x proxy.test:3128 10.0.0.1 22"
    assert outer.proxy_command == "nc -X connect -x proxy.test:3128 %h %p"
    assert inner.proxy_run is None
    assert config.proxy_run is None
    # Each hop: the command line's -i, then its own IdentityFile, never the others'.
    assert outer.identities == ("/keys/cli", "/keys/outer")
    assert inner.identities == ("/keys/cli", "/keys/inner")
    assert config.identities == ("/keys/cli", "/keys/behind")
    # A setting of the destination's block is not the jump hosts'.
    assert config.host_key_policy is HostKeyPolicy.ACCEPT_NEW
    assert outer.host_key_policy is None
    assert inner.host_key_policy is None


def test_proxycommand_tokens_from_the_file(write_config: WriteConfig) -> None:
    config = merged(write_config(ROUTES), host="direct")
    assert config.hops == ()
    assert config.proxy_command == "ssh -W %h:%p %r@gateway"
    user = getpass.getuser()
    assert config.proxy_run == f"ssh -W direct:22 {user}@gateway"


def test_later_jump_hosts_follow_the_earlier_ones_not_their_own_proxyjump(
    write_config: WriteConfig,
) -> None:
    config = merged(write_config(ROUTES), host="two-hops")
    assert [hop.destination for hop in config.hops] == [
        Destination("outer"),
        Destination("inner", "u", 2200),
    ]
    # inner's own "ProxyJump outer" is not followed a second time.
    assert config.hops[1].hops == ()


@pytest.mark.parametrize(
    ("host", "jumps", "command"),
    [
        ("first-jump", [Destination("outer")], None),
        ("first-command", [], "nc first-command 22"),
        ("jump-none", [], None),
    ],
)
def test_whichever_comes_first_in_the_file(
    write_config: WriteConfig, host: str, jumps: list[Destination], command: str | None
) -> None:
    config = merged(write_config(ROUTES), host=host)
    assert [hop.destination for hop in config.hops][:1] == jumps
    assert config.proxy_run == command


@pytest.mark.parametrize(
    ("fields", "jumps", "command"),
    [
        ({"jump_hosts": (Destination("cli-jump"),)}, [Destination("cli-jump")], None),
        ({"jump_hosts": ()}, [], None),
        ({"proxy_command": "nc %h 22"}, [], "nc 10.0.0.9 22"),
        ({"proxy_command": "none"}, [], None),
    ],
    ids=["-J", "-J none", "-o ProxyCommand", "-o ProxyCommand=none"],
)
def test_the_command_line_route_comes_first(
    write_config: WriteConfig, fields: dict[str, object], jumps: list[Destination], command: str
) -> None:
    config = merged(write_config(ROUTES), host="behind", **fields)
    assert [hop.destination for hop in config.hops] == jumps
    assert config.proxy_run == command


def test_without_a_file_the_command_line_route_still_resolves() -> None:
    config = apply_ssh_config(
        Config(Destination("h", "u", 2022), ssh_config=(), proxy_command="nc %h %p # %r")
    )
    assert config.proxy_run == "nc h 2022 # u"
    jumped = apply_ssh_config(
        Config(Destination("h"), ssh_config=(), jump_hosts=(Destination("j1"), Destination("j2")))
    )
    assert [hop.destination for hop in jumped.hops] == [Destination("j1"), Destination("j2")]


def test_a_proxyjump_loop_is_refused(write_config: WriteConfig) -> None:
    with pytest.raises(ConfigError) as caught:
        merged(write_config(ROUTES), host="loop-a")
    assert "loop" in caught.value.message
    assert "loop-a -> loop-b -> loop-a" in caught.value.message


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("ProxyJump a,,b", ["ssh_config", "a,,b"]),
        ("ProxyCommand nc %x", ["ssh_config", "ProxyCommand", "%x"]),
        ("ProxyCommand nc %h %", ["ssh_config", "ProxyCommand"]),
    ],
)
def test_bad_route_in_the_file(write_config: WriteConfig, line: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        merged(write_config(f"Host alias\n    {line}\n"))
    for word in words:
        assert word in str(caught.value)
    assert caught.value.exit_status == 2


def test_unsafe_user_is_never_put_into_the_proxycommand(write_config: WriteConfig) -> None:
    path = write_config("Host alias\n    ProxyCommand ssh -W %h:%p %r@gateway\n")
    with pytest.raises(ConfigError) as caught:
        apply_ssh_config(Config(Destination("alias", "x;touch owned"), ssh_config=(str(path),)))
    assert "not safe" in caught.value.message


# == the real console script against the real sshd =========================================


def login_block(sshd: SshdServer, known_hosts: str | Path, strict: str = "yes") -> str:
    """Everything needed to reach ``sshd`` strictly, as ssh_config lines."""
    return (
        f"    HostName {sshd.host}\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile {sshd.client_key}\n"
        f"    UserKnownHostsFile {known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        f"    StrictHostKeyChecking {strict}\n"
        "    ConnectTimeout 10\n"
    )


def curl_through(running: Running, http_target: HttpTarget) -> str:
    return fetch(running, http_target.url("/hello"))


def error_line(result: Finished) -> str:
    assert "Traceback" not in result.stderr, result.describe()
    [line] = [ln for ln in result.stderr_lines if ln.startswith("pytunnel: ")]
    return line


def test_alias_gives_hostname_user_port_and_key(
    sshd: SshdServer,
    write_config: WriteConfig,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    path = write_config(f"Host myalias\n{login_block(sshd, sshd.known_hosts)}")
    mark = sshd.log_mark()
    running = pytunnel_factory(["-F", str(path), "-D", "127.0.0.1:0", "myalias"])
    assert running.ready["server"] == "myalias"
    assert curl_through(running, http_target) == http_target.hello_body.decode()
    assert sshd.wait_log(f"Accepted publickey for {sshd.user}", since=mark)


@pytest.mark.parametrize(("host", "reaches"), [("web.test", True), ("skip.test", False)])
def test_pattern_negation_and_first_match(
    sshd: SshdServer,
    write_config: WriteConfig,
    pytunnel_factory: PytunnelFactory,
    closed_port: int,
    host: str,
    reaches: bool,
) -> None:
    # The catch-all comes last: for every option the first matching block wins, so the
    # *.test hosts get the sshd's port and skip.test gets the closed one.
    path = write_config(
        f"Host !skip.test *.test\n{login_block(sshd, sshd.known_hosts)}"
        f"Host *\n    HostName 127.0.0.1\n    Port {closed_port}\n    ConnectTimeout 10\n"
    )
    args = ["-F", str(path), "-D", "127.0.0.1:0", host]
    if reaches:
        assert pytunnel_factory(args).ready["event"] == "ready"
        return
    result = run_pytunnel(args)
    assert result.returncode == 255, result.describe()
    assert "refused" in error_line(result).lower()


def test_dynamic_forward_in_the_config_is_enough(
    sshd: SshdServer,
    write_config: WriteConfig,
    pytunnel_factory: PytunnelFactory,
    http_target: HttpTarget,
) -> None:
    path = write_config(
        f"Host myalias\n    DynamicForward 127.0.0.1:0\n{login_block(sshd, sshd.known_hosts)}"
    )
    running = pytunnel_factory(["-F", str(path), "myalias"])
    assert [host for host, _ in running.listeners] == ["127.0.0.1"]
    assert curl_through(running, http_target) == http_target.hello_body.decode()


def test_dynamic_forward_adds_a_listener_only_from_a_matching_block(
    sshd: SshdServer, write_config: WriteConfig, pytunnel_factory: PytunnelFactory
) -> None:
    wanted, unwanted = free_port(), free_port()
    path = write_config(
        f"Host other\n    DynamicForward 127.0.0.1:{unwanted}\n"
        f"Host myalias\n    DynamicForward 127.0.0.1:{wanted}\n"
        f"{login_block(sshd, sshd.known_hosts)}"
    )
    running = pytunnel_factory(["-F", str(path), "-D", "127.0.0.1:0", "myalias"])
    ports = [port for _, port in running.listeners]
    assert len(ports) == 2, running.ready
    assert ports[1] == wanted
    assert unwanted not in ports


def test_command_line_port_beats_the_config(
    sshd: SshdServer, write_config: WriteConfig, pytunnel_factory: PytunnelFactory, closed_port: int
) -> None:
    block = login_block(sshd, sshd.known_hosts).replace(f"Port {sshd.port}", f"Port {closed_port}")
    path = write_config(f"Host myalias\n{block}")
    refused = run_pytunnel(["-F", str(path), "-D", "127.0.0.1:0", "myalias"])
    assert refused.returncode == 255, refused.describe()
    running = pytunnel_factory(
        ["-F", str(path), "-p", str(sshd.port), "-D", "127.0.0.1:0", "myalias"]
    )
    assert running.ready["event"] == "ready"


def test_command_line_strict_no_beats_the_config(
    sshd: SshdServer, write_config: WriteConfig, pytunnel_factory: PytunnelFactory, tmp_path: Path
) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    path = write_config(f"Host myalias\n{login_block(sshd, empty)}")
    refused = run_pytunnel(["-F", str(path), "-D", "127.0.0.1:0", "myalias"])
    assert refused.returncode == 255, refused.describe()
    assert "not known" in error_line(refused)
    args = ["-F", str(path), "-o", "StrictHostKeyChecking=no", "-D", "127.0.0.1:0", "myalias"]
    assert pytunnel_factory(args).ready["event"] == "ready"
    # As ssh: "no" accepts an unknown key and adds it (under the HostName, not the alias).
    assert empty.read_text().split()[:3] == [
        f"[{sshd.host}]:{sshd.port}",
        *sshd.host_key_pub.split(),
    ]


def test_accept_new_in_the_config_is_honoured(
    sshd: SshdServer, write_config: WriteConfig, pytunnel_factory: PytunnelFactory, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    path = write_config(f"Host myalias\n{login_block(sshd, known, strict='accept-new')}")
    pytunnel_factory(["-F", str(path), "-D", "127.0.0.1:0", "myalias"])
    assert known.read_text().split()[:3] == [
        f"[{sshd.host}]:{sshd.port}",
        *sshd.host_key_pub.split(),
    ]


@pytest.fixture
def bogus_home(tmp_path: Path) -> Path:
    """A HOME whose ~/.ssh/config would break any run that reads it."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host *\n    Port notanumber\n")
    return home


def test_config_none_ignores_the_home_config(
    sshd: SshdServer, bogus_home: Path, pytunnel_factory: PytunnelFactory
) -> None:
    args = server_args(sshd)
    assert args[:2] == ["-F", "none"]
    env = {"HOME": str(bogus_home)}
    running = pytunnel_factory(["-D", "127.0.0.1:0", *args], env=env)
    assert running.ready["event"] == "ready"
    # The same run without -F reads it, and says so.
    result = run_pytunnel(["-D", "127.0.0.1:0", *args[2:]], env=env)
    assert result.returncode == 2, result.describe()
    line = error_line(result)
    assert "ssh_config" in line
    assert "Port" in line


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run_pytunnel(["-F", str(tmp_path / "nope"), "-D", "127.0.0.1:0", "myalias"])
    assert result.returncode == 2, result.describe()
    assert "ssh_config" in error_line(result)


def test_bad_dynamic_forward_in_the_config_is_a_usage_error(write_config: WriteConfig) -> None:
    path = write_config("Host myalias\n    HostName 127.0.0.1\n    DynamicForward nope\n")
    result = run_pytunnel(["-F", str(path), "-D", "127.0.0.1:0", "myalias"])
    assert result.returncode == 2, result.describe()
    assert "in ssh_config" in error_line(result)


# == keywords ssh does not know ============================================================


def test_a_keyword_ssh_does_not_know_is_warned_about_with_file_and_line(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config("Host alias\n    HostNmae example.org\n    Port 2022\n")
    with caplog.at_level("WARNING", logger="tunnel"):
        config = merged(path)
    assert config.destination == Destination("alias")
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{path} line 2" in warning
    assert "unknown ssh_config keyword HostNmae" in warning


def test_keywords_ssh_knows_stay_silent_even_where_pytunnel_does_not_use_them(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # A config shared with ssh: forwarding, agent, multiplexing, and a block for another
    # host, in several spellings ssh accepts.
    path = write_config(
        "Host *\n    ForwardAgent no\n    ControlMaster auto\n    controlpath=~/.ssh/%C\n"
        "Host other\n    LocalForward 8080 localhost:80\n    SendEnv LANG\n"
        "Match host alias\n    AddKeysToAgent yes\n"
    )
    with caplog.at_level("WARNING", logger="tunnel"):
        merged(path)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_ignore_unknown_and_include_are_followed(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    included = write_config("UseKeychain yes\nPortt 22\n")
    path = write_config(f"IgnoreUnknown UseKeychain,Foo*\nInclude {included}\nFooBar 1\n")
    with caplog.at_level("WARNING", logger="tunnel"):
        merged(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{included} line 2: unknown ssh_config keyword Portt (ssh refuses it; ignored)"
    ]
