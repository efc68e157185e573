"""Config parsers: ``-D [bind:]port``, ``[user@]host[:port]``, ``-o``, ports, seconds,
StrictHostKeyChecking, and forward de-duplication. The accepted forms follow ssh(1)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.config import (
    AddressFamily,
    Destination,
    Forward,
    HostKeyPolicy,
    merge_forwards,
    parse_address_family,
    parse_algorithms,
    parse_count,
    parse_destination,
    parse_forward,
    parse_host_key_policy,
    parse_interval,
    parse_jump_hosts,
    parse_option,
    parse_port,
    parse_preferred_auth,
    parse_seconds,
    parse_yes_no,
)
from tunnel.errors import ConfigError

# ---- -D [bind_address:]port ----

FORWARDS = [
    ("port-only", "1080", Forward(None, 1080)),
    ("port-zero-means-pick-one", "0", Forward(None, 0)),
    ("max-port", "65535", Forward(None, 65535)),
    ("surrounding-space", " 1080 ", Forward(None, 1080)),
    ("localhost", "localhost:1080", Forward("localhost", 1080)),
    ("ipv4", "127.0.0.1:1080", Forward("127.0.0.1", 1080)),
    ("star-is-all-interfaces", "*:1080", Forward("", 1080)),
    # ssh(1): "an empty address or '*' indicates that the port should be available from
    # all interfaces".
    ("empty-bind-is-all-interfaces", ":1080", Forward("", 1080)),
    ("bracketed-ipv6", "[::1]:1080", Forward("::1", 1080)),
    ("bracketed-ipv6-slash", "[::1]/1080", Forward("::1", 1080)),
    ("bracketed-any6", "[::]:1080", Forward("::", 1080)),
    ("slash-separator", "host/1080", Forward("host", 1080)),
    ("unbracketed-ipv6-slash", "::1/1080", Forward("::1", 1080)),
    ("fqdn", "proxy.example.com:1080", Forward("proxy.example.com", 1080)),
]


@pytest.mark.parametrize(
    ("text", "expected"), [row[1:] for row in FORWARDS], ids=[row[0] for row in FORWARDS]
)
def test_parse_forward(text: str, expected: Forward) -> None:
    assert parse_forward(text) == expected


FORWARD_ERRORS = [
    ("not-a-number", "abc", "expected a number"),
    ("port-too-big", "70000", "65535"),
    ("negative", "-1", "expected a number"),
    ("empty", "", "expected a number"),
    ("unbracketed-ipv6", "::1:1080", r"\[::1\]:1080"),
    ("unbracketed-ipv6-two-colons", "2001::1080", r"\[::1\]:1080"),
    ("unclosed-bracket", "[::1", r"\[address\]:port"),
    ("bracket-without-port", "[::1]", r"\[address\]:port"),
    ("bracket-junk-before-port", "[::1]x1080", r"\[address\]:port"),
    ("bad-host", "bad host!:80", "bind address 'bad host!'"),
    ("host-without-port", "localhost:", "expected a number"),
    ("port-with-space", "localhost:10 80", "expected a number"),
    ("port-is-a-float", "1080.0", "expected a number"),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [row[1:] for row in FORWARD_ERRORS],
    ids=[row[0] for row in FORWARD_ERRORS],
)
def test_parse_forward_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_forward(text)


@pytest.mark.parametrize(
    ("forward", "text"),
    [
        (Forward(None, 1080), "1080"),
        (Forward("", 1080), "*:1080"),
        (Forward("localhost", 1080), "localhost:1080"),
        (Forward("::1", 1080), "[::1]:1080"),
    ],
    ids=["loopback", "all", "name", "ipv6"],
)
def test_forward_str_round_trips(forward: Forward, text: str) -> None:
    assert str(forward) == text
    assert parse_forward(text) == forward


# ---- destinations ----

DESTINATIONS = [
    ("host", "host", Destination("host")),
    ("user-host", "user@host", Destination("host", "user")),
    ("user-host-port", "user@host:2222", Destination("host", "user", 2222)),
    ("ssh-url", "ssh://user@host:2222", Destination("host", "user", 2222)),
    ("ssh-url-trailing-slash", "ssh://host/", Destination("host")),
    ("bracketed-ipv6-port", "[::1]:2222", Destination("::1", None, 2222)),
    ("user-bracketed-ipv6", "user@[::1]", Destination("::1", "user")),
    ("bare-ipv6", "::1", Destination("::1")),
    ("bare-ipv6-full", "2001:db8::22", Destination("2001:db8::22")),
    ("ipv4-port", "192.0.2.1:22", Destination("192.0.2.1", None, 22)),
    ("ssh-url-ipv6", "ssh://me@[2001:db8::1]:2200", Destination("2001:db8::1", "me", 2200)),
    # ssh(1) splits user and host at the last '@'.
    ("user-with-at", "me@corp@bastion", Destination("bastion", "me@corp")),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [row[1:] for row in DESTINATIONS],
    ids=[row[0] for row in DESTINATIONS],
)
def test_parse_destination(text: str, expected: Destination) -> None:
    assert parse_destination(text) == expected


DESTINATION_ERRORS = [
    ("http-url", "http://x", "only ssh://"),
    ("empty-user", "@host", "empty user name"),
    ("port-not-a-number", "host:abc", "expected a number"),
    ("port-zero", "host:0", "from 1 to 65535"),
    ("port-too-big", "host:65536", "from 1 to 65535"),
    ("empty", "", r"expected \[user@\]host\[:port\]"),
    ("only-user", "user@", r"expected \[user@\]host\[:port\]"),
    ("unclosed-bracket", "[::1:22", "missing ']'"),
    ("bracket-junk", "[::1]x", r"expected \[address\]:port"),
    ("bad-host-chars", "bad host", r"expected \[user@\]host\[:port\]"),
    ("empty-ssh-url", "ssh://", r"expected \[user@\]host\[:port\]"),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [row[1:] for row in DESTINATION_ERRORS],
    ids=[row[0] for row in DESTINATION_ERRORS],
)
def test_parse_destination_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_destination(text)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize(
    ("destination", "text"),
    [
        (Destination("host"), "host"),
        (Destination("host", "user", 2222), "user@host:2222"),
        (Destination("::1", "user", 2222), "user@[::1]:2222"),
        (Destination("::1"), "[::1]"),
    ],
    ids=["host", "user-host-port", "ipv6-port", "ipv6"],
)
def test_destination_str(destination: Destination, text: str) -> None:
    assert str(destination) == text
    assert parse_destination(text) == destination


# Regression (fixed in 1fbb3b9): a '$'-anchored pattern also matched before a trailing
# newline, so "host\n" passed as a host name.
@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_forward, "host\n:1080"),
        (parse_destination, "user@host\n:22"),
        (parse_destination, "ssh://host\n:22"),
    ],
    ids=["forward", "destination", "ssh-url"],
)
def test_host_with_trailing_newline_is_rejected(parse: Callable[[str], object], text: str) -> None:
    with pytest.raises(ConfigError):
        parse(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from("[]:/*@.-_ abc19\x00\u00e9"), max_size=16))
def test_parse_forward_returns_a_forward_or_raises_config_error(text: str) -> None:
    try:
        forward = parse_forward(text)
    except ConfigError:
        return
    assert isinstance(forward, Forward)
    assert 0 <= forward.port <= 65535
    assert forward.host is None or "*" not in forward.host


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from("[]:/@.-_ abc19sh\x00\u00e9"), max_size=16))
def test_parse_destination_returns_a_destination_or_raises_config_error(text: str) -> None:
    try:
        destination = parse_destination(text)
    except ConfigError:
        return
    assert isinstance(destination, Destination)
    assert destination.host
    assert destination.port is None or 1 <= destination.port <= 65535
    assert destination.user is None or destination.user


# ---- -o ----

OPTIONS = [
    ("equals", "Key=Value", ("Key", "Value")),
    ("space", "Key Value", ("Key", "Value")),
    ("spaced-equals", "Key = Value", ("Key", "Value")),
    ("tab", "Key\tValue", ("Key", "Value")),
    ("surrounding-space", "  ServerAliveInterval=30  ", ("ServerAliveInterval", "30")),
    ("value-with-spaces", "ProxyCommand=ssh -W %h:%p jump", ("ProxyCommand", "ssh -W %h:%p jump")),
    ("value-with-equals", "SetEnv=A=B", ("SetEnv", "A=B")),
]


@pytest.mark.parametrize(
    ("text", "expected"), [row[1:] for row in OPTIONS], ids=[row[0] for row in OPTIONS]
)
def test_parse_option(text: str, expected: tuple[str, str]) -> None:
    assert parse_option(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "Key", "Key=", "Key =  ", "=Value", " = Value", "Bad-Key=1", "Key: Value"],
    ids=["empty", "key-only", "no-value", "blank-value", "no-key", "blank-key", "dash", "colon"],
)
def test_parse_option_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="expected Key=Value"):
        parse_option(text)


# ---- ports ----


@pytest.mark.parametrize(
    ("text", "allow_zero", "expected"),
    [("1", False, 1), ("65535", False, 65535), ("0", True, 0), ("00022", False, 22)],
    ids=["one", "max", "zero-allowed", "leading-zeros"],
)
def test_parse_port(text: str, allow_zero: bool, expected: int) -> None:
    assert parse_port(text, allow_zero=allow_zero) == expected


@pytest.mark.parametrize(
    "text",
    ["0", "65536", "-1", "+22", "", " 22", "22 ", "0x16", "2_2", "22.0", "abc"],
    ids=["zero", "too-big", "negative", "plus", "empty", "lead-space", "trail-space",
         "hex", "underscore", "float", "text"],
)  # fmt: skip
def test_parse_port_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="bad port"):
        parse_port(text)


def test_parse_port_names_what_it_parses() -> None:
    with pytest.raises(ConfigError, match=r"^bad -D port 'x': expected a number from 1 to 65535$"):
        parse_port("x", what="-D port")


# Regressions (fixed in 1fbb3b9): int() refuses strings of more than 4300 digits with a
# ValueError, and str.isdecimal() accepted digits of every script.
@pytest.mark.parametrize(
    "text", ["9" * 5000, "1" * 4301, "100000"], ids=["5000-nines", "4301-ones", "six-digits"]
)
def test_parse_port_long_digit_strings_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="expected a number from 1 to 65535"):
        parse_port(text)


@pytest.mark.parametrize(
    "text", ["0" * 5000, "0" * 4299 + "22"], ids=["5000-zeros", "zeros-then-22"]
)
def test_parse_port_long_leading_zeros_do_not_crash(text: str) -> None:
    # ssh(1) (strtonum) reads leading zeros as a number: 22 and 0 (allowed for -D).
    assert parse_port(text, allow_zero=True) == int(text.lstrip("0") or "0")


@pytest.mark.parametrize(
    "text", ["١٠٨٠", "１０８０", "²"], ids=["arabic-indic", "fullwidth", "sup"]
)
def test_parse_port_rejects_non_ascii_digits(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_port(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=12), allow_zero=st.booleans())
def test_parse_port_returns_a_port_or_raises_config_error(text: str, allow_zero: bool) -> None:
    try:
        port = parse_port(text, allow_zero=allow_zero)
    except ConfigError:
        return
    assert isinstance(port, int)
    assert (0 if allow_zero else 1) <= port <= 65535


@settings(max_examples=300, deadline=None)
@given(port=st.integers(1, 65535), zeros=st.integers(0, 3))
def test_parse_port_accepts_every_port(port: int, zeros: int) -> None:
    assert parse_port("0" * zeros + str(port)) == port


# ---- seconds, yes/no, host key policy ----


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1.0), ("0.5", 0.5), ("30", 30.0), (" 15 ", 15.0), ("1e3", 1000.0)],
    ids=["int", "fraction", "thirty", "spaces", "exponent"],
)
def test_parse_seconds(value: str, expected: float) -> None:
    assert parse_seconds("ConnectTimeout", value) == expected


@pytest.mark.parametrize(
    "value",
    ["0", "0.0", "-0", "-1", "nan", "NaN", "inf", "-inf", "Infinity", "1e400", "abc", "", "5s"],
)
def test_parse_seconds_errors(value: str) -> None:
    with pytest.raises(ConfigError, match=f"bad value {value!r} for ConnectTimeout"):
        parse_seconds("ConnectTimeout", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("yes", True), ("YES", True), ("true", True), ("no", False), ("No", False),
     ("false", False)],
)  # fmt: skip
def test_parse_yes_no(value: str, expected: bool) -> None:
    assert parse_yes_no("Compression", value) is expected


@pytest.mark.parametrize("value", ["", "y", "1", "maybe"])
def test_parse_yes_no_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="for Compression: expected yes or no"):
        parse_yes_no("Compression", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("yes", HostKeyPolicy.YES),
        ("no", HostKeyPolicy.NO),
        ("ask", HostKeyPolicy.ASK),
        ("accept-new", HostKeyPolicy.ACCEPT_NEW),
        ("Accept-New", HostKeyPolicy.ACCEPT_NEW),
        ("YES", HostKeyPolicy.YES),
        ("true", HostKeyPolicy.YES),
        ("on", HostKeyPolicy.YES),
        ("false", HostKeyPolicy.NO),
        ("off", HostKeyPolicy.NO),
    ],
)
def test_parse_host_key_policy(value: str, expected: HostKeyPolicy) -> None:
    assert parse_host_key_policy(value) is expected


@pytest.mark.parametrize("value", ["", "maybe", "accept_new", "acceptnew", " yes"])
def test_parse_host_key_policy_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="expected yes, no, ask or accept-new"):
        parse_host_key_policy(value)


# ---- other -o values ----


@pytest.mark.parametrize(
    ("value", "low", "expected"),
    [("0", 0, 0), ("3", 1, 3), ("007", 0, 7), ("999999999", 0, 999_999_999)],
    ids=["zero", "three", "leading-zeros", "nine-digits"],
)
def test_parse_count(value: str, low: int, expected: int) -> None:
    assert parse_count("ServerAliveCountMax", value, low=low) == expected


@pytest.mark.parametrize(
    ("value", "low"),
    [("0", 1), ("-1", 0), ("1.5", 0), ("", 0), ("1" * 10, 0), ("9" * 5000, 0), ("٣", 0)],
    ids=["below-low", "negative", "fraction", "empty", "ten-digits", "huge", "non-ascii"],
)
def test_parse_count_errors(value: str, low: int) -> None:
    with pytest.raises(ConfigError, match=f"expected a whole number >= {low}"):
        parse_count("ServerAliveCountMax", value, low=low)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), (" 0 ", 0.0), ("15", 15.0), ("0.5", 0.5)],
    ids=["off", "off-spaced", "fifteen", "half"],
)
def test_parse_interval(value: str, expected: float) -> None:
    assert parse_interval("ServerAliveInterval", value) == expected


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "x", ""])
def test_parse_interval_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="for ServerAliveInterval"):
        parse_interval("ServerAliveInterval", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("any", AddressFamily.ANY), ("inet", AddressFamily.INET), ("INET6", AddressFamily.INET6)],
)
def test_parse_address_family(value: str, expected: AddressFamily) -> None:
    assert parse_address_family(value) is expected


@pytest.mark.parametrize("value", ["", "ipv4", "inet4", "6"])
def test_parse_address_family_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="expected any, inet or inet6"):
        parse_address_family(value)


@pytest.mark.parametrize(
    "value",
    [
        "aes128-gcm@openssh.com",
        "aes128-ctr,aes256-ctr",
        "+ssh-rsa",
        "-3des-cbc",
        "^chacha20-poly1305@openssh.com",
        "hmac-sha2-*",
    ],
    ids=["one", "list", "append", "remove", "prepend", "wildcard"],
)
def test_parse_algorithms(value: str) -> None:
    assert parse_algorithms("Ciphers", value) == value


@pytest.mark.parametrize(
    "value",
    ["", "+", "a,,b", "a b", "a,", "aes;rm"],
    ids=["empty", "sign-only", "empty-item", "space", "trailing-comma", "semicolon"],
)
def test_parse_algorithms_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="for Ciphers: expected a comma-separated list"):
        parse_algorithms("Ciphers", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("publickey", ("publickey",)),
        ("publickey,password", ("publickey", "password")),
        (" keyboard-interactive , password ", ("keyboard-interactive", "password")),
        ("gssapi-with-mic,hostbased", ("gssapi-with-mic", "hostbased")),
    ],
    ids=["one", "two", "spaces", "accepted-but-unused"],
)
def test_parse_preferred_auth(value: str, expected: tuple[str, ...]) -> None:
    assert parse_preferred_auth(value) == expected


@pytest.mark.parametrize("value", ["", ",", "pubkey", "publickey,kerberos"])
def test_parse_preferred_auth_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="PreferredAuthentications"):
        parse_preferred_auth(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", ()),
        ("NONE", ()),
        ("jump", (Destination("jump"),)),
        (
            "me@jump1:2222,[2001:db8::1]",
            (Destination("jump1", "me", 2222), Destination("2001:db8::1")),
        ),
    ],
    ids=["none", "none-upper", "one", "two"],
)
def test_parse_jump_hosts(value: str, expected: tuple[Destination, ...]) -> None:
    assert parse_jump_hosts(value) == expected


@pytest.mark.parametrize("value", ["", "a,,b", "jump:0", "http://jump"])
def test_parse_jump_hosts_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="bad"):
        parse_jump_hosts(value)


# ---- merging forwards ----


def test_merge_forwards_drops_repeats_and_keeps_order() -> None:
    a, b, c = Forward(None, 1080), Forward("", 1080), Forward("::1", 1081)
    assert merge_forwards([a, b, a, c, b, a]) == (a, b, c)
    assert merge_forwards([c, a]) == (c, a)
    assert merge_forwards([]) == ()


def test_merge_forwards_keeps_same_port_on_different_addresses() -> None:
    forwards = [parse_forward(text) for text in ("1080", "localhost:1080", "*:1080", ":1080")]
    assert merge_forwards(forwards) == (
        Forward(None, 1080),
        Forward("localhost", 1080),
        Forward("", 1080),
    )
