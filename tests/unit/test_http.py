"""HTTP on the SOCKS port, the pure parts: what a request target asks of the proxy,
which headers are hop-by-hop, the status that tells the truth about a failed channel,
Basic credentials and the PAC file.
"""

from __future__ import annotations

import base64

import h11
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tunnel.errors import ReplyReason
from tunnel.http import (
    HOP_BY_HOP,
    MAX_HEAD,
    PAC_PATHS,
    PROTOCOL_ERROR_PHRASES,
    BadTarget,
    Kind,
    Target,
    check_basic,
    forward_headers,
    head_too_large,
    pac_file,
    parse_target,
    protocol_error_reason,
    status_for,
)

# ---- parse_target ----------------------------------------------------------------------

GOOD_TARGETS: list[tuple[str, bytes, bytes, Target]] = [
    # CONNECT: authority-form
    ("connect-name", b"CONNECT", b"example.com:443", Target(Kind.CONNECT, "example.com", 443)),
    ("connect-ipv4", b"CONNECT", b"192.0.2.7:8080", Target(Kind.CONNECT, "192.0.2.7", 8080)),
    ("connect-ipv6", b"CONNECT", b"[2001:db8::1]:443", Target(Kind.CONNECT, "2001:db8::1", 443)),
    ("connect-ipv6-loopback", b"CONNECT", b"[::1]:22", Target(Kind.CONNECT, "::1", 22)),
    ("connect-port-1", b"CONNECT", b"h:1", Target(Kind.CONNECT, "h", 1)),
    ("connect-port-65535", b"CONNECT", b"h:65535", Target(Kind.CONNECT, "h", 65535)),
    # The host in the normal form the rules check and the server gets (tunnel.names).
    (
        "connect-normal-form",
        b"CONNECT",
        b"Example.COM.:443",
        Target(Kind.CONNECT, "example.com", 443),
    ),
    ("connect-inet-aton", b"CONNECT", b"127.1:80", Target(Kind.CONNECT, "127.0.0.1", 80)),
    (
        "absolute-inet-aton",
        b"GET",
        b"http://0x7f.1/x",
        Target(Kind.FORWARD, "127.0.0.1", 80, b"/x"),
    ),
    (
        "absolute-trailing-dot",
        b"GET",
        b"http://localhost.:8080/",
        Target(Kind.FORWARD, "localhost", 8080, b"/"),
    ),
    # absolute-form: forwarded in origin form
    (
        "absolute-default-port",
        b"GET",
        b"http://example.com/a/b",
        Target(Kind.FORWARD, "example.com", 80, b"/a/b"),
    ),
    (
        "absolute-with-port",
        b"GET",
        b"http://127.0.0.1:8080/big",
        Target(Kind.FORWARD, "127.0.0.1", 8080, b"/big"),
    ),
    (
        "absolute-query-kept",
        b"GET",
        b"http://example.com:81/search?q=a+b&x=%2F",
        Target(Kind.FORWARD, "example.com", 81, b"/search?q=a+b&x=%2F"),
    ),
    (
        "absolute-no-path",
        b"GET",
        b"http://example.com",
        Target(Kind.FORWARD, "example.com", 80, b"/"),
    ),
    (
        "absolute-query-without-path",
        b"GET",
        b"http://example.com?q=1",
        Target(Kind.FORWARD, "example.com", 80, b"/?q=1"),
    ),
    (
        "absolute-fragment-dropped",
        b"GET",
        b"http://example.com/p#frag",
        Target(Kind.FORWARD, "example.com", 80, b"/p"),
    ),
    (
        "absolute-ipv6",
        b"GET",
        b"http://[::1]:8080/x",
        Target(Kind.FORWARD, "::1", 8080, b"/x"),
    ),
    (
        "absolute-scheme-and-host-case",
        b"POST",
        b"HTTP://Example.COM/Path",
        Target(Kind.FORWARD, "example.com", 80, b"/Path"),
    ),
    (
        "absolute-empty-port-is-default",
        b"GET",
        b"http://example.com:/",
        Target(Kind.FORWARD, "example.com", 80, b"/"),
    ),
    # origin-form: pytunnel answers for itself
    ("pac", b"GET", b"/proxy.pac", Target(Kind.PAC, path=b"/proxy.pac")),
    ("wpad", b"GET", b"/wpad.dat", Target(Kind.PAC, path=b"/wpad.dat")),
    ("pac-with-query", b"GET", b"/proxy.pac?v=2", Target(Kind.PAC, path=b"/proxy.pac?v=2")),
    ("other", b"GET", b"/other", Target(Kind.LOCAL, path=b"/other")),
    ("root", b"GET", b"/", Target(Kind.LOCAL, path=b"/")),
    ("pac-prefix-only", b"GET", b"/proxy.pac.bak", Target(Kind.LOCAL, path=b"/proxy.pac.bak")),
    ("pac-case-sensitive", b"GET", b"/PROXY.PAC", Target(Kind.LOCAL, path=b"/PROXY.PAC")),
]


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [case[1:] for case in GOOD_TARGETS],
    ids=[case[0] for case in GOOD_TARGETS],
)
def test_parse_target(method: bytes, target: bytes, expected: Target) -> None:
    assert parse_target(method, target) == expected


