"""Destination rules: ``--allow RULE`` / ``--deny RULE``, first match wins, default allow.

A rule is a host part and an optional port part::

    *.internal            a host glob (case-insensitive, matched against names only)
    10.0.0.0/8            a CIDR block (matched against addresses only)
    192.0.2.7  [::1]      an exact address
    db.internal:5432      with a port
    *:1-1023              any host, a port range
    [fd00::]/8:443        brackets around IPv6, as in URLs

Pure: no DNS. A name is never resolved to check a CIDR rule (the far end resolves it,
and a local lookup would leak it); write a host glob for names. Numeric forms the
server would read as an address (``127.1``, ``2130706433``, ``::ffff:10.0.0.1``,
``::1%1``) are treated as that address, and the unspecified addresses (``0.0.0.0``,
``::``), which reach the server itself, as its loopback.

Hosts and patterns alike are first brought to :func:`tunnel.names.normalize_host`'s
form, so ``ｌｏｃａｌｈｏｓｔ`` and ``１２７。０。０。１`` meet the rules as ``localhost`` and
127.0.0.1, and ``--deny bücher.example`` matches its A-label. A CIDR block written as
IPv4-mapped IPv6 (``::ffff:10.0.0.0/104``) is the IPv4 block it maps.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .names import INET_ATON, BadName, normalize_host

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    ROUTE = "route"  # the rule part of a --route


@dataclass(frozen=True, slots=True)
class Rule:
    action: Action
    text: str
    glob: str | None = None
    network: IPNetwork | None = None
    ports: tuple[int, int] = (0, 65535)

    def matches(self, host: str, port: int) -> bool:
        if not self.ports[0] <= port <= self.ports[1]:
            return False
        address = _address(host)
        if self.network is not None:
            return address is not None and address in self.network
        assert self.glob is not None
        if self.glob == "*":
            return True
        if address is not None:
            # A glob names hosts; an address matches only itself written out.
            return self.glob == str(address)
        return fnmatch.fnmatchcase(host, self.glob)

    def __str__(self) -> str:
        return f"--{self.action.value} {self.text}"


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names, if it is one, as the server will connect to it:
    ``::ffff:a.b.c.d`` is the IPv4 address it maps, a zone id (``fe80::1%eth0``) picks an
    interface, not another host, numeric forms like ``127.1`` are what inet_aton reads,
    and 0.0.0.0 and :: reach the server itself, so they count as its loopback."""
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if not INET_ATON.fullmatch(host):
            return None
        # Pure parsing, no lookup.
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            address = ipaddress.IPv6Address(str(address).partition("%")[0])
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
    if address.is_unspecified:
        return ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
    return address


_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_GLOB = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


def _parse_ports(text: str, rule: str) -> tuple[int, int]:
    if text == "*":
        return (0, 65535)
    match = _PORTS.fullmatch(text)
    if match is None:
        raise ConfigError(f"bad rule {rule!r}: ports are N or N-M")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if not 0 <= low <= high <= 65535:
        raise ConfigError(f"bad rule {rule!r}: ports must be 0-65535, low to high")
    return (low, high)


def parse_rule(action: Action, text: str) -> Rule:
    spec = text.strip()
    if not spec:
        raise ConfigError(f"empty --{action.value} rule")
    host, ports = spec, "*"
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise ConfigError(f"bad rule {text!r}: missing ']'")
        host, rest = spec[1:close], spec[close + 1 :]
        if rest.startswith("/"):
            prefix, _, after = rest[1:].partition(":")
            host, rest = f"{host}/{prefix}", f":{after}" if after else ""
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad rule {text!r}: expected [address]:port")
            ports = rest[1:]
    elif spec.count(":") == 1:
        host, _, ports = spec.partition(":")
    # Otherwise a bare IPv6 address or block: no port part.
    port_range = _parse_ports(ports, text)
    if "/" in host:
        base, _, prefix = host.partition("/")
        try:
            # Full-width digits and the like, as in names; the prefix is digits only.
            base = normalize_host(base)
            prefix = unicodedata.normalize("NFKC", prefix)
            network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
        except (ValueError, BadName):
            raise ConfigError(f"bad rule {text!r}: {host!r} is not a CIDR block") from None
        return Rule(action, text, network=_unmapped(network), ports=port_range)
    try:
        host = normalize_host(host, glob=True)
    except BadName as exc:
        raise ConfigError(
            f"bad rule {text!r}: {host!r} is not a host name, glob or address ({exc})"
        ) from None
    address = _address(host)
    if address is not None:
        return Rule(action, text, glob=str(address), ports=port_range)
    if not _GLOB.fullmatch(host):
        raise ConfigError(f"bad rule {text!r}: {host!r} is not a host name, glob or address")
    return Rule(action, text, glob=host, ports=port_range)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped block as the IPv4 block it maps: the addresses it is matched with
    are IPv4 by then (see :func:`_address`)."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        base = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((base, network.prefixlen - 96))
    return network


