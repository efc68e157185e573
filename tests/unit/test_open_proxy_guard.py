"""The open-proxy guard's pure parts (tunnel.config, tunnel.app): loopback names become
the literals they mean before anything is bound, and what was actually bound is checked
once more before it is served."""

from __future__ import annotations

import pytest

from tunnel.app import guard_bound, listeners_to_open
from tunnel.config import Config, Destination, Forward, is_loopback_address, literal_forward
from tunnel.errors import ConfigError

DEST = Destination("server.example")

LITERALS = [
    (Forward("localhost", 1080), Forward(None, 1080)),
    (Forward("LOCALHOST", 1080), Forward(None, 1080)),
    (Forward("LocalHost", 0), Forward(None, 0)),
    (Forward("ip6-localhost", 1080), Forward("::1", 1080)),
    (Forward("IP6-LOCALHOST", 1080), Forward("::1", 1080)),
    (Forward("ip6-loopback", 1080), Forward("::1", 1080)),
    (Forward("Ip6-Loopback", 1080), Forward("::1", 1080)),
    # Everything else stays as typed (and the guard judges it as before).
    (Forward(None, 1080), Forward(None, 1080)),
    (Forward("", 1080), Forward("", 1080)),
    (Forward("127.0.0.2", 1080), Forward("127.0.0.2", 1080)),
    (Forward("::1", 1080), Forward("::1", 1080)),
    (Forward("localhost.localdomain", 1080), Forward("localhost.localdomain", 1080)),
    (Forward("my-localhost", 1080), Forward("my-localhost", 1080)),
]


@pytest.mark.parametrize(("given", "bound"), LITERALS, ids=[str(g) for g, _ in LITERALS])
def test_loopback_names_become_literals(given: Forward, bound: Forward) -> None:
    assert literal_forward(given) == bound


def test_listeners_to_open_binds_loopback_names_as_literals() -> None:
    config = Config(
        DEST,
        forwards=(Forward("LOCALHOST", 1080), Forward("ip6-loopback", 1081)),
    )
    assert listeners_to_open(config).forwards == (Forward(None, 1080), Forward("::1", 1081))


def test_listeners_to_open_merges_names_that_mean_the_same_listener() -> None:
    # -D localhost:1080 -D 1080 is one listener, not a second bind that would clash.
    config = Config(DEST, forwards=(Forward("localhost", 1080), Forward(None, 1080)))
    assert listeners_to_open(config).forwards == (Forward(None, 1080),)


def test_gateway_ports_does_not_open_a_named_loopback_listener() -> None:
    config = Config(DEST, forwards=(Forward("localhost", 1080),), gateway_ports=True)
    assert listeners_to_open(config).forwards == (Forward(None, 1080),)


LOOPBACK_BOUND = ["127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "::ffff:127.0.0.1"]
EXPOSED_BOUND = [
    "0.0.0.0",
    "::",
    "192.0.2.1",
    "10.0.0.1",
    "fd00::2",
    "fe80::1%eth0",
    "::ffff:0.0.0.0",
]


@pytest.mark.parametrize("host", LOOPBACK_BOUND)
def test_bound_loopback_passes(host: str) -> None:
    assert is_loopback_address(host)
    guard_bound(Config(DEST), [("127.0.0.1", 1080), (host, 1080)])


@pytest.mark.parametrize("host", EXPOSED_BOUND)
def test_bound_elsewhere_is_refused_as_an_open_proxy(host: str) -> None:
    assert not is_loopback_address(host)
    with pytest.raises(ConfigError) as caught:
        guard_bound(Config(DEST), [("127.0.0.1", 1080), (host, 1080)])
    assert caught.value.exit_status == 2
    assert host in caught.value.message
    assert "127.0.0.1:1080" not in caught.value.message
    assert "--proxy-auth" in str(caught.value.hint)
    assert "--allow-open-proxy" in str(caught.value.hint)


@pytest.mark.parametrize(
    "fields",
    [{"allow_open_proxy": True}, {"proxy_credentials": (b"bob", b"pw")}],
    ids=["allow-open-proxy", "proxy-auth"],
)
def test_bound_elsewhere_is_allowed_when_asked_for(fields: dict[str, object]) -> None:
    guard_bound(Config(DEST, **fields), [("0.0.0.0", 1080), ("::", 1080)])  # type: ignore[arg-type]


def test_names_are_not_loopback_addresses() -> None:
    # A socket reports an address; a name there would be a bug, and is not trusted.
    assert not is_loopback_address("localhost")
    assert not is_loopback_address("")