BAD_TARGETS: list[tuple[str, bytes, bytes, str]] = [
    # (id, method, target, a word the 400 body must contain)
    ("connect-missing-port", b"CONNECT", b"example.com", "host:port"),
    ("connect-empty-port", b"CONNECT", b"example.com:", "host:port"),
    ("connect-missing-host", b"CONNECT", b":443", "host:port"),
    ("connect-port-zero", b"CONNECT", b"example.com:0", "port"),
    ("connect-port-too-big", b"CONNECT", b"example.com:65536", "port"),
    ("connect-port-name", b"CONNECT", b"example.com:https", "port"),
    ("connect-port-negative", b"CONNECT", b"example.com:-1", "port"),
    ("connect-port-non-ascii-digits", b"CONNECT", "h:٤٤٣".encode(), "port"),
    ("connect-unbracketed-ipv6", b"CONNECT", b"2001:db8::1:443", "brackets"),
    ("connect-unbracketed-ipv6-loopback", b"CONNECT", b"::1:22", "brackets"),
    ("https-absolute", b"GET", b"https://example.com/", "CONNECT"),
    ("ftp-absolute", b"GET", b"ftp://example.com/", "http://"),
    ("no-scheme", b"GET", b"example.com:80", "http://"),
    ("asterisk-form", b"OPTIONS", b"*", "http://"),
    ("no-host", b"GET", b"http:///path", "host"),
    ("bad-url-port", b"GET", b"http://example.com:99999/", "port"),
    ("url-port-name", b"GET", b"http://example.com:http/", "port"),
    # Hosts without a normal form (h11 lets no control byte or non-ASCII through; the
    # codec refuses them on its own all the same).
    ("connect-empty-label", b"CONNECT", b"a..example:443", "bad host"),
    ("connect-control", b"CONNECT", b"a\x1b]0;x\x07b:443", "control character"),
    ("connect-non-ascii", b"CONNECT", "bücher.example:443".encode(), "bad host"),
    ("absolute-empty-label", b"GET", b"http://a..example/", "bad host"),
]


@pytest.mark.parametrize(
    ("method", "target", "word"),
    [case[1:] for case in BAD_TARGETS],
    ids=[case[0] for case in BAD_TARGETS],
)
def test_parse_target_refuses(method: bytes, target: bytes, word: str) -> None:
    with pytest.raises(BadTarget) as info:
        parse_target(method, target)
    # The message is the 400 body: it must say what is wrong.
    assert word.lower() in str(info.value).lower()


