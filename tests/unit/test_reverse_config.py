"""Configuration of reverse dynamic forwarding (``-R [bind_address:]port``) and of the
UDP DNS resolver (``--dns-server``): the parsers, ``-o RemoteForward``, ssh_config
``RemoteForward`` lines, the open-proxy guard, the "nothing to forward" check, and the
environment a wrapped command gets when the only listeners are on the server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunnel import events
from tunnel.app import command_environment, guard_open_proxy, listeners_to_open
from tunnel.cli import build_config
from tunnel.config import (
    Config,
    Destination,
    Forward,
    apply_options,
    open_proxy_forwards,
    parse_dns_server,
    parse_reverse_forward,
)
from tunnel.errors import ConfigError
from tunnel.sshconfig import apply_ssh_config

DEST = Destination("server.example")

# == parse_reverse_forward ==================================================================

REVERSE_FORWARDS = [
    ("port-only-is-the-servers-loopback", "1080", Forward(None, 1080)),
    ("port-zero-lets-the-server-pick", "0", Forward(None, 0)),
    ("star-is-every-interface", "*:1080", Forward("", 1080)),
    ("empty-bind-is-every-interface", ":1080", Forward("", 1080)),
    ("name", "localhost:1080", Forward("localhost", 1080)),
    ("bracketed-ipv6", "[::1]:1080", Forward("::1", 1080)),
    ("slash-separator", "127.0.0.1/1080", Forward("127.0.0.1", 1080)),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=name) for name, text, expected in REVERSE_FORWARDS],
)
def test_parse_reverse_forward(text: str, expected: Forward) -> None:
    assert parse_reverse_forward(text) == expected


STATIC_FORWARDS = [
    ("port-host-port", "8080:localhost:80"),
    ("bind-port-host-port", "127.0.0.1:8080:localhost:80"),
    ("ipv6-everywhere", "[::1]:80:[::1]:8080"),
    ("slashes", "8080/localhost/80"),
    ("star-bind", "*:8080:localhost:80"),
]


@pytest.mark.parametrize("text", [pytest.param(text, id=name) for name, text in STATIC_FORWARDS])
def test_static_forms_are_refused_with_a_clear_message(text: str) -> None:
    # ssh's -R port:host:hostport is a different feature; say so rather than complain
    # about a bad port or an unbracketed IPv6 address.
    with pytest.raises(ConfigError, match="reverse dynamic forwarding only") as caught:
        parse_reverse_forward(text)
    assert repr(text) in caught.value.message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("70000", id="port-too-big"),
        pytest.param("localhost:x", id="port-not-a-number"),
        pytest.param("1080:", id="empty-port"),
        pytest.param("-1", id="negative"),
        pytest.param("[::1]", id="bracket-without-port"),
        pytest.param("::1:1080", id="unbracketed-ipv6"),
        pytest.param("bad_host!:1080", id="bad-bind-address"),
    ],
)
def test_bad_reverse_forwards_name_the_r_flag(text: str) -> None:
    # The message must point at the flag the user typed, not at -D.
    with pytest.raises(ConfigError) as caught:
        parse_reverse_forward(text)
    message = caught.value.message
    assert message.startswith("bad -R "), message
    assert "-D" not in message
    assert "reverse dynamic forwarding only" not in message


# == parse_dns_server =======================================================================

DNS_SERVERS = [
    ("ipv4-default-port", "10.0.0.2", ("10.0.0.2", 53)),
    ("ipv4-port", "10.0.0.2:5353", ("10.0.0.2", 5353)),
    ("bracketed-ipv6-port", "[::1]:53", ("::1", 53)),
    ("bracketed-ipv6-other-port", "[2001:db8::53]:5353", ("2001:db8::53", 5353)),
    ("bare-ipv6-default-port", "::1", ("::1", 53)),
    ("bracketed-ipv6-default-port", "[::1]", ("::1", 53)),
    ("name-default-port", "dns.example", ("dns.example", 53)),
    ("name-port", "dns.example:5353", ("dns.example", 5353)),
    ("surrounding-space", " 10.0.0.2 ", ("10.0.0.2", 53)),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=name) for name, text, expected in DNS_SERVERS],
)
def test_parse_dns_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_dns_server(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("", "expected HOST[:PORT]", id="empty"),
        pytest.param(":53", "expected HOST[:PORT]", id="no-host"),
        pytest.param("[]:53", "expected HOST[:PORT]", id="empty-brackets"),
        pytest.param("[::1]x", "expected HOST[:PORT]", id="junk-after-bracket"),
        pytest.param("bad_host!", "expected HOST[:PORT]", id="not-a-host"),
        pytest.param("10.0.0.2:0", "--dns-server port", id="port-zero"),
        pytest.param("10.0.0.2:70000", "--dns-server port", id="port-too-big"),
        pytest.param("10.0.0.2:abc", "--dns-server port", id="port-not-a-number"),
    ],
)
def test_parse_dns_server_refusals(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match="--dns-server") as caught:
        parse_dns_server(text)
    assert says in caught.value.message


@pytest.mark.parametrize("text", ["10.0.0.2:", "[::1]:"])
def test_parse_dns_server_refuses_an_empty_port(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_dns_server(text)


# == -o RemoteForward ========================================================================


def test_remote_forward_option_is_repeatable() -> None:
    values = apply_options(["RemoteForward=1080", "remoteforward *:2080", "RemoteForward=0"])
    assert values == {
        "reverse_forwards": [Forward(None, 1080), Forward("", 2080), Forward(None, 0)]
    }


def test_remote_forward_option_does_not_touch_dynamic_forwards() -> None:
    values = apply_options(["RemoteForward=1080", "DynamicForward=1080"])
    assert values["reverse_forwards"] == [Forward(None, 1080)]
    assert values["forwards"] == [Forward(None, 1080)]


@pytest.mark.parametrize(
    ("option", "says"),
    [
        pytest.param(
            "RemoteForward=8080:localhost:80", "reverse dynamic forwarding only", id="static"
        ),
        pytest.param("RemoteForward=70000", "bad -R", id="bad-port"),
    ],
)
def test_remote_forward_option_refusals_name_the_option(option: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        apply_options([option])
    message = caught.value.message
    assert message.startswith("-o RemoteForward: "), message
    assert says in message


def test_build_config_merges_r_flags_and_remote_forward_options() -> None:
    # Flags first, then -o; a repeat of the same listener is one listener.
    config = build_config(
        "server.example",
        reverse_forwards=["1080", "*:3080"],
        options=["RemoteForward=2080", "RemoteForward=1080"],
    )
    assert config.reverse_forwards == (Forward(None, 1080), Forward("", 3080), Forward(None, 2080))
    assert config.forwards == ()


def test_build_config_with_only_a_remote_forward_option() -> None:
    config = build_config("server.example", options=["RemoteForward=1080"])
    assert config.reverse_forwards == (Forward(None, 1080),)
    assert config.forwards == ()


def test_build_config_refuses_a_static_r_flag() -> None:
    with pytest.raises(ConfigError, match="reverse dynamic forwarding only"):
        build_config("server.example", reverse_forwards=["8080:localhost:80"])


# == ssh_config RemoteForward ===================================================================


# The two-field line is ssh's static forward, common in shared configs: not ours, and
# not an error either.
DYNAMIC_AND_STATIC = """\
Host x
    RemoteForward 1080
    RemoteForward 8080 localhost:80
