"""Host names from the network in one normal form, and untrusted text made safe to show
(tunnel/names.py): tables byte by byte, and Hypothesis for what any input may be.
"""

from __future__ import annotations

import ipaddress
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.names import BadName, has_control, is_control, normalize_host, printable
from tunnel.rules import Action, parse_rules

# ---- normalize_host: the table -------------------------------------------------------

NORMAL_FORMS = [
    # (what a client sent, what the rules check and the server gets)
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("_sip._udp.example", "_sip._udp.example"),  # not IDNA-valid, but a real DNS name
    ("localhost", "localhost"),
    ("ｌｏｃａｌｈｏｓｔ", "localhost"),  # full-width letters
    ("LOCALHOST.", "localhost"),
    ("１２７.０.０.１", "127.0.0.1"),  # full-width digits
    ("127。0。0。1", "127.0.0.1"),  # ideographic full stop
    ("127．0．0．1", "127.0.0.1"),  # full-width full stop
    ("127｡0｡0｡1", "127.0.0.1"),  # half-width ideographic full stop
    ("１２７.０.０.１.", "127.0.0.1"),
    ("127.1", "127.0.0.1"),  # inet_aton forms: what the server's libc connects to
    ("0x7f.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("０ｘ７ｆ.１", "127.0.0.1"),
    ("08", "08"),  # no number for inet_aton: a name
    ("1.2.3.4.5", "1.2.3.4.5"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("ß.de", "xn--zca.de"),  # IDNA 2008, not transitional: not "ss.de"
    ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
    ("127.0.0.1", "127.0.0.1"),
    ("::1", "::1"),
    ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),  # literals as they are; the rules map them
    ("fe80::1%eth0", "fe80::1%eth0"),
    ("：：１", "::1"),  # full-width colons and digit
]


@pytest.mark.parametrize(("sent", "normal"), NORMAL_FORMS, ids=[n[0] for n in NORMAL_FORMS])
def test_normal_form(sent: str, normal: str) -> None:
    assert normalize_host(sent) == normal
    assert normalize_host(normal) == normal


BAD_NAMES = [
    ("empty", ""),
    ("only-a-dot", "."),
    ("empty-label", "a..b"),
    ("leading-dot", ".example"),
    ("two-trailing-dots", "example.."),
    ("newline", "evil.example\nforged line"),
    ("osc-title", "\x1b]0;pwned\x07.example"),
    ("csi", "a\x1b[2Jb"),
    ("tab", "a\tb"),
    ("del", "a\x7fb"),
    ("c1-csi", "a\x9bb"),
    ("bidi-override", "moc.\u202eexample"),
    ("zero-width-joiner", "a\u200db.example"),
    ("line-separator", "a\u2028b"),
    ("lone-surrogate", "a\udcffb"),
    ("disallowed", "⒈27.0.0.1"),  # U+2488 is disallowed by UTS 46
    ("leading-combining-mark", "\u0301a.example"),
    ("only-ignored", "\ufe00"),  # a variation selector maps to nothing
    ("fullwidth-empty-label", "a。。b"),
]


@pytest.mark.parametrize("name", [b[1] for b in BAD_NAMES], ids=[b[0] for b in BAD_NAMES])
def test_names_without_a_normal_form_are_refused(name: str) -> None:
    with pytest.raises(BadName) as info:
        normalize_host(name)
    message = str(info.value)
    # The refusal says why without quoting the name: nothing of it reaches a log.
    assert not has_control(message)
    if len(name) > 2:
        assert name not in message


@pytest.mark.parametrize(
    ("pattern", "normal"),
    [
        ("*.Example", "*.example"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("db[12].ｃｏｒｐ", "db[12].corp"),
        ("*。internal", "*.internal"),
    ],
)
def test_glob_patterns_keep_their_wildcards(pattern: str, normal: str) -> None:
    assert normalize_host(pattern, glob=True) == normal


def test_a_glob_label_with_unicode_must_be_written_otherwise() -> None:
    with pytest.raises(BadName, match="A-label"):
        normalize_host("*ü.example", glob=True)


# ---- normalize_host: properties ------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(name=st.text(max_size=40))
def test_normal_form_is_idempotent_ascii_and_clean(name: str) -> None:
    try:
        normal = normalize_host(name)
    except BadName:
        return
    assert normalize_host(normal) == normal
    assert not has_control(normal)
    assert normal == name or normal.isascii() or _is_literal(normal)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# The ways a client can spell an IPv4 address or "localhost" without ASCII.
_DIGITS = {str(d): (str(d), chr(0xFF10 + d), chr(0x1D7CE + d)) for d in range(10)}
_DOTS = (".", "\u3002", "\uff0e", "\uff61")


@st.composite
def spelled_addresses(draw: st.DrawFn, network: str) -> tuple[str, str]:
    block = ipaddress.ip_network(network)
    offset = draw(st.integers(0, block.num_addresses - 1))
    address = str(block.network_address + offset)
    spelled = ""
    for char in address:
        spelled += draw(st.sampled_from(_DOTS if char == "." else _DIGITS[char]))
    if draw(st.booleans()):
        spelled += draw(st.sampled_from(_DOTS))
    return address, spelled


@st.composite
def spelled_localhost(draw: st.DrawFn) -> str:
    out = ""
    for char in "localhost":
        out += draw(st.sampled_from((char, char.upper(), chr(ord(char) - 0x61 + 0xFF41))))
    return out


DENY_LOOPBACK = parse_rules([(Action.DENY, "127.0.0.0/8"), (Action.DENY, "localhost")])


@settings(max_examples=300, deadline=None)
@given(spelled=spelled_addresses("127.0.0.0/8"), port=st.integers(0, 65535))
def test_a_name_spelling_a_denied_address_is_denied(spelled: tuple[str, str], port: int) -> None:
    address, name = spelled
    assert normalize_host(name) == address
    assert DENY_LOOPBACK.denies(name, port) is not None


@settings(max_examples=200, deadline=None)
@given(name=spelled_localhost(), port=st.integers(0, 65535))
def test_any_spelling_of_a_denied_name_is_denied(name: str, port: int) -> None:
    assert DENY_LOOPBACK.denies(name, port) is not None


@settings(max_examples=200, deadline=None)
@given(spelled=spelled_addresses("10.0.0.0/8"))
def test_rules_written_in_unicode_match_the_same_hosts(spelled: tuple[str, str]) -> None:
    address, name = spelled
    ruleset = parse_rules([(Action.DENY, "１０.０.０.０/８"), (Action.DENY, "ｂüｃｈｅｒ.example")])
    assert ruleset.denies(address, 80) is not None
    assert ruleset.denies(name, 80) is not None
    assert ruleset.denies("xn--bcher-kva.example", 80) is not None
    assert ruleset.denies("Bücher.Example.", 80) is not None


# ---- printable: the table --------------------------------------------------------------

ESCAPES = [
    ("plain", "example.com", "example.com"),
    ("unicode-letters", "bücher 例え", "bücher 例え"),
    ("newline", "a\nb", "a\\x0ab"),
    ("carriage-return", "a\rb", "a\\x0db"),
    ("osc-title", "\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
    ("csi", "\x1b[31mred", "\\x1b[31mred"),
    ("nul", "\x00", "\\x00"),
    ("del", "\x7f", "\\x7f"),
    ("c1-csi", "\x9b2J", "\\x9b2J"),
    ("bidi-override", "\u202etxt.exe", "\\u202etxt.exe"),
    ("line-separator", "a\u2028b", "a\\u2028b"),
    ("tag-character", "\U000e0041", "\\U000e0041"),
    ("lone-surrogate", "\udcff", "\\udcff"),
    ("backslash", "a\\x0ab", "a\\x0ab"),  # as sent: escaping twice changes nothing
    ("rich-markup-is-text", "[bold]x[/]", "[bold]x[/]"),  # rich: the renderer's job
]


@pytest.mark.parametrize(("text", "shown"), [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_printable_keeps_what_it_is_told_to() -> None:
    banner = "Welcome\n\tto \x1b[2Jthe host\n"
    assert printable(banner, keep="\n\t") == "Welcome\n\tto \\x1b[2Jthe host\n"


@settings(max_examples=1000, deadline=None)
@given(text=st.text())
def test_printable_leaves_no_control_characters(text: str) -> None:
    shown = printable(text)
    assert not any(is_control(char) for char in shown)
    assert "\x1b" not in shown
    assert "\n" not in shown
    assert "\r" not in shown
    assert len(shown.splitlines()) <= 1
    # Nothing to escape: nothing changes; and escaping twice is escaping once (a name
    # escaped in a refusal's event is not escaped again by the renderer).
    if not has_control(text):
        assert shown == text
    assert printable(shown) == shown
    # Every character sent is still there, escaped or not: nothing is hidden.
    assert len(shown) >= len(text)


def test_is_control_covers_the_categories_terminals_act_on() -> None:
    for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)]:
        assert is_control(chr(code)), hex(code)
    for char in ("\u200b", "\u200e", "\u2066", "\u2069", "\ufeff", "\u2029"):
        assert is_control(char), unicodedata.name(char, hex(ord(char)))
    for char in (" ", "a", "ü", "例", "[", "\\"):
        assert not is_control(char)