def test_bad_target_is_a_value_error() -> None:
    assert issubclass(BadTarget, ValueError)


def test_absolute_url_port_zero_is_refused() -> None:
    # Regression: it used to become port 80 ("parts.port or 80").
    with pytest.raises(BadTarget, match="port 0"):
        parse_target(b"GET", b"http://example.com:0/")


@pytest.mark.parametrize("target", [b"http://[::1/", b"http://[zz]/", b"http://a]b/"])
def test_malformed_bracketed_host_is_a_bad_target(target: bytes) -> None:
    # Regression: urlsplit's own ValueError used to escape, and the client got no 400.
    with pytest.raises(BadTarget, match="bad URL"):
        parse_target(b"GET", target)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"CONNECT", b"POST", b"OPTIONS"]),
    target=st.one_of(
        st.binary(max_size=80),
        st.binary(max_size=40).map(lambda tail: b"http://" + tail),
        st.binary(max_size=40).map(lambda tail: b"http://[" + tail),
    ),
)
def test_parse_target_only_raises_bad_target(method: bytes, target: bytes) -> None:
    try:
        result = parse_target(method, target)
    except BadTarget:
        return
    if result.kind in (Kind.CONNECT, Kind.FORWARD):
        # Whatever is accepted names a host and a port a channel can be opened to.
        assert result.host
        assert 0 < result.port < 65536
    else:
        assert result.path.startswith(b"/")


# ---- forward_headers -------------------------------------------------------------------