"""

# Command line first, ssh_config after; another host's lines do not apply.
TWO_HOSTS = """\
Host x
    RemoteForward *:2080
    RemoteForward 1080
Host y
    RemoteForward 9090
"""


def test_ssh_config_remote_forward_takes_only_the_dynamic_lines(tmp_path: Path) -> None:
    path = tmp_path / "ssh_config"
    path.write_text(DYNAMIC_AND_STATIC)
    config = apply_ssh_config(Config(Destination("x"), ssh_config=(str(path),)))
    assert config.reverse_forwards == (Forward(None, 1080),)
    assert config.forwards == ()


def test_ssh_config_remote_forward_adds_to_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "ssh_config"
    path.write_text(TWO_HOSTS)
    given = Config(
        Destination("x"), ssh_config=(str(path),), reverse_forwards=(Forward(None, 1080),)
    )
    config = apply_ssh_config(given)
    assert config.reverse_forwards == (Forward(None, 1080), Forward("", 2080))


# == open_proxy_forwards and the guard ==========================================================


@pytest.mark.parametrize(
    ("reverse", "flagged"),
    [
        pytest.param(Forward("", 1080), ["-R *:1080"], id="star"),
        pytest.param(Forward("0.0.0.0", 1080), ["-R 0.0.0.0:1080"], id="any-ipv4"),
        pytest.param(Forward("::", 1080), ["-R [::]:1080"], id="any-ipv6"),
        pytest.param(Forward("server.example", 1080), ["-R server.example:1080"], id="name"),
        pytest.param(Forward(None, 1080), [], id="no-address-is-loopback"),
        pytest.param(Forward("localhost", 1080), [], id="localhost"),
        pytest.param(Forward("127.0.0.1", 1080), [], id="loopback-ipv4"),
        pytest.param(Forward("::1", 1080), [], id="loopback-ipv6"),
    ],
)
def test_open_proxy_forwards_flags_exposed_reverse_listeners(
    reverse: Forward, flagged: list[str]
) -> None:
    assert open_proxy_forwards(Config(DEST, reverse_forwards=(reverse,))) == flagged


def test_open_proxy_forwards_lists_local_then_remote() -> None:
    config = Config(DEST, forwards=(Forward("", 1080),), reverse_forwards=(Forward("", 2080),))
    assert open_proxy_forwards(config) == ["-D *:1080", "-R *:2080"]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"proxy_credentials": (b"user", b"secret")}, id="proxy-credentials"),
        pytest.param({"allow_open_proxy": True}, id="allow-open-proxy"),
    ],
)
def test_open_proxy_forwards_flags_nothing_when_allowed(fields: dict[str, object]) -> None:
    config = Config(
        DEST,
        forwards=(Forward("", 1080),),
        reverse_forwards=(Forward("", 2080),),
        **fields,  # type: ignore[arg-type]
    )
    assert open_proxy_forwards(config) == []


def test_guard_open_proxy_for_a_reverse_listener_names_it_and_the_server() -> None:
    with pytest.raises(ConfigError) as caught:
        guard_open_proxy(Config(DEST, reverse_forwards=(Forward("", 1080),)))
    message = caught.value.message
    assert "-R *:1080" in message
    assert "the server" in message
    assert "this machine" not in message
    assert caught.value.hint is not None
    assert "--proxy-auth" in caught.value.hint


def test_guard_open_proxy_passes_a_loopback_reverse_listener() -> None:
    guard_open_proxy(Config(DEST, reverse_forwards=(Forward(None, 1080),)))


def test_guard_open_proxy_with_both_kinds_names_both_places() -> None:
    config = Config(DEST, forwards=(Forward("", 1080),), reverse_forwards=(Forward("", 2080),))
    with pytest.raises(ConfigError) as caught:
        guard_open_proxy(config)
    message = caught.value.message
    assert "-D *:1080" in message
    assert "-R *:2080" in message
    assert "this machine" in message
    assert "the server" in message


# == listeners_to_open ======================================================================


def test_listeners_to_open_accepts_reverse_forwards_alone() -> None:
    config = Config(DEST, reverse_forwards=(Forward(None, 1080),))
    assert listeners_to_open(config) == config


def test_listeners_to_open_gateway_ports_leaves_reverse_forwards_alone() -> None:
    # -g is about this machine's listeners; the server's are the server's business.
    config = Config(DEST, reverse_forwards=(Forward(None, 1080),), gateway_ports=True)
    assert listeners_to_open(config).reverse_forwards == (Forward(None, 1080),)


def test_listeners_to_open_guards_reverse_forwards() -> None:
    with pytest.raises(ConfigError, match="the server"):
        listeners_to_open(Config(DEST, reverse_forwards=(Forward("", 1080),)))


def test_listeners_to_open_still_needs_something_to_forward() -> None:
    with pytest.raises(ConfigError, match="nothing to forward") as caught:
        listeners_to_open(Config(DEST))
    assert caught.value.hint is not None
    assert "-R" in caught.value.hint


# == command_environment ====================================================================

PROXY_VARIABLES = (
    "ALL_PROXY",
    "all_proxy",
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "no_proxy",
    "PYTUNNEL_PORT",
)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTUNNEL_TEST_MARKER", "kept")


@pytest.mark.usefixtures("clean_environment")
def test_command_environment_with_only_remote_listeners_adds_nothing() -> None:
    # A listener on the server is no use to a command running here.
    remote = [events.Listener("127.0.0.1", 1080, remote=True)]
    env = command_environment(remote)
    assert env == dict(os.environ)
    assert env["PYTUNNEL_TEST_MARKER"] == "kept"
    for name in PROXY_VARIABLES:
        assert name not in env


@pytest.mark.usefixtures("clean_environment")
def test_command_environment_with_only_remote_listeners_keeps_the_users_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5h://proxy.example:9050")
    env = command_environment([events.Listener("127.0.0.1", 1080, remote=True)])
    assert env["ALL_PROXY"] == "socks5h://proxy.example:9050"


@pytest.mark.usefixtures("clean_environment")
def test_command_environment_with_a_mix_uses_the_local_listener() -> None:
    # The remote one comes first and is on loopback, the usual preference: still skipped.
    listeners = [
        events.Listener("127.0.0.1", 2080, remote=True),
        events.Listener("::1", 1080),
    ]
    env = command_environment(listeners)
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://[::1]:1080"
    assert env["http_proxy"] == "http://[::1]:1080"
    assert env["PYTUNNEL_PORT"] == "1080"
    assert env["PYTUNNEL_TEST_MARKER"] == "kept"
