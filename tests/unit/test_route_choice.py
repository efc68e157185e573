"""Routes: the parser of ``--route`` and ``--routes FILE`` (a table, errors naming where,
Hypothesis on untrusted file text), and the router's choice with fake upstreams:
allow/deny first, first matching route, failover in list order without waiting on a
destination known to be down, fail closed, and never direct as a fallback."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from fixtures.fake_upstream import FakeChannel, FakeUpstream
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.config import parse_destination
from tunnel.errors import ChannelOpenFailed, ConfigError, ReplyReason
from tunnel.router import Choice, Router, RouteWay
from tunnel.rules import (
    Action,
    RoutedRules,
    Rules,
    parse_route,
    parse_routes_file,
    parse_rules,
)
from tunnel.upstreams import Direct, Reject, Request


def route(text: str, where: str = "--route"):  # type: ignore[no-untyped-def]
    return parse_route(text, where, parse_destination)


@pytest.mark.parametrize(
    ("text", "target", "rule_text"),
    [
        ("*.lab=bastion-a", ("bastion-a",), "*.lab"),
        ("10.0.0.0/8=direct", ("direct",), "10.0.0.0/8"),
        ("*.ads.example=REJECT", ("reject",), "*.ads.example"),
        ("db.internal:5432=a, b ,c", ("a", "b", "c"), "db.internal:5432"),
        ("[fd00::]/8:443=user@host:2222", ("user@host:2222",), "[fd00::]/8:443"),
        ("*:1-1023=u@[::1]:22,b", ("u@[::1]:22", "b"), "*:1-1023"),
    ],
)
def test_route_table(text: str, target: tuple[str, ...], rule_text: str) -> None:
    parsed = route(text)
    assert parsed.target == target
    assert parsed.rule.text == rule_text
    assert parsed.rule.action is Action.ROUTE


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("*.lab", "expected RULE=TARGET"),
        ("*.lab=", "TARGET is direct, reject or destinations"),
        ("*.lab=a,,b", "TARGET is direct, reject or destinations"),
        ("*.lab=a,direct", "direct stands alone"),
        ("*.lab=reject,a", "reject stands alone"),
        ("*.lab=a,a", "named twice"),
        ("10.0.0.0/33=a", "not a CIDR block"),
        ("*.lab:99999=a", "ports must be 0-65535"),
        ("*.lab=a b", "bad destination"),
        ("=a", "empty"),
    ],
)
def test_bad_routes_say_why_and_where(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        route(text, "routes.txt:7")
    assert str(raised.value).startswith("routes.txt:7: ")
    assert says in str(raised.value)


def test_routes_file_skips_comments_and_blank_lines_and_keeps_order() -> None:
    text = "# lab first\n\n*.lab=a   # the lab\n  \n*=direct\n#*.x=reject\n"
    routes = parse_routes_file(text, "r", parse_destination)
    assert [(r.rule.text, r.target, r.where) for r in routes] == [
        ("*.lab", ("a",), "r:3"),
        ("*", ("direct",), "r:5"),
    ]


def test_routes_file_error_names_file_and_line() -> None:
    with pytest.raises(ConfigError, match=r"^r:2: "):
        parse_routes_file("*.a=direct\n*.b=\n", "r", parse_destination)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_routes_file_of_any_text_parses_or_says_where(text: str) -> None:
    message = ""
    routes = ()
    try:
        routes = parse_routes_file(text, "f", parse_destination)
    except ConfigError as exc:
        message = str(exc)
    assert not message or message.startswith("f:")
    for parsed in routes:
        assert parsed.target
        assert parsed.where.startswith("f:")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["*.lab", "10.0.0.0/8", "db.internal:5432", "*:443", "[::1]"]),
            st.sampled_from(["direct", "reject", "a", "a,b", "u@h:2222"]),
        ),
        max_size=6,
    ),
    st.lists(st.sampled_from(["", "# c", "   "]), max_size=6),
)
def test_routes_file_of_good_lines_reads_back_in_order(
    lines: list[tuple[str, str]], noise: list[str]
) -> None:
    text = "\n".join([*noise, *(f"{r} = {t}  # x" for r, t in lines)])
    routes = parse_routes_file(text, "f", parse_destination)
    assert [(r.rule.text, r.label) for r in routes] == [(r, t) for r, t in lines]


# -- the router -------------------------------------------------------------------------


@dataclass
class FakeStandby:
    """An SSH destination's state as the router sees it; ``settle`` comes up or fails as
    told, and counts how often it is asked (a wait a known-down one must not cost)."""

    name: str
    up: bool = False
    down: bool = False
    comes_up: bool = False
    settles: int = 0
    upstream: FakeUpstream = field(default_factory=FakeUpstream)

    @property
    def is_up(self) -> bool:
        return self.up

    @property
    def is_down(self) -> bool:
        return self.down

    async def settle(self) -> bool:
        self.settles += 1
        self.up = self.comes_up
        self.down = not self.comes_up
        return self.up

    async def wait_up(self, within: float) -> bool:
        return self.up

    async def open(self, request: Request, sink: object) -> FakeChannel:
        return await self.upstream.open(request, sink)  # type: ignore[arg-type]


def request(host: str = "web.lab", port: int = 443) -> Request:
    return Request(host, port, ("127.0.0.1", 5000), "socks5", None, "127.0.0.1:1080")


def router_with(
    *ways: tuple[str, Choice], rules: Rules | None = None
) -> tuple[Router, FakeUpstream]:
    default = FakeUpstream()
    default.name = "main"
    routed = [RouteWay(route(f"{rule}=x"), choice) for rule, choice in ways]
    return Router(rules or Rules(), default, routed, reconnect_wait=0), default


def test_first_matching_route_wins_and_the_rest_goes_to_the_default() -> None:
    lab = FakeStandby("lab", up=True)
    direct = Direct(1.0)
    router, default = router_with(
        ("*.lab:22", Choice("reject", Reject("r"))),
        ("*.lab", Choice("lab", standbys=(lab,))),
        ("*", Choice("direct", direct)),
    )
    assert router.choose(request("web.lab", 22)).label == "reject"
    assert router.choose(request("web.lab", 443)).label == "lab"
    assert router.choose(request("example.com")).upstream is direct
    empty, _ = router_with()
    assert empty.choose(request()).label == "main"
    _, label = asyncio.run(router.open_labelled(request("web.lab"), None))  # type: ignore[arg-type]
    assert label == "lab"
    assert lab.upstream.opened == [("web.lab", 443)]
    assert default.requests == []


def test_deny_comes_before_routes_and_allow_lets_routes_apply() -> None:
    lab = FakeStandby("lab", up=True)
    rules = parse_rules([(Action.ALLOW, "ok.lab"), (Action.DENY, "*.lab")])
    router, _ = router_with(("*.lab", Choice("lab", standbys=(lab,))), rules=rules)
    assert router.choose(request("x.lab")).label == "reject"
    assert router.choose(request("ok.lab")).label == "lab"


def test_reject_route_refuses_as_policy_with_the_route_in_the_reason() -> None:
    router, _ = router_with(
        ("*.ads", Choice("reject", Reject("rejected by route --route *.ads=reject")))
    )
    with pytest.raises(ChannelOpenFailed) as raised:
        asyncio.run(router.open_labelled(request("x.ads"), None))  # type: ignore[arg-type]
    assert raised.value.reason is ReplyReason.CONNECTION_NOT_ALLOWED
    assert raised.value.upstream == "reject"
    assert "*.ads" in str(raised.value)


def test_failover_prefers_the_first_that_is_up_and_skips_one_known_down() -> None:
    a = FakeStandby("a", down=True)
    b = FakeStandby("b", up=True)
    router, default = router_with(("*.lab", Choice("a,b", standbys=(a, b))))
    _, label = asyncio.run(router.open_labelled(request(), None))  # type: ignore[arg-type]
    assert label == "b"
    assert a.settles == 0  # known down: no wait
    a.down, a.up = False, True  # a is back
    _, label = asyncio.run(router.open_labelled(request(), None))  # type: ignore[arg-type]
    assert label == "a"
    assert default.requests == []


def test_failover_tries_a_never_started_destination_before_a_later_one() -> None:
    a = FakeStandby("a", comes_up=True)
    b = FakeStandby("b", up=True)
    router, _ = router_with(("*.lab", Choice("a,b", standbys=(a, b))))
    _, label = asyncio.run(router.open_labelled(request(), None))  # type: ignore[arg-type]
    assert (label, a.settles) == ("a", 1)


def test_failover_connects_the_next_when_the_first_fails_to_come_up() -> None:
    a = FakeStandby("a", comes_up=False)
    b = FakeStandby("b", comes_up=True)
    router, _ = router_with(("*.lab", Choice("a,b", standbys=(a, b))))
    _, label = asyncio.run(router.open_labelled(request(), None))  # type: ignore[arg-type]
    assert label == "b"
    assert b.upstream.opened == [("web.lab", 443)]


def test_all_down_fails_closed_never_default_never_direct() -> None:
    a = FakeStandby("a", down=True)
    b = FakeStandby("b", comes_up=False)
    router, default = router_with(("*.lab", Choice("a,b", standbys=(a, b))))
    with pytest.raises(ChannelOpenFailed) as raised:
        asyncio.run(router.open_labelled(request(), None))  # type: ignore[arg-type]
    assert raised.value.reason is ReplyReason.GENERAL_FAILURE
    assert raised.value.upstream == "a,b"
    assert "down" in str(raised.value)
    assert default.requests == []
    assert a.upstream.requests == b.upstream.requests == []


def test_bind_is_refused_where_a_route_sends_elsewhere() -> None:
    lab = FakeStandby("lab", up=True)
    router, _ = router_with(("*.lab", Choice("lab", standbys=(lab,))))
    with pytest.raises(ChannelOpenFailed) as raised:
        router.check(request("x.lab"))
    assert raised.value.reason is ReplyReason.CONNECTION_NOT_ALLOWED
    router.check(request("example.com"))  # the command line's destination: allowed


def test_udp_rules_refuse_what_a_route_sends_elsewhere() -> None:
    rules = RoutedRules(
        parse_rules([(Action.DENY, "*.bad")]).rules,
        (route("*.lab=a"), route("10.0.0.0/8=direct")),
    )
    assert rules.denies("x.bad", 53) is not None
    assert rules.denies("x.lab", 53) is not None
    assert rules.denies("10.1.2.3", 53) is not None
    assert rules.denies("example.com", 53) is None


def test_plain_lines_say_which_route_a_session_event_is_about() -> None:
    from tunnel import events
    from tunnel.ui import describe

    lost = describe(events.SessionLost("u@127.0.0.1:2222", "EOF", upstream="lab"))
    assert lost == ("route lab: lost u@127.0.0.1:2222: EOF", True)
    assert describe(events.SessionLost("u@h", "EOF")) == ("lost u@h: EOF", True)