def test_forward_headers_drops_every_hop_by_hop_header() -> None:
    headers = [
        (b"Host", b"example.com"),
        (b"Connection", b"keep-alive"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic Ym9iOnNlY3JldA=="),
        (b"Proxy-Authenticate", b'Basic realm="x"'),
        (b"TE", b"trailers"),
        (b"Trailer", b"Expires"),
        (b"Upgrade", b"websocket"),
        (b"Accept", b"*/*"),
    ]
    assert forward_headers(headers) == [(b"Host", b"example.com"), (b"Accept", b"*/*")]


def test_hop_by_hop_set_is_lower_case_and_complete() -> None:
    assert {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    } == HOP_BY_HOP


def test_forward_headers_drops_headers_named_in_connection_case_insensitively() -> None:
    headers = [
        (b"connection", b"close, X-Secret-Hop ,x-other"),
        (b"x-secret-hop", b"1"),
        (b"X-OTHER", b"2"),
        (b"X-Kept", b"3"),
    ]
    assert forward_headers(headers) == [(b"X-Kept", b"3")]


def test_forward_headers_honours_several_connection_headers() -> None:
    headers = [
        (b"Connection", b"X-A"),
        (b"CONNECTION", b"x-b"),
        (b"X-A", b"1"),
        (b"X-B", b"2"),
        (b"X-C", b"3"),
    ]
    assert forward_headers(headers) == [(b"X-C", b"3")]


def test_forward_headers_keeps_framing_and_host_in_order() -> None:
    headers = [
        (b"Host", b"example.com:8080"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Connection", b"keep-alive"),
    ]
    assert forward_headers(headers) == headers[:4]


def test_forward_headers_keeps_content_length_alone() -> None:
    headers = [(b"Host", b"h"), (b"Content-Length", b"5")]
    assert forward_headers(headers) == headers


def test_forward_headers_never_passes_both_framings() -> None:
    # RFC 9112 section 6.3: with Transfer-Encoding, Content-Length must not go on.
    headers = [(b"Content-Length", b"3"), (b"transfer-encoding", b"chunked")]
    assert forward_headers(headers) == [(b"transfer-encoding", b"chunked")]


def test_forward_headers_does_not_mutate_its_input() -> None:
    headers = [(b"Connection", b"close"), (b"Accept", b"*/*")]
    copy = list(headers)
    forward_headers(headers)
    assert headers == copy


def test_forward_headers_empty() -> None:
    assert forward_headers([]) == []


# ---- status_for ------------------------------------------------------------------------

STATUS = [
    (ReplyReason.CONNECTION_NOT_ALLOWED, 403),
    (ReplyReason.TTL_EXPIRED, 504),
    (ReplyReason.GENERAL_FAILURE, 502),
    (ReplyReason.NETWORK_UNREACHABLE, 502),
    (ReplyReason.HOST_UNREACHABLE, 502),
    (ReplyReason.CONNECTION_REFUSED, 502),
    (ReplyReason.COMMAND_NOT_SUPPORTED, 502),
    (ReplyReason.ADDRESS_TYPE_NOT_SUPPORTED, 502),
]


@pytest.mark.parametrize(("reason", "status"), STATUS, ids=[r.name for r, _ in STATUS])
def test_status_for(reason: ReplyReason, status: int) -> None:
    assert status_for(reason) == status


def test_status_table_covers_every_failure() -> None:
    assert {reason for reason, _ in STATUS} == set(ReplyReason) - {ReplyReason.SUCCEEDED}


# ---- check_basic -----------------------------------------------------------------------

USER = b"bob"
SECRET = b"s3cret:with:colons"


def basic(credentials: bytes, scheme: bytes = b"Basic") -> bytes:
    return scheme + b" " + base64.b64encode(credentials)


BASIC_CASES: list[tuple[str, bytes | None, bool]] = [
    ("right", basic(USER + b":" + SECRET), True),
    ("scheme-lower-case", basic(USER + b":" + SECRET, b"basic"), True),
    ("scheme-upper-case", basic(USER + b":" + SECRET, b"BASIC"), True),
    ("surrounding-space", b"  " + basic(USER + b":" + SECRET) + b"  ", True),
    ("wrong-user", basic(b"alice:" + SECRET), False),
    ("user-case-matters", basic(b"Bob:" + SECRET), False),
    ("wrong-password", basic(USER + b":wrong"), False),
    ("password-prefix", basic(USER + b":s3cret"), False),
    ("password-longer", basic(USER + b":" + SECRET + b"x"), False),
    ("empty-password", basic(USER + b":"), False),
    ("no-colon", basic(USER + SECRET), False),
    ("other-scheme", basic(USER + b":" + SECRET, b"Bearer"), False),
    ("digest-scheme", b"Digest username=" + USER, False),
    ("bad-base64", b"Basic !!!not-base64!!!", False),
    ("base64-bad-padding", b"Basic Ym9iOnM", False),
    ("no-token", b"Basic", False),
    ("empty", b"", False),
    ("missing", None, False),
]


@pytest.mark.parametrize(
    ("header", "ok"), [c[1:] for c in BASIC_CASES], ids=[c[0] for c in BASIC_CASES]
)
def test_check_basic(header: bytes | None, ok: bool) -> None:
    assert check_basic(header, USER, SECRET) is ok


@settings(max_examples=200, deadline=None)
@given(header=st.one_of(st.none(), st.binary(max_size=64)))
def test_check_basic_never_raises_on_garbage(header: bytes | None) -> None:
    token = base64.b64encode(USER + b":" + SECRET)
    assume(header is None or token not in header)
    assert check_basic(header, USER, SECRET) is False


@settings(max_examples=100, deadline=None)
@given(
    user=st.binary(min_size=1, max_size=40).filter(lambda u: b":" not in u),
    password=st.binary(min_size=1, max_size=40),
)
def test_check_basic_accepts_any_credentials_it_was_given(user: bytes, password: bytes) -> None:
    assert check_basic(basic(user + b":" + password), user, password)
    assert not check_basic(basic(user + b":" + password + b"!"), user, password)


# ---- protocol_error_reason -------------------------------------------------------------

LEAKED = b"c2VjcmV0LXBhc3N3b3Jk"  # what must never come out of a reason

# Requests h11 refuses, each carrying LEAKED where h11 quotes the bad bytes, and the
# phrase pytunnel says instead.
BROKEN_REQUESTS: list[tuple[str, bytes, str]] = [
    ("header-no-colon", b"Proxy-Authorization Basic " + LEAKED, "malformed header line"),
    ("header-space-before-colon", b"X-Token : " + LEAKED, "malformed header line"),
    (
        "header-nul-in-value",
        b"Proxy-Authorization: Basic " + LEAKED + b"\0",
        "malformed header line",
    ),
    ("header-cr-in-value", b"Cookie: a=" + LEAKED + b"\rb", "malformed header line"),
    ("bad-content-length", b"Content-Length: " + LEAKED, "bad Content-Length"),
    ("transfer-encoding", b"Transfer-Encoding: " + LEAKED, "Transfer-Encoding other than chunked"),
]


def h11_error(head: bytes, *, byte_by_byte: bool) -> h11.RemoteProtocolError:
    conn = h11.Connection(h11.SERVER)
    pieces = [head[i : i + 1] for i in range(len(head))] if byte_by_byte else [head]
    for piece in pieces:
        conn.receive_data(piece)
        try:
            while conn.next_event() is not h11.NEED_DATA:
                pass
        except h11.RemoteProtocolError as exc:
            return exc
    raise AssertionError(f"h11 accepted {head!r}")


@pytest.mark.parametrize(
    ("line", "phrase"),
    [(line, phrase) for _, line, phrase in BROKEN_REQUESTS],
    ids=[name for name, _, _ in BROKEN_REQUESTS],
)
@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "byte-by-byte"])
def test_protocol_error_reason_names_the_fault_not_the_bytes(
    line: bytes, phrase: str, byte_by_byte: bool
) -> None:
    head = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n" + line + b"\r\n\r\n"
    exc = h11_error(head, byte_by_byte=byte_by_byte)
    assert protocol_error_reason(str(exc)) == phrase
    assert LEAKED.decode() not in phrase


