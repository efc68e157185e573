"""HTTP/1.1 on the SOCKS port: the pure parts.

Parsing is h11's; this module decides what a request means for a proxy (CONNECT
authority, absolute-form URL, a request for the PAC file), which headers are hop-by-hop,
how a failed channel reads as an HTTP status, and what the PAC file says. The asyncio
side lives in :mod:`tunnel.proxy`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ReplyReason
from .names import BadName, normalize_host
from .rules import DIRECT, Action, Route, Rule

# RFC 9110 section 7.6.1 plus the proxy ones: never forwarded, whatever they say.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)

# The request line and headers together, as h11's max_incomplete_event_size counts them.
MAX_HEAD = 64 * 1024
HEAD_TOO_LARGE = "header section too large"
# Where h11 sees the end of a head: an empty line, CRLF or bare LF.
_END_OF_HEAD = re.compile(rb"\n\r?\n")

PAC_PATHS = frozenset({"/proxy.pac", "/wpad.dat"})
PAC_TYPE = b"application/x-ns-proxy-autoconfig"
REALM = "pytunnel"


class Kind(enum.Enum):
    CONNECT = "connect"
    FORWARD = "forward"
    PAC = "pac"
    LOCAL = "local"  # origin-form for pytunnel itself, other than the PAC file


@dataclass(frozen=True, slots=True)
class Target:
    kind: Kind
    host: str = ""
    port: int = 0
    path: bytes = b"/"


class BadTarget(ValueError):
    """The request target cannot be served; the message is the 400 body."""


def _port(text: str, default: int) -> int:
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise BadTarget(f"bad port {text!r}")
    return int(text)


def parse_target(method: bytes, target: bytes) -> Target:
    """What a request asks of the proxy, from its method and request target."""
    text = target.decode("ascii", errors="replace")
    if method == b"CONNECT":
        # authority-form: host:port, [v6]:port
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text:
            raise BadTarget("CONNECT needs host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise BadTarget("put an IPv6 address in brackets")
        return Target(Kind.CONNECT, _host(host), _port(port_text, 0))
    if text.startswith("/"):
        path = text.split("?", 1)[0]
        return Target(Kind.PAC if path in PAC_PATHS else Kind.LOCAL, path=target)
    try:
        parts = urlsplit(text)
        hostname, port = parts.hostname, parts.port
    except ValueError as exc:
        raise BadTarget(f"bad URL: {exc}") from None
    if parts.scheme.lower() != "http":
        raise BadTarget(
            f"only http:// URLs are forwarded; use CONNECT for {parts.scheme or 'this'}"
        )
    if not hostname:
        raise BadTarget("the URL has no host")
    if port == 0:
        raise BadTarget("port 0 in the URL")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(Kind.FORWARD, _host(hostname), port or 80, path.encode("ascii", errors="replace"))


def _host(host: str) -> str:
    """The host in the normal form the rules check and the server gets (tunnel.names)."""
    try:
        return normalize_host(host)
    except BadName as exc:
        raise BadTarget(f"bad host: {exc}") from None


def head_too_large(pending: bytes, limit: int = MAX_HEAD) -> bool:
    """Whether the request head at the start of ``pending`` is longer than ``limit``
    bytes, empty line included. h11 checks its limit only while a head is incomplete, so
    one that arrives whole in a single read would pass it at any size; this answers for
    a whole head too, from the first ``limit`` bytes alone (nothing beyond is scanned)."""
    if _END_OF_HEAD.search(pending, 0, limit) is not None:
        return False
    return len(pending) > limit


def forward_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers to pass on: without hop-by-hop ones, nor those the Connection header
    names (RFC 9110 section 7.6.1). With Transfer-Encoding, Content-Length goes too: an
    intermediary must not pass both (RFC 9112 section 6.3), or the next hop may read the
    body differently and take part of it for another request."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    if any(name.lower() == b"transfer-encoding" for name, _ in headers):
        named.add(b"content-length")
    return [
        (name, value)
        for name, value in headers
        if name.lower() not in HOP_BY_HOP and name.lower() not in named
    ]


# h11's error messages by how they begin, and what pytunnel says instead. Several of
# them end in the offending bytes (a header line with its credentials, a request line
# whose URL may carry a password), so a reason is only ever one of these fixed phrases:
# it may go to logs, events and the client, never the value itself.
_PROTOCOL_ERRORS = (
    ("illegal header line", "malformed header line"),
    ("continuation line at start of headers", "continuation line at start of headers"),
    ("Illegal header name", "illegal header name"),
    ("Illegal header value", "illegal header value"),
    ("illegal request line", "malformed request line"),
    ("no request line received", "no request line"),
    ("illegal status line", "malformed status line"),
    ("no response line received", "no status line"),
    ("Receive buffer too long", HEAD_TOO_LARGE),
    (HEAD_TOO_LARGE, HEAD_TOO_LARGE),  # ours, when head_too_large says so
    ("bad Content-Length", "bad Content-Length"),
    ("conflicting Content-Length headers", "conflicting Content-Length headers"),
    ("multiple Transfer-Encoding headers", "more than one Transfer-Encoding header"),
    ("Only Transfer-Encoding: chunked is supported", "Transfer-Encoding other than chunked"),
    ("Missing mandatory Host: header", "no Host header"),
    ("Found multiple Host: headers", "more than one Host header"),
    ("illegal chunk header", "malformed chunk header"),
    ("malformed chunk footer", "malformed chunk"),
    ("peer closed connection without sending complete message body", "body cut short"),
    ("peer unexpectedly closed connection", "closed in the middle of a message"),
)
UNKNOWN_PROTOCOL_ERROR = "malformed message"
PROTOCOL_ERROR_PHRASES = frozenset(
    [*(phrase for _, phrase in _PROTOCOL_ERRORS), UNKNOWN_PROTOCOL_ERROR]
)


def protocol_error_reason(message: str) -> str:
    """What may be said about an h11 error whose text is ``message``: a fixed phrase
    naming what was wrong, never any of the bytes that were wrong."""
    for prefix, phrase in _PROTOCOL_ERRORS:
        if message.startswith(prefix):
            return phrase
    return UNKNOWN_PROTOCOL_ERROR


def status_for(reason: ReplyReason) -> int:
    """The HTTP status that tells the truth about a failed channel."""
    if reason is ReplyReason.CONNECTION_NOT_ALLOWED:
        return 403
    if reason is ReplyReason.TTL_EXPIRED:
        return 504
    return 502


def check_basic(header: bytes | None, username: bytes, password: bytes) -> bool:
    """``Proxy-Authorization: Basic ...`` against the expected credentials, comparing in
    constant time so the answer's timing tells nothing about the secret."""
    expected = b"Basic " + base64.b64encode(username + b":" + password)
    if header is None:
        return hmac.compare_digest(expected, b"")
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return hmac.compare_digest(expected, b"")
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return hmac.compare_digest(expected, b"")
    user, _, secret = decoded.partition(b":")
    same_user = hmac.compare_digest(user, username)
    same_secret = hmac.compare_digest(secret, password)
    return same_user and same_secret


