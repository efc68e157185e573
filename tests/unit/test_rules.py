"""Destination rules (``--allow`` / ``--deny``): the parser's table, first match wins
across both actions, names against globs only and addresses against CIDR blocks and
exact addresses only, and a property that checking never raises.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.errors import ConfigError
from tunnel.names import BadName, normalize_host
from tunnel.rules import Action, Rule, Rules, parse_rule, parse_rules

ALLOW = Action.ALLOW
DENY = Action.DENY
ALL_PORTS = (0, 65535)


@dataclass(frozen=True)
class Parsed:
    text: str
    glob: str | None = None
    network: str | None = None
    ports: tuple[int, int] = ALL_PORTS


PARSED = [
    Parsed("*.internal", glob="*.internal"),
    Parsed("db.internal:5432", glob="db.internal", ports=(5432, 5432)),
    Parsed("*:1-1023", glob="*", ports=(1, 1023)),
    Parsed("*", glob="*"),
    Parsed("*:*", glob="*"),
    Parsed("host:0", glob="host", ports=(0, 0)),
    Parsed("host:65535", glob="host", ports=(65535, 65535)),
    Parsed("host:0-65535", glob="host"),
    Parsed("Example.COM", glob="example.com"),
    Parsed("example.com.", glob="example.com"),
    Parsed("web-?.corp", glob="web-?.corp"),
    Parsed("db[12].corp", glob="db[12].corp"),
    Parsed("  padded.example  ", glob="padded.example"),
    Parsed("10.0.0.0/8", network="10.0.0.0/8"),
    Parsed("10.1.2.3/8", network="10.0.0.0/8"),  # host bits are dropped, not an error
    Parsed("10.0.0.0/8:22", network="10.0.0.0/8", ports=(22, 22)),
    Parsed("fd00::/8", network="fd00::/8"),
    Parsed("[fd00::]/8:443", network="fd00::/8", ports=(443, 443)),
    Parsed("[fd00::]/8", network="fd00::/8"),
    Parsed("192.0.2.7", glob="192.0.2.7"),
    Parsed("192.0.2.7:80-81", glob="192.0.2.7", ports=(80, 81)),
    Parsed("[::1]:22", glob="::1", ports=(22, 22)),
    Parsed("[::1]", glob="::1"),
    Parsed("::1", glob="::1"),
    Parsed("[0:0:0:0:0:0:0:1]:22", glob="::1", ports=(22, 22)),
    Parsed("2001:DB8::1", glob="2001:db8::1"),
    # Patterns in the normal form of the hosts they meet (tunnel.names).
    Parsed("ｌｏｃａｌｈｏｓｔ", glob="localhost"),
    Parsed("bücher.example:443", glob="xn--bcher-kva.example", ports=(443, 443)),
    Parsed("*.bücher.example", glob="*.xn--bcher-kva.example"),
    Parsed("１２７.０.０.１", glob="127.0.0.1"),
    Parsed("127.1", glob="127.0.0.1"),
    Parsed("１２７.０.０.０/８", network="127.0.0.0/8"),
    # An IPv4-mapped block is the IPv4 block it maps.
    Parsed("::ffff:10.0.0.0/104", network="10.0.0.0/8"),
    Parsed("[::ffff:10.0.0.0]/104:22", network="10.0.0.0/8", ports=(22, 22)),
    Parsed("::ffff:0:0/96", network="0.0.0.0/0"),
    Parsed("::/0", network="::/0"),
]


@pytest.mark.parametrize("case", PARSED, ids=[c.text.strip() for c in PARSED])
@pytest.mark.parametrize("action", [ALLOW, DENY])
def test_parse_rule(case: Parsed, action: Action) -> None:
    rule = parse_rule(action, case.text)
    assert rule.action is action
    assert rule.text == case.text
    assert rule.glob == case.glob
    expected_network = None if case.network is None else ipaddress.ip_network(case.network)
    assert rule.network == expected_network
    assert rule.ports == case.ports
    assert str(rule) == f"--{action.value} {case.text}"


BAD_RULES = [
    ("empty", "", "empty --deny rule"),
    ("blank", "   ", "empty --deny rule"),
    ("port-too-big", "host:99999", "0-65535"),
    ("port-six-digits", "host:123456", "N or N-M"),
    ("range-backwards", "host:5-1", "low to high"),
    ("port-name", "host:ssh", "N or N-M"),
    ("port-empty", "host:", "N or N-M"),
    ("port-negative", "host:-5", "N or N-M"),
    ("range-open", "host:1-", "N or N-M"),
    ("prefix-too-long", "10.0.0.0/99", "not a CIDR block"),
    ("cidr-garbage", "10.0.0.x/8", "not a CIDR block"),
    ("cidr-v6-prefix-too-long", "[fd00::]/129", "not a CIDR block"),
    ("space-in-host", "bad host!", "not a host name"),
    ("slash-in-name", "a/b", "not a CIDR block"),
    ("missing-bracket", "[::1", "missing ']'"),
    ("junk-after-bracket", "[::1]x", "[address]:port"),
    ("empty-brackets", "[]", "not a host name"),
    ("control-character", "evil\x1b.example", "control character"),
    ("empty-label", "a..b", "empty label"),
    ("unicode-in-a-glob-label", "*ü.example", "A-label"),
    ("disallowed-unicode", "⒈.example", "not a valid international name"),
]


@pytest.mark.parametrize(
    ("text", "words"), [c[1:] for c in BAD_RULES], ids=[c[0] for c in BAD_RULES]
)
def test_parse_rule_refuses(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rule(DENY, text)
    assert words in str(info.value)
    if text.strip():
        # The message names the rule as it was written.
        assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["host:２２", "host:٢٢", "host:1-٩"])
def test_rule_ports_are_ascii_digits_only(text: str) -> None:
    # Regression: \\d took any Unicode digit, so "host:２２" meant port 22.
    with pytest.raises(ConfigError):
        parse_rule(DENY, text)


def test_parse_rules_keeps_command_line_order() -> None:
    rules = parse_rules([(DENY, "a"), (ALLOW, "b"), (DENY, "c")])
    assert [(r.action, r.text) for r in rules.rules] == [(DENY, "a"), (ALLOW, "b"), (DENY, "c")]


def test_parse_rules_fails_on_the_first_bad_rule() -> None:
    with pytest.raises(ConfigError, match="host:5-1"):
        parse_rules([(ALLOW, "ok.example"), (DENY, "host:5-1")])


# ---- Rules.check: first match wins ------------------------------------------------------


def rules(*specs: tuple[Action, str]) -> Rules:
    return parse_rules(list(specs))


def verdict(ruleset: Rules, host: str, port: int) -> str | None:
    """The matching rule as the command line spelled it, or None (allowed by default)."""
    rule = ruleset.check(host, port)
    return None if rule is None else str(rule)


def test_no_rules_allows_everything() -> None:
    assert Rules().check("example.com", 80) is None
    assert Rules().denies("10.0.0.1", 22) is None


def test_first_match_wins_allow_before_deny() -> None:
    ruleset = rules((ALLOW, "db.internal:5432"), (DENY, "*.internal"))
    assert verdict(ruleset, "db.internal", 5432) == "--allow db.internal:5432"
    assert ruleset.denies("db.internal", 5432) is None
    assert verdict(ruleset, "db.internal", 22) == "--deny *.internal"
    assert str(ruleset.denies("db.internal", 22)) == "--deny *.internal"
    assert verdict(ruleset, "web.internal", 80) == "--deny *.internal"
    assert verdict(ruleset, "example.com", 80) is None


def test_first_match_wins_deny_before_allow() -> None:
    ruleset = rules((DENY, "*.internal"), (ALLOW, "db.internal:5432"))
    assert verdict(ruleset, "db.internal", 5432) == "--deny *.internal"


def test_deny_star_last_makes_an_allowlist() -> None:
    ruleset = rules(
        (ALLOW, "*.corp"),
        (ALLOW, "10.0.0.0/8"),
        (ALLOW, "[::1]:22"),
        (DENY, "*"),
    )
    assert ruleset.denies("git.corp", 443) is None
    assert ruleset.denies("10.20.30.40", 80) is None
    assert ruleset.denies("::1", 22) is None
    for host, port in [
        ("example.com", 80),
        ("192.0.2.1", 80),
        ("::1", 23),
        ("2001:db8::1", 443),
        ("corp", 80),
    ]:
        assert str(ruleset.denies(host, port)) == "--deny *", (host, port)


def test_allow_only_rules_still_allow_the_rest() -> None:
    ruleset = rules((ALLOW, "*.corp"))
    assert verdict(ruleset, "git.corp", 22) == "--allow *.corp"
    assert ruleset.denies("example.com", 80) is None


def test_port_ranges_are_inclusive() -> None:
    ruleset = rules((DENY, "*:1-1023"))
    assert ruleset.denies("example.com", 0) is None
    assert ruleset.denies("example.com", 1) is not None
    assert ruleset.denies("example.com", 1023) is not None
    assert ruleset.denies("example.com", 1024) is None
    assert ruleset.denies("10.0.0.1", 22) is not None  # "*" covers addresses too


def test_names_never_match_cidr_rules() -> None:
    ruleset = rules((DENY, "127.0.0.0/8"), (DENY, "::1/128"), (DENY, "0.0.0.0/0"))
    for name in ("localhost", "ip6-localhost", "127.0.0.1.nip.io", "example.com"):
        assert ruleset.check(name, 80) is None, name


def test_cidr_rules_match_addresses() -> None:
    ruleset = rules((DENY, "10.0.0.0/8"), (DENY, "fd00::/8"), (DENY, "[2001:db8::]/32:443"))
    assert ruleset.denies("10.255.0.1", 80) is not None
    assert ruleset.denies("11.0.0.1", 80) is None
    assert ruleset.denies("fd12:3456::1", 80) is not None
    assert ruleset.denies("[fd12::1]", 80) is not None
    assert ruleset.denies("fe80::1", 80) is None
    assert ruleset.denies("2001:db8:1::5", 443) is not None
    assert ruleset.denies("2001:db8:1::5", 80) is None


def test_addresses_never_match_globs() -> None:
    ruleset = rules((DENY, "*.internal"), (DENY, "10.0.0.*"), (DENY, "192.0.2.?"))
    assert ruleset.check("10.0.0.1", 80) is None
    assert ruleset.check("192.0.2.7", 80) is None
    assert ruleset.check("::1", 80) is None
    assert ruleset.check("db.internal", 80) is not None


def test_exact_address_rules() -> None:
    ruleset = rules((DENY, "192.0.2.7"), (DENY, "[::1]:22"))
    assert ruleset.denies("192.0.2.7", 80) is not None
    assert ruleset.denies("192.0.2.70", 80) is None
    assert ruleset.denies("192.0.2.8", 80) is None
    assert ruleset.denies("::1", 22) is not None
    assert ruleset.denies("[::1]", 22) is not None
    assert ruleset.denies("0:0:0:0:0:0:0:1", 22) is not None
    assert ruleset.denies("::1", 23) is None
    # An address rule is not a name rule: a name spelling the address is not the address.
    assert ruleset.denies("192.0.2.7.example", 80) is None


def test_globs_are_case_insensitive() -> None:
    ruleset = rules((DENY, "*.Internal"), (DENY, "DB.example"))
    assert ruleset.denies("WEB.INTERNAL", 80) is not None
    assert ruleset.denies("web.internal", 80) is not None
    assert ruleset.denies("db.EXAMPLE", 80) is not None


def test_trailing_dot_is_ignored_on_both_sides() -> None:
    assert rules((DENY, "db.internal")).denies("db.internal.", 80) is not None
    assert rules((DENY, "db.internal.")).denies("db.internal", 80) is not None
    assert rules((DENY, "*.internal")).denies("web.internal.", 80) is not None


def test_globs_match_the_whole_name() -> None:
    ruleset = rules((DENY, "*.internal"), (DENY, "db.example"))
    assert ruleset.denies("internal", 80) is None
    assert ruleset.denies("x.internal.evil.com", 80) is None
    assert ruleset.denies("db.example.com", 80) is None
    assert ruleset.denies("mydb.example", 80) is None


@pytest.mark.parametrize(
    ("rule", "host"),
    [
        ("10.0.0.0/8", "::ffff:10.0.0.1"),
        ("127.0.0.1", "::ffff:127.0.0.1"),
        ("127.0.0.0/8:80", "[::ffff:7f00:1]"),
    ],
)
def test_ipv4_mapped_addresses_match_ipv4_rules(rule: str, host: str) -> None:
    # Regression: ::ffff:a.b.c.d slipped past IPv4 rules, yet sshd connects to a.b.c.d.
    assert rules((DENY, rule)).denies(host, 80) is not None


def test_a_rule_written_ipv4_mapped_means_the_ipv4_address() -> None:
    ruleset = rules((DENY, "[::ffff:192.0.2.7]:80"))
    assert ruleset.denies("192.0.2.7", 80) is not None
    assert ruleset.denies("::ffff:192.0.2.7", 80) is not None
    assert ruleset.denies("192.0.2.7", 81) is None


@pytest.mark.parametrize(
    "host", ["10.1.2.3", "::ffff:10.1.2.3", "[::ffff:a01:203]", "１０.１.２.３"]
)
def test_an_ipv4_mapped_block_matches_the_ipv4_addresses(host: str) -> None:
    # Regression: "::ffff:10.0.0.0/104" stayed an IPv6 block, while every address it
    # was matched with had been mapped to IPv4 already: it matched nothing.
    ruleset = rules((DENY, "::ffff:10.0.0.0/104"))
    assert ruleset.denies(host, 80) is not None
    assert ruleset.denies("11.0.0.1", 80) is None


def test_a_wider_ipv6_block_is_about_ipv6_only() -> None:
    # "::/0" means every IPv6 address; IPv4 (mapped or not) needs an IPv4 rule.
    ruleset = rules((DENY, "::/0"))
    assert ruleset.denies("2001:db8::1", 80) is not None
    assert ruleset.denies("10.0.0.1", 80) is None
    assert ruleset.denies("::ffff:10.0.0.1", 80) is None


def test_other_ipv6_addresses_do_not_match_ipv4_rules() -> None:
    ruleset = rules((DENY, "0.0.0.0/0"))
    for host in ("::1", "2001:db8::1", "::7f00:1", "64:ff9b::7f00:1"):
        assert ruleset.denies(host, 80) is None, host


def test_rule_matches_directly() -> None:
    rule = parse_rule(DENY, "db.internal:5432")
    assert isinstance(rule, Rule)
    assert rule.matches("db.internal", 5432)
    assert not rule.matches("db.internal", 5433)


# ---- properties ------------------------------------------------------------------------

RULE_TEXTS = [text.text for text in PARSED]

hosts = st.one_of(
    st.text(max_size=40),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.from_regex(r"[A-Za-z0-9.*?\[\]!-]{0,30}", fullmatch=True),
)


@settings(max_examples=300, deadline=None)
@given(
    chosen=st.lists(
        st.tuples(st.sampled_from([ALLOW, DENY]), st.sampled_from(RULE_TEXTS)), max_size=6
    ),
    host=hosts,
    port=st.one_of(st.integers(0, 65535), st.integers()),
)
def test_check_answers_or_refuses_the_name(
    chosen: list[tuple[Action, str]], host: str, port: int
) -> None:
    ruleset = parse_rules(chosen)
    try:
        normal = normalize_host(host)
    except BadName:
        # A name without a normal form is never matched (nor forwarded): the caller
        # refuses it, so checking it says so too.
        with pytest.raises(BadName):
            ruleset.check(host, port)
        return
    found = ruleset.check(host, port)
    if found is not None:
        # The answer is the first rule that matches the normal form, never a later one.
        first = next(r for r in ruleset.rules if r.matches(normal, port))
        assert found is first
    denied = ruleset.denies(host, port)
    assert denied is None or (denied is found and denied.action is DENY)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=30), st.from_regex(r"[\[\]0-9a-f:./*-]{0,20}")))
def test_parse_rule_only_raises_config_error(text: str) -> None:
    try:
        rule = parse_rule(ALLOW, text)
    except ConfigError:
        return
    assert (rule.glob is None) != (rule.network is None)
    assert 0 <= rule.ports[0] <= rule.ports[1] <= 65535


@pytest.mark.parametrize(
    "host", ["127.1", "2130706433", "0x7f.1", "0x7f000001", "127.0.1"], ids=str
)
def test_numeric_names_the_server_reads_as_addresses_meet_cidr_rules(host: str) -> None:
    # inet_aton forms: the SSH server's resolver turns these into 127.0.x.x.
    rules = parse_rules([(Action.DENY, "127.0.0.0/8")])
    assert rules.denies(host, 80) is not None


@pytest.mark.parametrize("host", ["127.example", "1e100", "0x7g.1", "1.2.3.4.5"], ids=str)
def test_names_that_only_look_numeric_stay_names(host: str) -> None:
    rules = parse_rules([(Action.DENY, "127.0.0.0/8"), (Action.DENY, "1.0.0.0/8")])
    assert rules.denies(host, 80) is None


@pytest.mark.parametrize(
    ("rule", "host"),
    [
        ("::1", "::1%1"),
        ("fe80::/10", "fe80::1%eth0"),
        ("127.0.0.0/8", "0.0.0.0"),
        ("127.0.0.0/8", "0"),
        ("::1", "::"),
    ],
    ids=str,
)
def test_scoped_and_unspecified_addresses_meet_the_rules(rule: str, host: str) -> None:
    # A zone id picks an interface, not another host; 0.0.0.0 and :: reach this host.
    assert parse_rules([(Action.DENY, rule)]).denies(host, 80) is not None