def test_protocol_error_reason_for_a_request_line_drops_the_url() -> None:
    exc = h11_error(
        b"GET http://user:" + LEAKED + b"@example.com/ HTTP/1.1 x\r\n\r\n", byte_by_byte=False
    )
    assert LEAKED.decode() in str(exc)  # h11 quotes it: the reason below must not
    assert protocol_error_reason(str(exc)) == "malformed request line"


@settings(max_examples=300, deadline=None)
@given(line=st.binary(max_size=80))
def test_protocol_error_reason_never_quotes_a_header_line(line: bytes) -> None:
    """Whatever the client puts around the secret, a refusal names only a fixed phrase."""
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + line.replace(b"\n", b" ") + LEAKED + b"\r\n\r\n"
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        conn.next_event()
    except h11.RemoteProtocolError as exc:
        reason = protocol_error_reason(str(exc))
        assert reason in PROTOCOL_ERROR_PHRASES
        assert LEAKED.decode() not in reason


@given(message=st.text(max_size=200))
def test_protocol_error_reason_is_always_a_fixed_phrase(message: str) -> None:
    assert protocol_error_reason(message) in PROTOCOL_ERROR_PHRASES


# ---- head_too_large --------------------------------------------------------------------

HEADS: list[tuple[str, bytes]] = [
    ("crlf", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"),
    ("bare-lf", b"GET / HTTP/1.1\nHost: h\nX-A: 1\n\n"),
    ("mixed", b"GET / HTTP/1.1\r\nHost: h\n\r\n"),
]


@pytest.mark.parametrize("head", [h for _, h in HEADS], ids=[n for n, _ in HEADS])
def test_head_too_large_counts_the_whole_head_with_its_empty_line(head: bytes) -> None:
    body = b"pipelined body and the next request, never counted" * 10
    assert not head_too_large(head + body, len(head))
    assert head_too_large(head + body, len(head) - 1)


@pytest.mark.parametrize("head", [h for _, h in HEADS], ids=[n for n, _ in HEADS])
def test_head_too_large_byte_by_byte(head: bytes) -> None:
    """Fed one byte more at a time, a head over the limit is refused as soon as it
    passes the limit, before its end has arrived; one within it never is."""
    limit = len(head) // 2
    verdicts = [head_too_large(head[:n], limit) for n in range(len(head) + 1)]
    assert verdicts == [n > limit for n in range(len(head) + 1)]
    assert not any(head_too_large(head[:n], len(head)) for n in range(len(head) + 1))


def test_head_too_large_default_limit_is_64_kib() -> None:
    assert MAX_HEAD == 64 * 1024
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD - 23) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD
    assert not head_too_large(head)
    assert head_too_large(head[:-4] + b"a\r\n\r\n")


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.binary(max_size=300).map(lambda v: v.replace(b"\n", b"")), max_size=8),
    limit=st.integers(min_value=1, max_value=2000),
    rest=st.binary(max_size=300),
)
def test_head_too_large_agrees_with_the_length_of_what_h11_parses(
    values: list[bytes], limit: int, rest: bytes
) -> None:
    """Whatever follows the head, the verdict is "the head h11 would take is longer
    than the limit"; h11 is the oracle for where the head ends."""
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-V: " + v + b"\r\n" for v in values) + b"\r\n"
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=10**6)
    conn.receive_data(head + rest)
    try:
        conn.next_event()
    except h11.RemoteProtocolError:
        pass
    else:
        taken = len(head + rest) - len(conn.trailing_data[0])
        assert taken == len(head)
    assert head_too_large(head + rest, limit) == (len(head) > limit)