@dataclass(frozen=True, slots=True)
class Rules:
    rules: tuple[Rule, ...] = ()

    def check(self, host: str, port: int) -> Rule | None:
        """The first rule that matches, or None (no rule: allowed). The host is matched
        in its normal form; one that has none raises :class:`~tunnel.names.BadName`
        (callers normalise first, to forward that same form)."""
        host = normalize_host(host)
        for rule in self.rules:
            if rule.matches(host, port):
                return rule
        return None

    def denies(self, host: str, port: int) -> Rule | None:
        rule = self.check(host, port)
        return rule if rule is not None and rule.action is Action.DENY else None


def parse_rules(ordered: Sequence[tuple[Action, str]]) -> Rules:
    return Rules(tuple(parse_rule(action, text) for action, text in ordered))


def _plain(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP literal without zone id, IPv4-mapped addresses as IPv4; None for a name."""
    try:
        address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def same_host(first: str, second: str) -> bool:
    """Whether two address texts name the same host (``::ffff:127.0.0.1`` is
    ``127.0.0.1``); names only match themselves, case aside."""
    a, b = _plain(first), _plain(second)
    if a is None or b is None:
        return first.lower() == second.lower()
    return a == b


def is_loopback(host: str) -> bool:
    address = _plain(host)
    return host.lower() == "localhost" if address is None else address.is_loopback


def bind_peer_allowed(expected: str, peer: str) -> bool:
    """SOCKS BIND takes the connection only from the request's DST.ADDR (RFC 1928).
    0.0.0.0 or :: means the client does not know the address: any peer. A name cannot be
    compared without resolving it at the far end, so any peer too, except ``localhost``,
    which means loopback."""
    address = _plain(expected)
    if address is None:
        return is_loopback(peer) if expected.lower() == "localhost" else True
    return address.is_unspecified or same_host(expected, peer)


DIRECT = "direct"
REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Route:
    """``--route RULE=TARGET``: requests the rule matches go to ``target``: ``("direct",)``,
    ``("reject",)``, or SSH destinations as written, tried in order (failover).
    ``where`` says where it was given (``--route`` or ``FILE:LINE``), for messages."""

    rule: Rule
    target: tuple[str, ...]
    where: str

    @property
    def label(self) -> str:
        return ",".join(self.target)

    def __str__(self) -> str:
        return f"{self.where} {self.rule.text}={self.label}"


def parse_route(text: str, where: str, check_destination: Callable[[str], object]) -> Route:
    """One route. ``check_destination`` raises :class:`ConfigError` for a destination
    that is no ``[user@]host[:port]`` (the config room's parser; this room stays pure).
    A destination is an ssh_config alias or an address; ``direct`` and ``reject`` are
    words of their own, never hosts, and never part of a failover list (a tunnel that is
    down must not send anything direct)."""
    rule_text, eq, target_text = text.strip().partition("=")
    if not eq:
        raise ConfigError(f"{where}: bad route {text.strip()!r}: expected RULE=TARGET")
    try:
        rule = parse_rule(Action.ROUTE, rule_text.strip())
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    names = [name.strip() for name in target_text.split(",")]
    if not all(names):
        raise ConfigError(
            f"{where}: bad route {text.strip()!r}: TARGET is direct, reject or "
            "destinations separated by commas"
        )
    words = [name for name in names if name.lower() in (DIRECT, REJECT)]
    if words and len(names) > 1:
        raise ConfigError(
            f"{where}: bad route {text.strip()!r}: {words[0].lower()} stands alone "
            "(direct is never a fallback for a tunnel that is down)"
        )
    if words:
        return Route(rule, (words[0].lower(),), where)
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: bad route {text.strip()!r}: a destination is named twice")
    for name in names:
        try:
            check_destination(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return Route(rule, tuple(names), where)


def parse_routes_file(
    text: str, name: str, check_destination: Callable[[str], object]
) -> tuple[Route, ...]:
    """``--routes FILE``: one route per line; blank lines and ``#`` comments (whole
    lines, or after whitespace) are skipped. Errors name FILE:LINE."""
    routes: list[Route] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw
        hash_at = next(
            (i for i, c in enumerate(line) if c == "#" and (i == 0 or line[i - 1].isspace())),
            None,
        )
        if hash_at is not None:
            line = line[:hash_at]
        if line.strip():
            routes.append(parse_route(line, f"{name}:{number}", check_destination))
    return tuple(routes)


@dataclass(frozen=True, slots=True)
class RoutedRules(Rules):
    """The rules for what goes through the command line's destination only (UDP): a
    datagram a route would send elsewhere is refused, since it has no other way out."""

    routes: tuple[Route, ...] = ()

    def denies(self, host: str, port: int) -> Rule | None:
        rule = self.check(host, port)
        if rule is not None and rule.action is Action.DENY:
            return rule
        host = normalize_host(host)
        return next((r.rule for r in self.routes if r.rule.matches(host, port)), None)
