"""Hypothesis properties of the SOCKS codec: chunking invariance, robustness against
arbitrary bytes, and agreement with socksio (an independent client implementation)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from socksio import socks4, socks5
from unit.socks_replay import replay, split_at

from tunnel.errors import RemoteProtocolError, ReplyReason
from tunnel.socks import (
    AddressType,
    Command,
    Request,
    ServerConnection,
    SocksVersion,
    State,
)

PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Built:
    data: bytes
    request: Request
    trailing: bytes
    sent: bytes


# ---- strategies for valid requests ----

ports = st.integers(0, 65535)
trailing_bytes = st.binary(max_size=64)
# Host names as a client may send them: any text without NUL, 1..255 bytes of UTF-8.
host_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1).filter(
    lambda text: len(text.encode()) <= 255
)
# User ids are opaque bytes up to the NUL.
user_ids = st.binary(max_size=255).filter(lambda raw: b"\x00" not in raw)


@st.composite
def socks5_requests(draw: st.DrawFn) -> Built:
    others = draw(st.lists(st.integers(1, 255), max_size=8))
    methods = draw(st.permutations([0, *others]))
    command = draw(st.sampled_from(Command))
    atyp = draw(st.sampled_from(AddressType))
    if atyp is AddressType.IPV4:
        address = draw(st.ip_addresses(v=4))
        host, raw = str(address), address.packed
    elif atyp is AddressType.IPV6:
        address = draw(st.ip_addresses(v=6))
        host, raw = str(address), address.packed
    else:
        host = draw(host_names)
        encoded = host.encode()
        raw = bytes((len(encoded),)) + encoded
    port = draw(ports)
    trailing = draw(trailing_bytes)
    greeting = bytes((5, len(methods), *methods))
    request = bytes((5, command, 0, atyp)) + raw + port.to_bytes(2)
    return Built(
        greeting + request + trailing,
        Request(SocksVersion.SOCKS5, command, atyp, host, port),
        trailing,
        b"\x05\x00",
    )


@st.composite
def socks4_requests(draw: st.DrawFn) -> Built:
    command = draw(st.sampled_from([Command.CONNECT, Command.BIND]))
    port = draw(ports)
    user_id = draw(user_ids)
    trailing = draw(trailing_bytes)
    header = bytes((4, command)) + port.to_bytes(2)
    if draw(st.booleans()):  # SOCKS4a: 0.0.0.x, x != 0, then the name
        host = draw(host_names)
        marker = bytes((0, 0, 0, draw(st.integers(1, 255))))
        data = header + marker + user_id + b"\x00" + host.encode() + b"\x00"
        atyp = AddressType.DOMAINNAME
    else:
        address = draw(
            st.ip_addresses(v=4).filter(
                lambda a: not (a.packed[:3] == b"\x00\x00\x00" and a.packed[3])
            )
        )
        host = str(address)
        data = header + address.packed + user_id + b"\x00"
        atyp = AddressType.IPV4
    return Built(
        data + trailing,
        Request(SocksVersion.SOCKS4, command, atyp, host, port, user_id),
        trailing,
        b"",
    )


valid_requests = st.one_of(socks5_requests(), socks4_requests())


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=12)


@PROPERTY
@given(built=valid_requests, data=st.data())
def test_valid_requests_parse_identically_under_any_chunking(
    built: Built, data: st.DataObject
) -> None:
    whole = replay([built.data])
    assert whole.requests == (built.request,)
    assert whole.sent == built.sent
    assert whole.trailing == built.trailing
    assert whole.error_reply is None

    chunks = split_at(built.data, data.draw(cuts_for(built.data), label="cuts"))
    chunked = replay(chunks)
    assert chunked.requests == whole.requests
    assert chunked.sent == whole.sent
    assert chunked.trailing == whole.trailing
    assert chunked.state is State.AWAITING_DECISION


# ---- arbitrary bytes ----

# Random bytes rarely start like SOCKS; prefixes steer the input deep into each parser.
PREFIXES = [
    b"",
    b"\x04",
    b"\x04\x01",
    b"\x04\x01\x00\x50\x7f\x00\x00\x01",
    b"\x04\x01\x00\x50\x00\x00\x00\x01",
    b"\x04\x01\x00\x50\x00\x00\x00\x01\x00",
    b"\x05",
    b"\x05\x01\x00",
    b"\x05\x01\x00\x05",
    b"\x05\x01\x00\x05\x01\x00",
    b"\x05\x01\x00\x05\x01\x00\x01",
    b"\x05\x01\x00\x05\x01\x00\x03",
    b"\x05\x01\x00\x05\x01\x00\x04",
]
arbitrary_inputs = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from(PREFIXES),
    st.binary(max_size=600),
)


def _well_formed_reply(reply: bytes, first_byte: int) -> bool:
    if reply == b"":
        return first_byte not in (4, 5)  # only non-SOCKS input is closed without a word
    if reply == b"\x05\xff":
        return first_byte == 5
    if len(reply) == 8:
        return first_byte == 4 and reply == b"\x00\x5b" + bytes(6)
    if len(reply) == 10:
        return (
            first_byte == 5
            and reply[0] == 5
            and reply[1] in (1, 7, 8)
            and reply[2:] == b"\x00\x01" + bytes(6)
        )
    return False


@PROPERTY
@given(raw=arbitrary_inputs, data=st.data())
def test_arbitrary_bytes_only_yield_need_data_a_request_or_a_protocol_error(
    raw: bytes, data: st.DataObject
) -> None:
    # replay() lets any exception other than RemoteProtocolError escape and fails on
    # any event other than NEED_DATA or a Request.
    chunks = split_at(raw, data.draw(cuts_for(raw), label="cuts"))
    outcome = replay(chunks)
    if outcome.error_reply is not None:
        event(f"error reply {outcome.error_reply[:2].hex() or 'none'}")
    else:
        event("request" if outcome.requests else "need data")
    assert len(outcome.requests) <= 1
    assert outcome.sent in (b"", b"\x05\x00")
    if outcome.error_reply is not None:
        assert not outcome.requests
        assert outcome.state is State.CLOSED
        assert _well_formed_reply(outcome.error_reply, raw[0]), outcome.error_reply.hex()
    # Arbitrary input is chunking-invariant too (except for when the decision came).
    whole = replay([raw])
    assert (whole.requests, whole.sent, whole.error_reply, whole.trailing, whole.state) == (
        outcome.requests,
        outcome.sent,
        outcome.error_reply,
        outcome.trailing,
        outcome.state,
    )


# ---- socksio as an oracle ----


def _is_ip_literal(text: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
        except (OSError, ValueError):
            continue
        return True
    return False


# socksio turns anything inet_pton accepts into an address, and encodes the rest as UTF-8.
oracle_names = host_names.filter(lambda name: not _is_ip_literal(name))
oracle_hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), oracle_names)
decisions = st.sampled_from(list(ReplyReason))


def _decide(conn: ServerConnection, reason: ReplyReason) -> bytes:
    return conn.accept() if reason is ReplyReason.SUCCEEDED else conn.reject(reason)


@PROPERTY
@given(
    host=oracle_hosts,
    port=ports,
    command=st.sampled_from(socks5.SOCKS5Command),
    reason=decisions,
)
def test_socksio_socks5_client_round_trip(
    host: str, port: int, command: socks5.SOCKS5Command, reason: ReplyReason
) -> None:
    client = socks5.SOCKS5Connection()
    server = ServerConnection()

    client.send(socks5.SOCKS5AuthMethodsRequest([socks5.SOCKS5AuthMethod.NO_AUTH_REQUIRED]))
    server.receive_data(client.data_to_send())
    server.next_event()
    auth = client.receive_data(server.data_to_send())
    assert auth == socks5.SOCKS5AuthReply(socks5.SOCKS5AuthMethod.NO_AUTH_REQUIRED)

    client.send(socks5.SOCKS5CommandRequest.from_address(command, (host, port)))
    server.receive_data(client.data_to_send())
    request = server.next_event()
    assert isinstance(request, Request)
    assert request.version is SocksVersion.SOCKS5
    assert request.command == int.from_bytes(command.value)
    assert request.port == port
    if _is_ip_literal(host):
        assert request.host == str(ipaddress.ip_address(host))
        assert not request.sent_name
    else:
        assert request.host == host
        assert request.sent_name

    reply = client.receive_data(_decide(server, reason))
    assert isinstance(reply, socks5.SOCKS5Reply)
    assert reply.reply_code == socks5.SOCKS5ReplyCode(bytes((reason,)))
    assert (reply.addr, reply.port) == ("0.0.0.0", 0)


@PROPERTY
@given(
    address=st.ip_addresses(v=4).filter(
        lambda a: not (a.packed[:3] == b"\x00\x00\x00" and a.packed[3])
    ),
    port=ports,
    command=st.sampled_from(socks4.SOCKS4Command),
    user_id=user_ids,
    reason=decisions,
)
def test_socksio_socks4_client_round_trip(
    address: ipaddress.IPv4Address,
    port: int,
    command: socks4.SOCKS4Command,
    user_id: bytes,
    reason: ReplyReason,
) -> None:
    client = socks4.SOCKS4Connection(user_id=user_id)
    client.send(socks4.SOCKS4Request.from_address(command, (str(address), port), user_id))
    server = ServerConnection()
    server.receive_data(client.data_to_send())
    request = server.next_event()
    assert request == Request(
        SocksVersion.SOCKS4,
        Command(int.from_bytes(command.value)),
        AddressType.IPV4,
        str(address),
        port,
        user_id,
    )
    _check_socks4_reply(client, _decide(server, reason), reason)


@PROPERTY
@given(
    host=oracle_names,
    port=ports,
    command=st.sampled_from(socks4.SOCKS4Command),
    user_id=user_ids,
    reason=decisions,
)
def test_socksio_socks4a_client_round_trip(
    host: str, port: int, command: socks4.SOCKS4Command, user_id: bytes, reason: ReplyReason
) -> None:
    client = socks4.SOCKS4Connection(user_id=user_id)
    client.send(socks4.SOCKS4ARequest.from_address(command, (host, port), user_id))
    server = ServerConnection()
    server.receive_data(client.data_to_send())
    request = server.next_event()
    assert request == Request(
        SocksVersion.SOCKS4,
        Command(int.from_bytes(command.value)),
        AddressType.DOMAINNAME,
        host,
        port,
        user_id,
    )
    _check_socks4_reply(client, _decide(server, reason), reason)


def _check_socks4_reply(client: socks4.SOCKS4Connection, data: bytes, reason: ReplyReason) -> None:
    reply = client.receive_data(data)
    expected = (
        socks4.SOCKS4ReplyCode.REQUEST_GRANTED
        if reason is ReplyReason.SUCCEEDED
        else socks4.SOCKS4ReplyCode.REQUEST_REJECTED_OR_FAILED
    )
    assert reply.reply_code is expected
    assert (reply.addr, reply.port) == ("0.0.0.0", 0)


@pytest.mark.parametrize(
    "methods",
    [
        [socks5.SOCKS5AuthMethod.USERNAME_PASSWORD],
        [socks5.SOCKS5AuthMethod.GSSAPI, socks5.SOCKS5AuthMethod.USERNAME_PASSWORD],
    ],
    ids=["user-pass-only", "gssapi-and-user-pass"],
)
def test_socksio_reads_no_acceptable_methods(methods: list[socks5.SOCKS5AuthMethod]) -> None:
    client = socks5.SOCKS5Connection()
    client.send(socks5.SOCKS5AuthMethodsRequest(methods))
    server = ServerConnection()
    server.receive_data(client.data_to_send())
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_event()
    auth = client.receive_data(caught.value.reply)
    assert isinstance(auth, socks5.SOCKS5AuthReply)
    assert auth.method is socks5.SOCKS5AuthMethod.NO_ACCEPTABLE_METHODS
