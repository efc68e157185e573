"""SOCKS4/4a/5 server codec: named hex vectors, replayed whole, byte by byte and split
in two at every offset, plus reply encoding and the codec's state rules.

Vector hex is written field by field (spaces are ignored by ``bytes.fromhex``) so that each
one can be checked against RFC 1928 and the SOCKS4/4a notes by eye.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from unit.socks_replay import (
    GREETING,
    IPV4,
    IPV6,
    METHOD_NO_AUTH,
    NAME,
    S4_FAIL,
    V4,
    V5,
    Outcome,
    bytewise,
    h,
    replay,
    two_way_splits,
)

from tunnel.errors import LocalProtocolError, RemoteProtocolError, ReplyReason
from tunnel.socks import (
    MAX_HOST_NAME,
    MAX_USER_ID,
    NEED_DATA,
    Command,
    Request,
    ServerConnection,
    SocksVersion,
    State,
    socks4_reply,
    socks5_reply,
)

METHOD_NONE_ACCEPTABLE = bytes.fromhex("05 ff")
S5_FAIL = bytes.fromhex("05 01 00 01 00000000 0000")
S5_CMD_NOT_SUPPORTED = bytes.fromhex("05 07 00 01 00000000 0000")
S5_ATYP_NOT_SUPPORTED = bytes.fromhex("05 08 00 01 00000000 0000")


@dataclass(frozen=True)
class Vector:
    name: str
    data: bytes
    request: Request | None = None
    # The RemoteProtocolError's reply; None when the vector must not raise.
    reply: bytes | None = None
    sent: bytes = b""
    trailing: bytes = b""

    @property
    def request_end(self) -> int:
        """Offset at which the codec must decide: just after the request (or the byte
        that breaks the protocol; error vectors end with that byte)."""
        return len(self.data) - len(self.trailing)

    def expected(self, decided_at: int | None = None) -> Outcome:
        """The replay outcome; the decision comes at ``request_end`` unless the bytes
        arrive in bigger pieces (then with the piece that completes the request)."""
        at = self.request_end if decided_at is None else decided_at
        if self.reply is not None:
            return Outcome((), self.sent, self.reply, None, State.CLOSED, at)
        assert self.request is not None
        return Outcome((self.request,), self.sent, None, self.trailing, State.AWAITING_DECISION, at)


LONG_NAME = "a" * 255
NAME_256 = "b" * 256
USER_255 = b"u" * MAX_USER_ID
USER_256 = b"u" * (MAX_USER_ID + 1)

VECTORS: list[Vector] = [
    # ---- SOCKS5 method selection (RFC 1928 section 3) ----
    Vector(
        "s5-greeting-no-auth-alone-ipv4-connect",
        h(GREETING, "05 01 00 01 c0000201 0050"),
        Request(V5, Command.CONNECT, IPV4, "192.0.2.1", 80),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-greeting-no-auth-among-others",
        h("05 03 02 01 00", "05 01 00 01 7f000001 1f90"),
        Request(V5, Command.CONNECT, IPV4, "127.0.0.1", 8080),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-greeting-no-auth-first-of-many",
        h("05 04 00 01 02 80", "05 01 00 01 0a000001 0016"),
        Request(V5, Command.CONNECT, IPV4, "10.0.0.1", 22),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-greeting-no-auth-absent",
        h("05 02 01 02"),
        reply=METHOD_NONE_ACCEPTABLE,
    ),
    Vector("s5-greeting-nmethods-zero", h("05 00"), reply=METHOD_NONE_ACCEPTABLE),
    Vector(
        "s5-greeting-255-methods-without-no-auth",
        bytes((5, 255, *range(1, 256))),
        reply=METHOD_NONE_ACCEPTABLE,
    ),
    # ---- SOCKS5 requests (RFC 1928 section 4) ----
    Vector(
        "s5-connect-ipv6",
        h(GREETING, "05 01 00 04 20010db8000000000000000000000001 01bb"),
        Request(V5, Command.CONNECT, IPV6, "2001:db8::1", 443),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-connect-ipv6-loopback",
        h(GREETING, "05 01 00 04 00000000000000000000000000000001 ffff"),
        Request(V5, Command.CONNECT, IPV6, "::1", 65535),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-connect-domain",
        h(GREETING, "05 01 00 03 0b", b"example.com".hex(), "0050"),
        Request(V5, Command.CONNECT, NAME, "example.com", 80),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-connect-domain-utf8",
        h(GREETING, "05 01 00 03 0a", "bücher.de".encode().hex(), "0050"),
        Request(V5, Command.CONNECT, NAME, "bücher.de", 80),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-connect-domain-255",
        h(GREETING, "05 01 00 03 ff", LONG_NAME.encode().hex(), "0050"),
        Request(V5, Command.CONNECT, NAME, LONG_NAME, 80),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-connect-port-zero",
        h(GREETING, "05 01 00 01 00000000 0000"),
        Request(V5, Command.CONNECT, IPV4, "0.0.0.0", 0),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-bind-parsed",
        h(GREETING, "05 02 00 01 c6336401 1388"),
        Request(V5, Command.BIND, IPV4, "198.51.100.1", 5000),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-udp-associate-parsed",
        h(GREETING, "05 03 00 01 00000000 0000"),
        Request(V5, Command.UDP_ASSOCIATE, IPV4, "0.0.0.0", 0),
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-pipelined-payload-kept",
        h(GREETING, "05 01 00 03 09", b"localhost".hex(), "1f90", b"GET / HTTP/1.0\r\n".hex()),
        Request(V5, Command.CONNECT, NAME, "localhost", 8080),
        sent=METHOD_NO_AUTH,
        trailing=b"GET / HTTP/1.0\r\n",
    ),
    Vector(
        "s5-pipelined-payload-with-zero-bytes",
        h(GREETING, "05 01 00 01 7f000001 0050", "00 05 01 00"),
        Request(V5, Command.CONNECT, IPV4, "127.0.0.1", 80),
        sent=METHOD_NO_AUTH,
        trailing=h("00 05 01 00"),
    ),
    Vector(
        "s5-unknown-command-04",
        h(GREETING, "05 04 00 01"),
        reply=S5_CMD_NOT_SUPPORTED,
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-unknown-command-00",
        h(GREETING, "05 00 00 01"),
        reply=S5_CMD_NOT_SUPPORTED,
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-unknown-atyp-02",
        h(GREETING, "05 01 00 02"),
        reply=S5_ATYP_NOT_SUPPORTED,
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-unknown-atyp-05",
        h(GREETING, "05 01 00 05"),
        reply=S5_ATYP_NOT_SUPPORTED,
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-nonzero-rsv",
        h(GREETING, "05 01 01 01"),
        reply=S5_FAIL,
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-request-version-4-after-greeting",
        h(GREETING, "04 01 00 01"),
        reply=S5_FAIL,
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-request-version-0-after-greeting",
        h(GREETING, "00 01 00 01"),
        reply=S5_FAIL,
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-domain-length-zero",
        h(GREETING, "05 01 00 03 00 0050"),
        reply=S5_FAIL,
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-domain-with-nul",
        h(GREETING, "05 01 00 03 05", b"ab\x00cd".hex(), "0050"),
        reply=S5_FAIL,
        sent=METHOD_NO_AUTH,
    ),
    Vector(
        "s5-domain-invalid-utf8",
        h(GREETING, "05 01 00 03 03 ff fe 61 0050"),
        reply=S5_FAIL,
        sent=METHOD_NO_AUTH,
    ),
    # ---- SOCKS4 ----
    Vector(
        "s4-connect-with-user-id",
        h("04 01 0050 c0000201", b"alice".hex(), "00"),
        Request(V4, Command.CONNECT, IPV4, "192.0.2.1", 80, b"alice"),
    ),
    Vector(
        "s4-connect-empty-user-id",
        h("04 01 1f90 7f000001 00"),
        Request(V4, Command.CONNECT, IPV4, "127.0.0.1", 8080),
    ),
    Vector(
        "s4-connect-user-id-255",
        h("04 01 0050 0a000001", USER_255.hex(), "00"),
        Request(V4, Command.CONNECT, IPV4, "10.0.0.1", 80, USER_255),
    ),
    Vector(
        # No NUL ever arrives: the codec must give up as soon as byte 256 of the field
        # arrives, with the SOCKS4 failure reply.
        "s4-user-id-256-without-nul",
        h("04 01 0050 0a000001", USER_256.hex()),
        reply=S4_FAIL,
    ),
    Vector(
        "s4-connect-address-0.0.0.0-is-not-4a",
        h("04 01 0050 00000000 00"),
        Request(V4, Command.CONNECT, IPV4, "0.0.0.0", 80),
    ),
    Vector(
        "s4-bind",
        h("04 02 1388 c6336401", b"bob".hex(), "00"),
        Request(V4, Command.BIND, IPV4, "198.51.100.1", 5000, b"bob"),
    ),
    Vector("s4-unknown-cd-03", h("04 03 0050 7f000001"), reply=S4_FAIL),
    Vector("s4-unknown-cd-00", h("04 00 0050 7f000001"), reply=S4_FAIL),
    Vector(
        "s4-pipelined-payload-kept",
        h("04 01 0050 7f000001 00", b"hello\x00".hex()),
        Request(V4, Command.CONNECT, IPV4, "127.0.0.1", 80),
        trailing=b"hello\x00",
    ),
    # ---- SOCKS4a ----
    Vector(
        "s4a-connect-host-name",
        h("04 01 0050 00000001", b"carol".hex(), "00", b"example.org".hex(), "00"),
        Request(V4, Command.CONNECT, NAME, "example.org", 80, b"carol"),
    ),
    Vector(
        "s4a-connect-empty-user-id-ff-marker",
        h("04 01 01bb 000000ff 00", b"example.org".hex(), "00"),
        Request(V4, Command.CONNECT, NAME, "example.org", 443),
    ),
    Vector(
        "s4a-host-name-255",
        h("04 01 0050 00000001 00", LONG_NAME.encode().hex(), "00"),
        Request(V4, Command.CONNECT, NAME, LONG_NAME, 80),
    ),
    Vector(
        "s4a-bind-host-name",
        h("04 02 0050 00000001 00", b"example.org".hex(), "00"),
        Request(V4, Command.BIND, NAME, "example.org", 80),
    ),
    Vector(
        "s4a-pipelined-payload-kept",
        h("04 01 0050 00000001 00", b"example.org".hex(), "00", b"PING".hex()),
        Request(V4, Command.CONNECT, NAME, "example.org", 80),
        trailing=b"PING",
    ),
    Vector("s4a-empty-host-name", h("04 01 0050 00000001 00 00"), reply=S4_FAIL),
    Vector(
        "s4a-host-name-256-without-nul",
        h("04 01 0050 00000001 00", NAME_256.encode().hex()),
        reply=S4_FAIL,
    ),
    Vector(
        "s4a-host-name-invalid-utf8",
        h("04 01 0050 00000001 00 c3 28 00"),
        reply=S4_FAIL,
    ),
    # ---- not SOCKS at all: nothing to answer, just close ----
    Vector("http-get", b"G", reply=b""),
    Vector("tls-client-hello", h("16"), reply=b""),
    Vector("zero-byte", h("00"), reply=b""),
    Vector("socks-version-6", h("06"), reply=b""),
]

# The error vectors above end on the byte that breaks the protocol; these inputs have
# more after it, which the codec must not need.
NOT_SOCKS: list[tuple[str, bytes]] = [
    ("http-get-full", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("tls-hello-record", h("16 03 01 00 2e 01 00 00 2a 03 03")),
]

IDS = [vector.name for vector in VECTORS]


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_in_one_piece(vector: Vector) -> None:
    assert replay([vector.data]) == vector.expected(decided_at=len(vector.data))


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_byte_by_byte(vector: Vector) -> None:
    # Byte by byte, the decision must come exactly at the end of the request: neither
    # before (a premature guess) nor after (the codec waiting for bytes it does not need).
    assert replay(bytewise(vector.data)) == vector.expected()


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_every_two_way_split(vector: Vector) -> None:
    for cut, chunks in two_way_splits(vector.data):
        decided_at = cut if cut >= vector.request_end else len(vector.data)
        assert replay(chunks) == vector.expected(decided_at), f"cut at {cut}"


@pytest.mark.parametrize(("name", "data"), NOT_SOCKS, ids=[name for name, _ in NOT_SOCKS])
def test_not_socks_is_refused_on_the_first_byte(name: str, data: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.reply == b""
    assert f"0x{data[0]:02x}" in str(caught.value)
    assert conn.state is State.CLOSED
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("s4-user-id", h("04 01 0050 0a000001")),
        ("s4a-host-name", h("04 01 0050 00000001 00")),
    ],
    ids=["s4-user-id", "s4a-host-name"],
)
def test_socks4_field_limit_is_enforced_before_any_nul(name: str, data: bytes) -> None:
    limit = MAX_USER_ID if name == "s4-user-id" else MAX_HOST_NAME
    conn = ServerConnection()
    conn.receive_data(data + b"x" * limit)
    assert conn.next_event() is NEED_DATA  # exactly at the limit: still waiting for NUL
    conn.receive_data(b"x")
    with pytest.raises(RemoteProtocolError, match=f"longer than {limit} bytes") as caught:
        conn.next_event()
    assert caught.value.reply == S4_FAIL


# ---- incremental details ----


def test_empty_input_needs_data() -> None:
    conn = ServerConnection()
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() is NEED_DATA
    assert conn.state is State.START
    assert conn.data_to_send() == b""


def test_method_selection_is_sent_as_soon_as_the_greeting_is_complete() -> None:
    conn = ServerConnection()
    conn.receive_data(h("05 02 02"))
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""
    conn.receive_data(h("00"))
    assert conn.next_event() is NEED_DATA
    assert conn.state is State.SOCKS5_REQUEST
    assert conn.data_to_send() == METHOD_NO_AUTH
    assert conn.data_to_send() == b"", "data_to_send() must drain its buffer"


def test_bytes_fed_after_the_request_become_trailing_data() -> None:
    conn = ServerConnection()
    conn.receive_data(h(GREETING, "05 01 00 01 7f000001 0050", "aa"))
    request = conn.next_event()
    assert isinstance(request, Request)
    assert conn.trailing_data == h("aa")
    conn.receive_data(h("bb cc"))
    assert conn.next_event() is NEED_DATA  # waiting for the proxy's decision
    assert conn.trailing_data == h("aa bb cc")
    conn.accept()
    assert conn.trailing_data == h("aa bb cc")


def test_sent_name_is_true_only_for_domain_names() -> None:
    assert Request(V5, Command.CONNECT, NAME, "example.com", 80).sent_name
    assert not Request(V5, Command.CONNECT, IPV4, "192.0.2.1", 80).sent_name
    assert not Request(V5, Command.CONNECT, IPV6, "::1", 80).sent_name


def test_need_data_is_a_named_singleton() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert type(NEED_DATA)() is NEED_DATA


# ---- reply encoding ----


def _awaiting(version: SocksVersion) -> ServerConnection:
    conn = ServerConnection()
    if version is V5:
        conn.receive_data(h(GREETING, "05 01 00 01 7f000001 0050"))
    else:
        conn.receive_data(h("04 01 0050 7f000001 00"))
    assert isinstance(conn.next_event(), Request)
    conn.data_to_send()
    return conn


def test_socks5_accept() -> None:
    conn = _awaiting(V5)
    assert conn.accept() == h("05 00 00 01 00000000 0000")
    assert conn.state is State.ACCEPTED


def test_socks4_accept() -> None:
    conn = _awaiting(V4)
    assert conn.accept() == h("00 5a 0000 00000000")
    assert conn.state is State.ACCEPTED


def test_socks5_accept_with_bound_address() -> None:
    assert _awaiting(V5).accept("192.0.2.7", 1080) == h("05 00 00 01 c0000207 0438")
    assert _awaiting(V5).accept("2001:db8::7", 1080) == h(
        "05 00 00 04 20010db8000000000000000000000007 0438"
    )


def test_socks4_accept_with_bound_address() -> None:
    assert _awaiting(V4).accept("192.0.2.7", 1080) == h("00 5a 0438 c0000207")


FAILURES = [reason for reason in ReplyReason if reason is not ReplyReason.SUCCEEDED]


@pytest.mark.parametrize("reason", FAILURES, ids=[reason.name for reason in FAILURES])
def test_socks5_reject(reason: ReplyReason) -> None:
    conn = _awaiting(V5)
    assert conn.reject(reason) == bytes((0x05, int(reason))) + h("00 01 00000000 0000")
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("reason", FAILURES, ids=[reason.name for reason in FAILURES])
def test_socks4_reject_is_always_91(reason: ReplyReason) -> None:
    conn = _awaiting(V4)
    assert conn.reject(reason) == h("00 5b 0000 00000000")
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (ReplyReason.SUCCEEDED, "05 00 00 01 00000000 0000"),
        (ReplyReason.CONNECTION_REFUSED, "05 05 00 01 00000000 0000"),
        (ReplyReason.ADDRESS_TYPE_NOT_SUPPORTED, "05 08 00 01 00000000 0000"),
    ],
    ids=["succeeded", "refused", "atyp"],
)
def test_socks5_reply_function(reason: ReplyReason, expected: str) -> None:
    assert socks5_reply(reason) == h(expected)


def test_reply_functions_with_addresses() -> None:
    assert socks5_reply(ReplyReason.SUCCEEDED, "::", 0) == h("05 00 00 04", "00" * 16, "0000")
    assert socks4_reply(ReplyReason.HOST_UNREACHABLE, "10.1.2.3", 22) == h("00 5b 0016 0a010203")
    assert socks4_reply(ReplyReason.SUCCEEDED) == h("00 5a 0000 00000000")


# ---- misuse of the codec is our bug: LocalProtocolError ----


@pytest.mark.parametrize(
    "feed",
    [b"", h("05 01 00"), h("05 01 00 05 01 00 01 7f"), h("04 01 0050 7f000001")],
    ids=["nothing", "greeting-only", "partial-s5-request", "s4-without-nul"],
)
def test_accept_or_reject_before_a_request(feed: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(feed)
    assert conn.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        conn.accept()
    with pytest.raises(LocalProtocolError):
        conn.reject(ReplyReason.GENERAL_FAILURE)
    with pytest.raises(LocalProtocolError):
        _ = conn.trailing_data


@pytest.mark.parametrize("version", [V4, V5], ids=["socks4", "socks5"])
def test_accept_twice(version: SocksVersion) -> None:
    conn = _awaiting(version)
    conn.accept()
    with pytest.raises(LocalProtocolError):
        conn.accept()
    with pytest.raises(LocalProtocolError):
        conn.reject(ReplyReason.GENERAL_FAILURE)


@pytest.mark.parametrize("version", [V4, V5], ids=["socks4", "socks5"])
def test_reject_twice(version: SocksVersion) -> None:
    conn = _awaiting(version)
    conn.reject(ReplyReason.CONNECTION_REFUSED)
    with pytest.raises(LocalProtocolError):
        conn.reject(ReplyReason.CONNECTION_REFUSED)
    with pytest.raises(LocalProtocolError):
        conn.accept()


@pytest.mark.parametrize("version", [V4, V5], ids=["socks4", "socks5"])
def test_reject_succeeded_is_a_local_error(version: SocksVersion) -> None:
    conn = _awaiting(version)
    with pytest.raises(LocalProtocolError):
        conn.reject(ReplyReason.SUCCEEDED)
    # The misuse did not consume the decision: a real reply is still possible.
    assert conn.state is State.AWAITING_DECISION
    assert conn.accept()[:2] in (h("05 00"), h("00 5a"))


def test_receive_data_after_reject() -> None:
    conn = _awaiting(V5)
    conn.reject(ReplyReason.GENERAL_FAILURE)
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        _ = conn.trailing_data


def test_receive_data_and_next_event_after_a_protocol_error() -> None:
    conn = ServerConnection()
    conn.receive_data(h("05 01 02"))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.receive_data(h("05 01 00"))
    with pytest.raises(LocalProtocolError):
        conn.next_event()
