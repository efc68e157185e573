"""SOCKS BIND (two replies), SOCKS5 UDP ASSOCIATE, and the RFC 1928 section 7 UDP
datagram header: named hex vectors, replayed whole, byte by byte and split in two at
every offset, plus Hypothesis properties and socksio as an independent reader of the
replies.

Vector hex is written field by field (spaces are ignored by ``bytes.fromhex``) so that
each one can be checked against RFC 1928 and the SOCKS4/4a notes by eye.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from socksio import socks4, socks5
from unit.socks_replay import (
    GREETING,
    IPV4,
    IPV6,
    METHOD_NO_AUTH,
    NAME,
    S4_FAIL,
    V4,
    V5,
    bytewise,
    h,
    replay,
    split_at,
    two_way_splits,
)

from tunnel.errors import LocalProtocolError, RemoteProtocolError, ReplyReason
from tunnel.socks import (
    MAX_HOST_NAME,
    NEED_DATA,
    Command,
    Datagram,
    Request,
    ServerConnection,
    State,
    build_datagram,
    decode_address,
    encode_address,
    parse_datagram,
    socks4_reply,
    socks5_reply,
)

PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# == the codec driven like the proxy drives it ============================================


def negotiate(chunks: Sequence[bytes]) -> tuple[ServerConnection, Request, bytes]:
    """Feed ``chunks`` and drain events until the request is complete; later chunks are
    only received, as the proxy does while a request waits for its reply. Returns the
    codec, the request and what the codec asked to send (SOCKS5 method selection)."""
    conn = ServerConnection()
    sent = bytearray()
    request: Request | None = None
    for chunk in chunks:
        conn.receive_data(chunk)
        while request is None:
            event = conn.next_event()
            sent += conn.data_to_send()
            if event is NEED_DATA:
                break
            assert isinstance(event, Request), f"unexpected event {event!r}"
            request = event
    assert request is not None, "the request never completed"
    return conn, request, bytes(sent)


def chunkings(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """Whole, byte by byte, and split in two at every offset: the same result each time."""
    yield "whole", [data]
    yield "bytewise", bytewise(data)
    for cut, chunks in two_way_splits(data):
        yield f"split-at-{cut}", chunks


def chunked_cases(vectors: Sequence[BindVector | AssociateVector]) -> list[object]:
    """(vector, chunks) parameters: every vector under every chunking."""
    return [
        pytest.param(vector, chunks, id=f"{vector.name}-{how}")
        for vector in vectors
        for how, chunks in chunkings(vector.data)
    ]


# == BIND ===================================================================================


@dataclass(frozen=True)
class BindVector:
    name: str
    data: bytes
    request: Request
    sent: bytes
    # Where the far side listens (first reply) and which peer came (second reply).
    bound: tuple[str, int]
    first_reply: bytes
    peer: tuple[str, int]
    second_reply: bytes
    # reject(CONNECTION_REFUSED) between the two replies (the peer never came).
    refused: bytes


BIND_VECTORS = [
    BindVector(
        "socks5-ipv4",
        h(GREETING, "05 02 00 01 c0000207 1f90"),  # BIND, expect 192.0.2.7:8080
        Request(V5, Command.BIND, IPV4, "192.0.2.7", 8080),
        METHOD_NO_AUTH,
        ("198.51.100.1", 40000),
        h("05 00 00 01 c6336401 9c40"),  # listening on 198.51.100.1:40000
        ("192.0.2.7", 50123),
        h("05 00 00 01 c0000207 c3cb"),  # the peer, 192.0.2.7:50123
        h("05 05 00 01 00000000 0000"),
    ),
    BindVector(
        # Active FTP: the data connection comes from the server's port 20.
        "socks5-name-ipv6-replies",
        h(GREETING, "05 02 00 03 0b 6674702e6578616d706c65 0015"),  # ftp.example:21
        Request(V5, Command.BIND, NAME, "ftp.example", 21),
        METHOD_NO_AUTH,
        ("2001:db8::1", 40000),
        h("05 00 00 04 20010db8 00000000 00000000 00000001 9c40"),
        ("2001:db8::7", 20),
        h("05 00 00 04 20010db8 00000000 00000000 00000007 0014"),
        h("05 05 00 01 00000000 0000"),
    ),
    BindVector(
        # DST 0.0.0.0:0: the client does not know the peer yet.
        "socks5-unspecified",
        h(GREETING, "05 02 00 01 00000000 0000"),
        Request(V5, Command.BIND, IPV4, "0.0.0.0", 0),
        METHOD_NO_AUTH,
        ("0.0.0.0", 40000),
        h("05 00 00 01 00000000 9c40"),
        ("203.0.113.5", 54321),
        h("05 00 00 01 cb007105 d431"),
        h("05 05 00 01 00000000 0000"),
    ),
    BindVector(
        "socks4-ipv4",
        h("04 02 1f90 c0000207 00"),  # VN CD=BIND DSTPORT DSTIP USERID="" NUL
        Request(V4, Command.BIND, IPV4, "192.0.2.7", 8080),
        b"",
        ("198.51.100.1", 40000),
        h("00 5a 9c40 c6336401"),  # VN=0 CD=90 DSTPORT DSTIP
        ("192.0.2.7", 50123),
        h("00 5a c3cb c0000207"),
        S4_FAIL,
    ),
    BindVector(
        # SOCKS4 has no room for IPv6: DSTIP is zeros, the port is still there.
        "socks4a-name-ipv6-replies",
        h("04 02 0015 00000001 616c696365 00 6674702e6578616d706c65 00"),  # alice, ftp.example
        Request(V4, Command.BIND, NAME, "ftp.example", 21, b"alice"),
        b"",
        ("2001:db8::1", 40000),
        h("00 5a 9c40 00000000"),
        ("2001:db8::7", 20),
        h("00 5a 0014 00000000"),
        S4_FAIL,
    ),
]


@pytest.mark.parametrize(("vector", "chunks"), chunked_cases(BIND_VECTORS))
def test_bind_two_replies_under_any_chunking(vector: BindVector, chunks: list[bytes]) -> None:
    conn, request, sent = negotiate(chunks)
    assert request == vector.request
    assert sent == vector.sent

    states = [conn.state]
    first = conn.accept(*vector.bound)
    states.append(conn.state)
    second = conn.accept(*vector.peer)
    states.append(conn.state)
    assert (first, second) == (vector.first_reply, vector.second_reply)
    # After the first reply the exchange is not over: the peer has yet to come.
    assert states == [State.AWAITING_DECISION, State.AWAITING_PEER, State.ACCEPTED]


@pytest.mark.parametrize("vector", BIND_VECTORS, ids=lambda v: v.name)
def test_bind_reject_after_the_first_reply_closes(vector: BindVector) -> None:
    conn, _, _ = negotiate([vector.data + b"early"])
    conn.accept(*vector.bound)
    assert conn.reject(ReplyReason.CONNECTION_REFUSED) == vector.refused
    assert conn.state is State.CLOSED
    # The exchange is over: nothing more goes in, and nothing is left to forward.
    assert conn.buffered == 0
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"late")
    with pytest.raises(LocalProtocolError):
        conn.accept(*vector.peer)


@pytest.mark.parametrize("vector", BIND_VECTORS, ids=lambda v: v.name)
def test_bind_reject_before_the_first_reply(vector: BindVector) -> None:
    # The server could not listen at all: one failure reply, as for CONNECT.
    conn, _, _ = negotiate([vector.data])
    assert conn.reject(ReplyReason.CONNECTION_REFUSED) == vector.refused
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("vector", BIND_VECTORS, ids=lambda v: v.name)
def test_bind_has_exactly_two_replies(vector: BindVector) -> None:
    conn, _, _ = negotiate([vector.data])
    conn.accept(*vector.bound)
    conn.accept(*vector.peer)
    with pytest.raises(LocalProtocolError):
        conn.accept(*vector.peer)
    with pytest.raises(LocalProtocolError):
        conn.reject(ReplyReason.GENERAL_FAILURE)
    assert conn.state is State.ACCEPTED


@pytest.mark.parametrize("vector", BIND_VECTORS, ids=lambda v: v.name)
def test_bind_reject_needs_a_failure_reason_while_awaiting_the_peer(vector: BindVector) -> None:
    conn, _, _ = negotiate([vector.data])
    conn.accept(*vector.bound)
    with pytest.raises(LocalProtocolError):
        conn.reject(ReplyReason.SUCCEEDED)
    # The mistake changed nothing: the second reply can still be sent.
    assert conn.state is State.AWAITING_PEER
    assert conn.accept(*vector.peer) == vector.second_reply


@pytest.mark.parametrize("vector", BIND_VECTORS, ids=lambda v: v.name)
def test_bind_keeps_what_the_client_sends_before_the_second_reply(vector: BindVector) -> None:
    # A SOCKS5 request's bytes, sent while waiting: data for the peer, not a new request.
    early, late = b"early:", h("05 01 00 01 7f000001 0050")
    conn, _, _ = negotiate([vector.data + early])
    conn.accept(*vector.bound)
    conn.receive_data(late)
    assert conn.next_event() is NEED_DATA
    assert conn.trailing_data == early + late
    assert conn.buffered == len(early + late)
    conn.accept(*vector.peer)
    # Still there after the second reply: it is spliced to the peer then.
    assert conn.trailing_data == early + late


@pytest.mark.parametrize(
    ("data", "bound"),
    [
        pytest.param(h(GREETING, "05 01 00 01 c0000207 0050"), METHOD_NO_AUTH, id="socks5"),
        pytest.param(h("04 01 0050 c0000207 00"), b"", id="socks4"),
    ],
)
def test_connect_has_one_reply(data: bytes, bound: bytes) -> None:
    # The two-reply rule is BIND's alone: CONNECT is accepted once and for all.
    conn, request, sent = negotiate([data])
    assert request.command is Command.CONNECT
    assert sent == bound
    conn.accept("198.51.100.1", 40000)
    assert conn.state is State.ACCEPTED
    with pytest.raises(LocalProtocolError):
        conn.accept("192.0.2.7", 50123)


SOCKS4_REPLIES = [
    ("ipv4", "198.51.100.1", 40000, h("00 5a 9c40 c6336401")),
    ("ipv6-is-zeros", "2001:db8::1", 40000, h("00 5a 9c40 00000000")),
    ("ipv6-loopback-is-zeros", "::1", 1, h("00 5a 0001 00000000")),
    ("unspecified", "0.0.0.0", 0, h("00 5a 0000 00000000")),
]


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [pytest.param(*rest, id=name) for name, *rest in SOCKS4_REPLIES],
)
def test_socks4_reply_encoding(host: str, port: int, expected: bytes) -> None:
    assert socks4_reply(ReplyReason.SUCCEEDED, host, port) == expected


# == UDP ASSOCIATE ========================================================================


@dataclass(frozen=True)
class AssociateVector:
    name: str
    data: bytes
    request: Request
    relay: tuple[str, int]
    reply: bytes


ASSOCIATE_VECTORS = [
    AssociateVector(
        # DST 0.0.0.0:0: the client does not know its UDP address yet (the usual case).
        "unspecified",
        h(GREETING, "05 03 00 01 00000000 0000"),
        Request(V5, Command.UDP_ASSOCIATE, IPV4, "0.0.0.0", 0),
        ("127.0.0.1", 40000),
        h("05 00 00 01 7f000001 9c40"),
    ),
    AssociateVector(
        "client-port-given",
        h(GREETING, "05 03 00 01 7f000001 d431"),
        Request(V5, Command.UDP_ASSOCIATE, IPV4, "127.0.0.1", 54321),
        ("127.0.0.1", 40001),
        h("05 00 00 01 7f000001 9c41"),
    ),
    AssociateVector(
        "ipv6-relay",
        h(GREETING, "05 03 00 04 00000000 00000000 00000000 00000000 0000"),
        Request(V5, Command.UDP_ASSOCIATE, IPV6, "::", 0),
        ("::1", 40000),
        h("05 00 00 04 00000000 00000000 00000000 00000001 9c40"),
    ),
    AssociateVector(
        "name",
        h(GREETING, "05 03 00 03 09 6c6f63616c686f7374 0000"),  # localhost:0
        Request(V5, Command.UDP_ASSOCIATE, NAME, "localhost", 0),
        ("127.0.0.1", 40000),
        h("05 00 00 01 7f000001 9c40"),
    ),
]


@pytest.mark.parametrize(("vector", "chunks"), chunked_cases(ASSOCIATE_VECTORS))
def test_udp_associate_request_and_reply(vector: AssociateVector, chunks: list[bytes]) -> None:
    conn, request, sent = negotiate(chunks)
    assert request == vector.request
    assert sent == METHOD_NO_AUTH
    assert conn.accept(*vector.relay) == vector.reply
    # One reply; the TCP connection then only lives to keep the association alive.
    assert conn.state is State.ACCEPTED
    with pytest.raises(LocalProtocolError):
        conn.accept(*vector.relay)


UDP_ASSOCIATE_SOCKS4 = h("04 03 0035 7f000001 00")  # SOCKS4 has no command 3


@pytest.mark.parametrize(
    ("chunks", "decided_at"),
    [
        pytest.param([UDP_ASSOCIATE_SOCKS4], len(UDP_ASSOCIATE_SOCKS4), id="whole"),
        # Byte by byte: refused once the fixed 8-byte header is in, before the user id.
        pytest.param(bytewise(UDP_ASSOCIATE_SOCKS4), 8, id="bytewise"),
    ],
)
def test_socks4_udp_associate_is_refused(chunks: list[bytes], decided_at: int) -> None:
    outcome = replay(chunks)
    assert outcome.requests == ()
    assert outcome.error_reply == S4_FAIL
    assert outcome.state is State.CLOSED
    assert outcome.decided_at == decided_at


# == socksio reads the replies ==============================================================

ports = st.integers(0, 65535)
ip_hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


def _socks5_client_request(command: socks5.SOCKS5Command) -> tuple[socks5.SOCKS5Connection, bytes]:
    client = socks5.SOCKS5Connection()
    client.send(socks5.SOCKS5AuthMethodsRequest([socks5.SOCKS5AuthMethod.NO_AUTH_REQUIRED]))
    greeting = client.data_to_send()
    client.receive_data(METHOD_NO_AUTH)
    client.send(socks5.SOCKS5CommandRequest.from_address(command, ("192.0.2.7", 8080)))
    return client, greeting + client.data_to_send()


@PROPERTY
@given(bound=ip_hosts, bound_port=ports, peer=ip_hosts, peer_port=ports)
def test_socksio_reads_both_socks5_bind_replies(
    bound: ipaddress.IPv4Address | ipaddress.IPv6Address,
    bound_port: int,
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address,
    peer_port: int,
) -> None:
    client, data = _socks5_client_request(socks5.SOCKS5Command.BIND)
    conn, request, _ = negotiate([data])
    assert request.command is Command.BIND

    first = client.receive_data(conn.accept(str(bound), bound_port))
    assert isinstance(first, socks5.SOCKS5Reply)
    assert first.reply_code is socks5.SOCKS5ReplyCode.SUCCEEDED
    # Compared as addresses: text forms may differ (IPv4-mapped IPv6, for one).
    assert (ipaddress.ip_address(first.addr), first.port) == (bound, bound_port)

    # socksio's connection knows one reply only; its reply parser reads the second.
    second = socks5.SOCKS5Reply.loads(conn.accept(str(peer), peer_port))
    assert second.reply_code is socks5.SOCKS5ReplyCode.SUCCEEDED
    assert (ipaddress.ip_address(second.addr), second.port) == (peer, peer_port)


@PROPERTY
@given(relay=ip_hosts, relay_port=ports)
def test_socksio_reads_the_udp_associate_reply(
    relay: ipaddress.IPv4Address | ipaddress.IPv6Address, relay_port: int
) -> None:
    client, data = _socks5_client_request(socks5.SOCKS5Command.UDP_ASSOCIATE)
    conn, request, _ = negotiate([data])
    assert request.command is Command.UDP_ASSOCIATE

    reply = client.receive_data(conn.accept(str(relay), relay_port))
    assert isinstance(reply, socks5.SOCKS5Reply)
    assert reply.reply_code is socks5.SOCKS5ReplyCode.SUCCEEDED
    assert (ipaddress.ip_address(reply.addr), reply.port) == (relay, relay_port)


@PROPERTY
@given(bound=ip_hosts, bound_port=ports, peer=ip_hosts, peer_port=ports)
def test_socksio_reads_both_socks4_bind_replies(
    bound: ipaddress.IPv4Address | ipaddress.IPv6Address,
    bound_port: int,
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address,
    peer_port: int,
) -> None:
    client = socks4.SOCKS4Connection(user_id=b"")
    client.send(
        socks4.SOCKS4Request.from_address(socks4.SOCKS4Command.BIND, ("192.0.2.7", 8080), b"")
    )
    conn, request, _ = negotiate([client.data_to_send()])
    assert request.command is Command.BIND

    def expected(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        # An IPv4-mapped IPv6 address fits SOCKS4 as the IPv4 address it maps.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address) if address.version == 4 else "0.0.0.0"

    for reply_bytes, address, port in (
        (conn.accept(str(bound), bound_port), bound, bound_port),
        (conn.accept(str(peer), peer_port), peer, peer_port),
    ):
        reply = socks4.SOCKS4Reply.loads(reply_bytes)
        assert reply.reply_code is socks4.SOCKS4ReplyCode.REQUEST_GRANTED
        assert (reply.addr, reply.port) == (expected(address), port)


# socksio 1.0's SOCKS5Datagram.loads/dumps raise NotImplementedError: no oracle for the
# datagram header, so the vectors below are checked by eye against RFC 1928 section 7.


# == UDP datagrams (RFC 1928 section 7) ======================================================


@dataclass(frozen=True)
class DatagramVector:
    name: str
    data: bytes
    datagram: Datagram


DATAGRAM_VECTORS = [
    DatagramVector(
        "ipv4",
        h("0000 00 01 c0000207 0035", "61626364"),  # RSV FRAG ATYP 192.0.2.7 :53 "abcd"
        Datagram(IPV4, "192.0.2.7", 53, b"abcd"),
    ),
    DatagramVector(
        "ipv6",
        h("0000 00 04 20010db8 00000000 00000000 00000001 01bb", "ff00"),
        Datagram(IPV6, "2001:db8::1", 443, b"\xff\x00"),
    ),
    DatagramVector(
        "name",
        h("0000 00 03 0b 6578616d706c652e636f6d 0050", "474554"),  # example.com:80 "GET"
        Datagram(NAME, "example.com", 80, b"GET"),
    ),
    DatagramVector(
        "utf8-name",
        h("0000 00 03 07 c3bc2e74657374 3039", "00"),  # "ü.test":12345, one NUL byte
        Datagram(NAME, "ü.test", 12345, b"\x00"),
    ),
    DatagramVector(
        "empty-payload",
        h("0000 00 01 7f000001 ffff"),
        Datagram(IPV4, "127.0.0.1", 65535, b""),
    ),
    DatagramVector(
        # A payload that looks like another header is still just payload.
        "payload-looks-like-a-header",
        h("0000 00 01 c0000207 0035", "0000 00 01 c0000208 0035"),
        Datagram(IPV4, "192.0.2.7", 53, h("0000 00 01 c0000208 0035")),
    ),
]

# FRAG is not ours to interpret here: it is passed on for the relay to count and drop.
FRAGMENT_VECTORS = [
    DatagramVector(
        "frag-1",
        h("0000 01 01 c0000207 0035", "61"),
        Datagram(IPV4, "192.0.2.7", 53, b"a", frag=1),
    ),
    DatagramVector(
        # The high bit marks the last fragment of a sequence.
        "frag-last",
        h("0000 81 03 01 61 0001"),
        Datagram(NAME, "a", 1, b"", frag=0x81),
    ),
]


@pytest.mark.parametrize("vector", DATAGRAM_VECTORS + FRAGMENT_VECTORS, ids=lambda v: v.name)
def test_parse_datagram(vector: DatagramVector) -> None:
    assert parse_datagram(vector.data) == vector.datagram


@pytest.mark.parametrize("vector", DATAGRAM_VECTORS, ids=lambda v: v.name)
def test_build_datagram(vector: DatagramVector) -> None:
    d = vector.datagram
    assert build_datagram(d.host, d.port, d.payload) == vector.data


def test_build_datagram_always_sends_frag_zero() -> None:
    # The relay never fragments: RSV RSV FRAG are all zero in what it sends.
    assert build_datagram("192.0.2.7", 53, b"x")[:3] == b"\x00\x00\x00"


MALFORMED_DATAGRAMS = [
    ("empty", b""),
    ("rsv-only", h("0000")),
    ("no-atyp", h("0000 00")),
    ("rsv-high-byte", h("0100 00 01 c0000207 0035")),
    ("rsv-low-byte", h("0001 00 01 c0000207 0035")),
    ("atyp-zero", h("0000 00 00 c0000207 0035")),
    ("atyp-two", h("0000 00 02 c0000207 0035")),
    ("atyp-five", h("0000 00 05 c0000207 0035")),
    ("atyp-ff", h("0000 00 ff c0000207 0035")),
    ("ipv4-no-address", h("0000 00 01")),
    ("ipv4-short-address", h("0000 00 01 c00002")),
    ("ipv4-no-port", h("0000 00 01 c0000207")),
    ("ipv4-half-port", h("0000 00 01 c0000207 00")),
    ("ipv6-short-address", h("0000 00 04 20010db8 00000000 0000")),
    ("ipv6-half-port", h("0000 00 04 20010db8 00000000 00000000 00000001 01")),
    ("name-no-length", h("0000 00 03")),
    ("name-short", h("0000 00 03 0b 6578616d706c65")),
    ("name-no-port", h("0000 00 03 01 61")),
    ("name-empty", h("0000 00 03 00 0050")),
    ("name-with-nul", h("0000 00 03 03 610062 0050")),
    ("name-invalid-utf8", h("0000 00 03 02 c328 0050")),
    ("name-lone-continuation-byte", h("0000 00 03 01 80 0050")),
]


@pytest.mark.parametrize(
    "data", [pytest.param(data, id=name) for name, data in MALFORMED_DATAGRAMS]
)
def test_malformed_datagrams_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_datagram(data)


# == encode_address / decode_address ===========================================================


def test_encode_address_takes_the_longest_name() -> None:
    name = "a" * MAX_HOST_NAME
    assert encode_address(name, 80) == h("03 ff") + name.encode() + h("0050")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("b" * (MAX_HOST_NAME + 1), id="256-ascii"),
        # 128 characters, 256 bytes: the limit is on bytes, not characters.
        pytest.param("é" * 128, id="256-bytes-of-utf8"),
        pytest.param("", id="empty"),
    ],
)
def test_encode_address_refuses_names_that_do_not_fit(name: str) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        encode_address(name, 80)


@pytest.mark.parametrize(
    ("host", "encoded"),
    [
        pytest.param("192.0.2.7", h("01 c0000207 0035"), id="ipv4"),
        pytest.param("2001:db8::1", h("04 20010db8 00000000 00000000 00000001 0035"), id="ipv6"),
        # Whatever is not an IP literal is a name: the far end resolves it.
        pytest.param("127.1", h("03 05 3132372e31 0035"), id="numeric-name"),
    ],
)
def test_encode_address(host: str, encoded: bytes) -> None:
    assert encode_address(host, 53) == encoded


def test_decode_address_at_an_offset_reports_where_it_ends() -> None:
    data = b"xyz" + h("03 01 61 0050") + b"rest"
    assert decode_address(data, 3) == (NAME, "a", 80, 3 + 5)


# == properties ================================================================================


def _is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# Names as a client may send them: any text without NUL, 1..255 bytes of UTF-8, that is
# not an IP literal (those are sent as addresses, so they come back in canonical form).
host_names = (
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1)
    .filter(lambda text: len(text.encode()) <= MAX_HOST_NAME)
    .filter(lambda text: not _is_ip_literal(text))
)
payloads = st.binary(max_size=512)


@PROPERTY
@given(
    address=ip_hosts,
    port=ports,
    payload=payloads,
)
def test_build_then_parse_round_trips_addresses(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, payload: bytes
) -> None:
    parsed = parse_datagram(build_datagram(str(address), port, payload))
    atyp = IPV4 if address.version == 4 else IPV6
    assert parsed == Datagram(atyp, str(address), port, payload, frag=0)


@PROPERTY
@given(name=host_names, port=ports, payload=payloads)
def test_build_then_parse_round_trips_names(name: str, port: int, payload: bytes) -> None:
    parsed = parse_datagram(build_datagram(name, port, payload))
    assert parsed == Datagram(NAME, name, port, payload, frag=0)


# Random bytes rarely start with a zero RSV; prefixes steer them into each address type.
DATAGRAM_PREFIXES = [
    b"",
    b"\x00\x00",
    b"\x00\x00\x00",
    b"\x00\x00\x00\x01",
    b"\x00\x00\x00\x03",
    b"\x00\x00\x00\x04",
    b"\x00\x00\x01\x03",
]
arbitrary_datagrams = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from(DATAGRAM_PREFIXES),
    st.binary(max_size=300),
)


@PROPERTY
@given(raw=arbitrary_datagrams)
def test_arbitrary_datagrams_parse_or_raise_remote_protocol_error(raw: bytes) -> None:
    # Any other exception escapes and fails the test.
    try:
        parsed = parse_datagram(raw)
    except RemoteProtocolError:
        event("malformed")
        return
    event(f"parsed {parsed.address_type.name}")
    assert parsed.frag == raw[2]
    assert raw.endswith(parsed.payload)
    # What parses is rebuilt byte for byte (frag aside), unless a name spells an IP
    # address: that one goes back as the address.
    if parsed.address_type is not NAME or not _is_ip_literal(parsed.host):
        rebuilt = build_datagram(parsed.host, parsed.port, parsed.payload)
        assert rebuilt == b"\x00\x00\x00" + raw[3:]


@PROPERTY
@given(raw=st.binary(max_size=64), data=st.data())
def test_arbitrary_bytes_split_anywhere_do_not_change_a_bind_reply(
    raw: bytes, data: st.DataObject
) -> None:
    # What a client sends while its BIND waits is data, however it arrives.
    vector = BIND_VECTORS[0]
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts")
    conn, _, _ = negotiate([vector.data])
    conn.accept(*vector.bound)
    for chunk in split_at(raw, cuts):
        conn.receive_data(chunk)
        assert conn.next_event() is NEED_DATA
    assert conn.trailing_data == raw
    assert conn.accept(*vector.peer) == vector.second_reply


def test_socks5_reply_for_the_relay_matches_the_datagram_address_encoding() -> None:
    # The relay's address in the UDP ASSOCIATE reply and in datagrams is the same field.
    reply = socks5_reply(ReplyReason.SUCCEEDED, "2001:db8::1", 40000)
    assert reply[3:] == encode_address("2001:db8::1", 40000)