def basic_user(header: bytes | None) -> bytes | None:
    """The user name of ``Proxy-Authorization: Basic ...``, password unchecked (for
    ``--isolate`` without ``--proxy-auth``, where it is only an isolation key); None
    when there is no such header or it is not well-formed Basic."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, _ = decoded.partition(b":")
    return user if colon else None


def pac_file(
    listener: str,
    *,
    auth: bool = False,
    denied: Sequence[Rule] = (),
    routes: Sequence[Route] = (),
) -> bytes:
    """Everything through the tunnel; loopback and plain host names direct; and what the
    routes send ``direct``, where a PAC can say so.
    ``listener`` is host:port as the client reached us; ``auth``: the proxy wants a
    password; ``denied``: the --allow/--deny rules, ``routes``: the routes, in order.

    Only what is surely loopback goes DIRECT: ``localhost``, a dotted-quad literal in
    127.0.0.0/8 (checked octet by octet, so a name like ``127.example.com`` goes
    through the tunnel), ``::1``, and plain names (no dots, no colons). No dnsResolve,
    and isInNet only on an address literal: browsers answer those with a local DNS
    lookup for a name, which would leak the name the tunnel is meant to carry.

    The proxies: SOCKS5 (Chromium, and Firefox since 128, let the proxy resolve the
    name) and then PROXY (an HTTP proxy always gets the name). Never plain ``SOCKS``:
    both browsers read it as SOCKS4, which resolves names locally. With a password,
    PROXY alone: browsers ask for and send HTTP proxy Basic credentials, but cannot log
    in to a SOCKS5 proxy."""
    proxies = f"PROXY {listener}" if auth else f"SOCKS5 {listener}; PROXY {listener}"
    return (
        "function FindProxyForURL(url, host) {\n"
        "  var name = host.toLowerCase();\n"
        # Older isPlainHostName() calls any name without a dot plain, IPv6 literals too.
        '  var plain = isPlainHostName(name) && name.indexOf(":") == -1;\n'
        '  if (plain || name == "localhost" ||\n'
        "      /^127(\\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$/.test(name) ||\n"
        '      name == "::1" || name == "[::1]")\n'
        '    return "DIRECT";\n'
        f"{_pac_routes(denied, routes, proxies)}"
        f'  return "{proxies}";\n'
        "}\n"
    ).encode()


_V4 = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")
_PAC_GLOB = re.compile(r"[a-z0-9_.*?-]+")


def _pac_routes(denied: Sequence[Rule], routes: Sequence[Route], proxies: str) -> str:
    """The routes as PAC clauses, first match first: a ``direct`` route becomes DIRECT
    where the PAC can match exactly what the route matches (a host glob on names, an
    IPv4 block or address on IPv4 literals; no port part), and is left out otherwise
    (the proxy routes it direct itself). Every route or --deny before it that sends
    elsewhere goes to the proxy, matched generously (ports ignored, any IPv6 literal),
    so the PAC never sends DIRECT what the proxy would send elsewhere or refuse."""
    clauses: list[tuple[str, str]] = []
    allowed: list[str] = []  # earlier --allow rules a PAC can match exactly
    for rule in denied:
        if rule.action is Action.ALLOW:
            exact = _pac_match(rule, exact=True)
            if exact is not None:
                allowed.append(exact)
            continue
        condition = _pac_match(rule, exact=False) or "true"
        if allowed:
            # An --allow before it wins for what it matches: those may still go direct.
            condition = f"({condition}) && !({' || '.join(allowed)})"
        clauses.append((condition, proxies))
    for route in routes:
        if route.target == (DIRECT,):
            exact = _pac_match(route.rule, exact=True)
            if exact is not None:
                clauses.append((exact, "DIRECT"))
        else:
            clauses.append((_pac_match(route.rule, exact=False) or "true", proxies))
    # Proxy clauses after the last DIRECT say what the last line says anyway.
    while clauses and clauses[-1][1] != "DIRECT":
        clauses.pop()
    if not clauses:
        return ""
    head = (
        # The forms the routes see: no brackets, no trailing dot.
        '  if (name.charAt(0) == "[") name = name.substring(1, name.length - 1);\n'
        '  if (name.charAt(name.length - 1) == ".") name = name.substring(0, name.length - 1);\n'
        f"  var v4 = /^{_V4.pattern}$/.test(name);\n"
        '  var v6 = name.indexOf(":") != -1;\n'
    )
    return head + "".join(f'  if ({cond}) return "{answer}";\n' for cond, answer in clauses)


def _pac_match(rule: Rule, *, exact: bool) -> str | None:
    """A PAC condition on ``name`` for ``rule``: with ``exact``, one true for exactly the
    hosts the rule matches, or None where a PAC cannot say it; otherwise one true for
    at least those hosts (None: match everything)."""
    if rule.ports != (0, 65535) and exact:
        return None  # a PAC sees no port for most schemes
    if rule.network is not None:
        network = rule.network
        if isinstance(network, ipaddress.IPv4Network):
            inside = f'v4 && isInNet(name, "{network.network_address}", "{network.netmask}")'
            # 0.0.0.0 and IPv4-mapped literals are IPv4 addresses to the rules.
            return inside if exact else f'({inside}) || v6 || name == "0.0.0.0"'
        return None if exact else "v6"
    assert rule.glob is not None
    if rule.glob == "*":
        return "true"
    try:
        address = ipaddress.ip_address(rule.glob)
    except ValueError:
        address = None
    if address is not None:
        if address.version == 4:
            same = f'name == "{address}"'
            return same if exact else f'{same} || v6 || name == "0.0.0.0"'
        return f'name == "{address}"' if exact else "v6"
    glob = rule.glob.lower()
    if not _PAC_GLOB.fullmatch(glob):
        if exact:
            return None
        # A [class] matches one character: "?" matches at least as much.
        glob = re.sub(r"\[[^\]]*\]", "?", glob)
        if not _PAC_GLOB.fullmatch(glob):
            return None
    # A glob names hosts; the rules match an address only against an address.
    return f'!v4 && !v6 && shExpMatch(name, "{glob}")'