# ---- pac_file --------------------------------------------------------------------------


def test_pac_file_sends_everything_through_the_listener() -> None:
    text = pac_file("127.0.0.1:1080").decode()
    assert text.startswith("function FindProxyForURL(url, host) {")
    # SOCKS5 then an HTTP proxy: both keep names for the far end. Never "SOCKS" alone,
    # which browsers take for SOCKS4 and resolve locally.
    assert 'return "SOCKS5 127.0.0.1:1080; PROXY 127.0.0.1:1080";' in text
    assert "SOCKS " not in text
    assert text.rstrip().endswith("}")


def test_pac_file_with_a_password_names_only_the_http_proxy() -> None:
    text = pac_file("127.0.0.1:1080", auth=True).decode()
    assert 'return "PROXY 127.0.0.1:1080";' in text
    assert "SOCKS" not in text


def test_pac_file_sends_loopback_and_plain_names_direct() -> None:
    text = pac_file("127.0.0.1:1080").decode()
    assert 'return "DIRECT";' in text
    for check in ("isPlainHostName(name)", 'name == "localhost"', 'name == "::1"'):
        assert check in text
    # No glob on names (127.example.com is a name), and nothing that makes the browser
    # look a name up locally.
    for unsafe in ("shExpMatch", "isInNet", "dnsResolve", "isResolvable"):
        assert unsafe not in text
    # DIRECT comes first, so loopback never goes through the tunnel.
    assert text.index('"DIRECT"') < text.index('"SOCKS5 ')


def test_pac_file_names_an_ipv6_listener_with_brackets() -> None:
    text = pac_file("[::1]:1080").decode()
    assert '"SOCKS5 [::1]:1080; PROXY [::1]:1080"' in text


def test_pac_file_is_ascii_and_balanced() -> None:
    raw = pac_file("127.0.0.1:9")
    assert raw.isascii()
    text = raw.decode()
    assert text.count("{") == text.count("}")
    assert text.count("(") == text.count(")")
    assert text.count('"') % 2 == 0


def test_pac_paths() -> None:
    assert frozenset({"/proxy.pac", "/wpad.dat"}) == PAC_PATHS
