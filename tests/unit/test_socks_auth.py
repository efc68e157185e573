"""SOCKS5 username/password (RFC 1929) in the codec, with ``require_auth=True``: method
selection, the sub-negotiation replayed whole, byte by byte and split at every offset,
accept/reject replies, a request pipelined behind the credentials, and the state rules.

The shared ``unit.socks_replay.replay`` drives a codec without auth and treats any event
other than a request as a bug, so the replay here is its sibling: on ``Credentials`` it
asks a decider for ``accept_auth()`` or ``reject_auth()`` as the proxy does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unit.socks_replay import bytewise, split_at, two_way_splits

from tunnel.errors import LocalProtocolError, RemoteProtocolError
from tunnel.socks import (
    AUTH_VERSION,
    NEED_DATA,
    AddressType,
    AuthMethod,
    Command,
    Credentials,
    Request,
    ServerConnection,
    SocksVersion,
    State,
)


def h(*parts: str) -> bytes:
    return bytes.fromhex(" ".join(parts))


def rfc1929(username: bytes, password: bytes, version: int = AUTH_VERSION) -> bytes:
    """VER ULEN UNAME PLEN PASSWD."""
    return bytes((version, len(username))) + username + bytes((len(password),)) + password


GREETING_USERPASS = h("05 01 02")  # VER NMETHODS=1 METHODS=[USERNAME/PASSWORD]
GREETING_BOTH = h("05 02 00 02")  # no-auth and username/password
GREETING_NO_AUTH = h("05 01 00")
METHOD_USERPASS = h("05 02")
METHOD_NO_AUTH = h("05 00")
METHOD_NONE = h("05 ff")
AUTH_OK = h("01 00")
AUTH_FAIL = h("01 01")
BOB = rfc1929(b"bob", b"secret")
# CONNECT 127.0.0.1:8080
CONNECT_IPV4 = h("05 01 00 01 7f000001 1f90")
REQUEST_IPV4 = Request(SocksVersion.SOCKS5, Command.CONNECT, AddressType.IPV4, "127.0.0.1", 8080)
# CONNECT example.com:443
CONNECT_NAME = h("05 01 00 03 0b", b"example.com".hex(), "01bb")
REQUEST_NAME = Request(
    SocksVersion.SOCKS5, Command.CONNECT, AddressType.DOMAINNAME, "example.com", 443
)


def test_vectors_are_what_rfc_1929_draws() -> None:
    assert h("01", "03", b"bob".hex(), "06", b"secret".hex()) == BOB
    assert rfc1929(b"", b"") == h("01 00 00")


# ---- a replay that decides on credentials -----------------------------------------------

Decider = Callable[[Credentials], bool]


@dataclass(frozen=True)
class AuthOutcome:
    events: tuple[Credentials | Request, ...]
    sent: bytes
    error_reply: bytes | None
    state: State
    trailing: bytes | None


def replay_auth(chunks: Sequence[bytes], decide: Decider = lambda _: True) -> AuthOutcome:
    conn = ServerConnection(require_auth=True)
    seen: list[Credentials | Request] = []
    sent = bytearray()
    error_reply: bytes | None = None
    for chunk in chunks:
        if conn.state is State.CLOSED:
            break
        conn.receive_data(chunk)
        try:
            while True:
                event = conn.next_event()
                sent += conn.data_to_send()
                if event is NEED_DATA:
                    break
                assert isinstance(event, Credentials | Request), event
                seen.append(event)
                if isinstance(event, Request):
                    break
                if decide(event):
                    sent += conn.accept_auth()
                else:
                    sent += conn.reject_auth()
                    break
        except RemoteProtocolError as exc:
            sent += conn.data_to_send()
            error_reply = exc.reply
            break
        if seen and isinstance(seen[-1], Request):
            break
    trailing = conn.trailing_data if conn.state is State.AWAITING_DECISION else None
    return AuthOutcome(tuple(seen), bytes(sent), error_reply, conn.state, trailing)


def every_chunking(data: bytes) -> list[tuple[str, list[bytes]]]:
    found = [("whole", [data]), ("bytewise", bytewise(data))]
    found += [(f"split@{cut}", chunks) for cut, chunks in two_way_splits(data)]
    return found


def assert_same_for_every_chunking(data: bytes, expected: AuthOutcome, **kw: Decider) -> None:
    for name, chunks in every_chunking(data):
        assert replay_auth(chunks, **kw) == expected, name


# ---- method selection ------------------------------------------------------------------


@pytest.mark.parametrize("greeting", [GREETING_USERPASS, GREETING_BOTH, h("05 03 00 01 02")])
def test_greeting_offering_userpass_selects_it(greeting: bytes) -> None:
    conn = ServerConnection(require_auth=True)
    for byte in bytewise(greeting):
        assert conn.data_to_send() == b""
        conn.receive_data(byte)
        assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == METHOD_USERPASS
    assert conn.state is State.SOCKS5_AUTH


@pytest.mark.parametrize(
    "greeting",
    [GREETING_NO_AUTH, h("05 01 01"), h("05 00"), h("05 02 00 01")],
    ids=["no-auth-only", "gssapi-only", "no-methods", "no-auth-and-gssapi"],
)
def test_greeting_without_userpass_gets_no_acceptable_methods(greeting: bytes) -> None:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(greeting)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reply == METHOD_NONE
    assert conn.data_to_send() == b""
    assert conn.state is State.CLOSED


def test_no_acceptable_methods_arrives_with_the_last_method_byte() -> None:
    expected = AuthOutcome((), b"", METHOD_NONE, State.CLOSED, None)
    assert_same_for_every_chunking(GREETING_NO_AUTH, expected)


def test_without_require_auth_no_auth_still_wins() -> None:
    conn = ServerConnection()
    conn.receive_data(GREETING_BOTH + CONNECT_IPV4)
    assert conn.next_event() == REQUEST_IPV4
    assert conn.data_to_send() == METHOD_NO_AUTH


def test_without_require_auth_userpass_alone_is_refused() -> None:
    conn = ServerConnection()
    conn.receive_data(GREETING_USERPASS)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reply == METHOD_NONE


def test_auth_method_values() -> None:
    assert int(AuthMethod.USERNAME_PASSWORD) == 0x02
    assert int(AuthMethod.NO_ACCEPTABLE_METHODS) == 0xFF
    assert AUTH_VERSION == 0x01


# ---- the RFC 1929 sub-negotiation --------------------------------------------------------


def test_credentials_byte_by_byte() -> None:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(GREETING_USERPASS)
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == METHOD_USERPASS
    for byte in bytewise(BOB)[:-1]:
        conn.receive_data(byte)
        assert conn.next_event() is NEED_DATA
        assert conn.state is State.SOCKS5_AUTH
    conn.receive_data(BOB[-1:])
    event = conn.next_event()
    assert event == Credentials(b"bob", b"secret")
    assert isinstance(event, Credentials)
    assert (event.username, event.password) == (b"bob", b"secret")
    assert conn.state is State.AWAITING_AUTH
    assert conn.data_to_send() == b""


CREDENTIALS = [
    ("bob", b"bob", b"secret"),
    ("empty-username", b"", b"secret"),
    ("empty-password", b"bob", b""),
    ("both-empty", b"", b""),
    ("binary", b"\x00\xff:", b"\x00\x01\x02"),
    ("utf8", "jörg".encode(), "пароль".encode()),
    ("max-lengths", b"u" * 255, b"p" * 255),
]


@pytest.mark.parametrize(
    ("username", "password"), [c[1:] for c in CREDENTIALS], ids=[c[0] for c in CREDENTIALS]
)
def test_credentials_in_every_chunking(username: bytes, password: bytes) -> None:
    data = GREETING_USERPASS + rfc1929(username, password)
    expected = AuthOutcome(
        (Credentials(username, password),),
        METHOD_USERPASS + AUTH_FAIL,
        None,
        State.CLOSED,
        None,
    )
    # Rejected: the request that never comes is not part of the outcome.
    for name, chunks in every_chunking(data):
        assert replay_auth(chunks, decide=lambda _: False) == expected, name


@pytest.mark.parametrize("version", [0x00, 0x02, 0x05, 0xFF])
def test_bad_auth_version_is_refused_with_01_01(version: int) -> None:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(GREETING_USERPASS)
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == METHOD_USERPASS
    # The version byte alone is enough to know.
    conn.receive_data(bytes((version,)))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reply == AUTH_FAIL
    assert conn.state is State.CLOSED


def test_bad_auth_version_in_one_piece() -> None:
    data = GREETING_USERPASS + rfc1929(b"bob", b"secret", version=0x05)
    expected = AuthOutcome((), METHOD_USERPASS, AUTH_FAIL, State.CLOSED, None)
    assert_same_for_every_chunking(data, expected)


def test_credentials_repr_hides_the_password() -> None:
    text = repr(Credentials(b"bob", b"hunter2"))
    assert "bob" in text
    assert "hunter2" not in text


# ---- accept_auth / reject_auth -----------------------------------------------------------


def test_accept_auth_then_request_pipelined_in_the_same_bytes() -> None:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(GREETING_USERPASS + BOB + CONNECT_IPV4 + b"early data")
    assert conn.next_event() == Credentials(b"bob", b"secret")
    assert conn.data_to_send() == METHOD_USERPASS
    assert conn.accept_auth() == AUTH_OK
    states = [conn.state]
    assert conn.next_event() == REQUEST_IPV4
    states.append(conn.state)
    assert states == [State.SOCKS5_REQUEST, State.AWAITING_DECISION]
    assert conn.trailing_data == b"early data"
    assert conn.data_to_send() == b""
    assert conn.accept() == h("05 00 00 01 00000000 0000")


@pytest.mark.parametrize(
    ("connect", "request_"),
    [(CONNECT_IPV4, REQUEST_IPV4), (CONNECT_NAME, REQUEST_NAME)],
    ids=["ipv4", "name"],
)
def test_whole_exchange_in_every_chunking(connect: bytes, request_: Request) -> None:
    data = GREETING_BOTH + BOB + connect + b"GET /"
    expected = AuthOutcome(
        (Credentials(b"bob", b"secret"), request_),
        METHOD_USERPASS + AUTH_OK,
        None,
        State.AWAITING_DECISION,
        None,
    )
    for name, chunks in every_chunking(data):
        outcome = replay_auth(chunks)
        # Trailing bytes depend on where the last piece ended; the rest must not.
        assert outcome.trailing is not None
        assert b"GET /".startswith(outcome.trailing), name
        assert outcome == AuthOutcome(
            expected.events, expected.sent, None, expected.state, outcome.trailing
        ), name


def test_reject_auth_closes() -> None:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(GREETING_USERPASS + rfc1929(b"bob", b"wrong") + CONNECT_IPV4)
    assert conn.next_event() == Credentials(b"bob", b"wrong")
    assert conn.reject_auth() == AUTH_FAIL
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        conn.trailing_data  # noqa: B018 - a property that must refuse
    with pytest.raises(LocalProtocolError):
        conn.accept()


def test_the_request_is_not_parsed_before_the_decision() -> None:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(GREETING_USERPASS + BOB + CONNECT_IPV4)
    assert isinstance(conn.next_event(), Credentials)
    # Asking again before accept_auth()/reject_auth() is our bug, not the client's.
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    assert conn.state is State.AWAITING_AUTH
    assert conn.accept_auth() == AUTH_OK
    assert conn.next_event() == REQUEST_IPV4


def _at_start() -> ServerConnection:
    return ServerConnection(require_auth=True)


def _after_greeting() -> ServerConnection:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(GREETING_USERPASS + BOB[:4])
    assert conn.next_event() is NEED_DATA
    return conn


def _after_accept() -> ServerConnection:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(GREETING_USERPASS + BOB)
    conn.next_event()
    conn.accept_auth()
    return conn


def _after_request() -> ServerConnection:
    conn = _after_accept()
    conn.receive_data(CONNECT_IPV4)
    assert conn.next_event() == REQUEST_IPV4
    return conn


def _after_reject() -> ServerConnection:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(GREETING_USERPASS + BOB)
    conn.next_event()
    conn.reject_auth()
    return conn


def _without_auth() -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(GREETING_NO_AUTH + CONNECT_IPV4)
    assert conn.next_event() == REQUEST_IPV4
    return conn


def _socks4() -> ServerConnection:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(h("04 01 0050 7f000001 00"))
    assert isinstance(conn.next_event(), Request)
    return conn


WRONG_STATES: list[tuple[str, Callable[[], ServerConnection]]] = [
    ("start", _at_start),
    ("mid-credentials", _after_greeting),
    ("after-accept", _after_accept),
    ("after-request", _after_request),
    ("after-reject", _after_reject),
    ("no-auth-required", _without_auth),
    ("socks4", _socks4),
]


@pytest.mark.parametrize("make", [m for _, m in WRONG_STATES], ids=[n for n, _ in WRONG_STATES])
@pytest.mark.parametrize("method", ["accept_auth", "reject_auth"])
def test_auth_decision_in_the_wrong_state(
    make: Callable[[], ServerConnection], method: str
) -> None:
    conn = make()
    before = conn.state
    with pytest.raises(LocalProtocolError):
        getattr(conn, method)()
    assert conn.state is before


def test_socks4_with_require_auth_is_parsed_for_the_proxy_to_refuse() -> None:
    # SOCKS4 has no password; the codec hands the request over and the proxy answers 91.
    conn = _socks4()
    assert conn.state is State.AWAITING_DECISION


# ---- properties ------------------------------------------------------------------------

names = st.binary(max_size=255)


@settings(max_examples=150, deadline=None)
@given(username=names, password=names, data=st.data())
def test_any_credentials_survive_any_chunking(
    username: bytes, password: bytes, data: st.DataObject
) -> None:
    wire = GREETING_USERPASS + rfc1929(username, password) + CONNECT_IPV4
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    outcome = replay_auth(split_at(wire, cuts))
    assert outcome.events == (Credentials(username, password), REQUEST_IPV4)
    assert outcome.sent == METHOD_USERPASS + AUTH_OK
    assert outcome.trailing == b""


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(max_size=64))
def test_random_bytes_after_the_method_only_raise_remote_errors(tail: bytes) -> None:
    conn = ServerConnection(require_auth=True)
    conn.receive_data(GREETING_USERPASS + tail)
    reply: bytes | None = None
    try:
        event = conn.next_event()
    except RemoteProtocolError as exc:
        reply = exc.reply
    if reply is not None:
        assert reply == AUTH_FAIL
        assert conn.state is State.CLOSED
    else:
        assert event is NEED_DATA or isinstance(event, Credentials)
