"""Datagrams over byte streams (tunnel.datagrams): the length-prefixed FrameDecoder with
2-byte (DNS over TCP, RFC 1035 4.2.2) and 4-byte (UDP helper) prefixes, however the
stream is chunked; DNS framing and IDs; helper frames and their addresses."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit.socks_replay import bytewise, split_at, two_way_splits

from tunnel.datagrams import (
    MAX_DNS_MESSAGE,
    MAX_HELPER_FRAME,
    FrameDecoder,
    HelperFrame,
    dns_decoder,
    dns_frame,
    dns_id,
    helper_decoder,
    helper_frame,
    parse_helper_frame,
)
from tunnel.errors import RemoteProtocolError

PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def h(*parts: str) -> bytes:
    return bytes.fromhex(" ".join(parts))


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[bytes]:
    messages: list[bytes] = []
    for chunk in chunks:
        messages += decoder.feed(chunk)
    return messages


# == FrameDecoder ===============================================================================

# Three messages: "abc", an empty one, and one byte 0xff; then the same with 4-byte lengths.
STREAM_2 = h("0003 616263", "0000", "0001 ff")
STREAM_4 = h("00000003 616263", "00000000", "00000001 ff")
MESSAGES = [b"abc", b"", b"\xff"]

STREAMS = [
    pytest.param(2, STREAM_2, id="2-byte-prefix"),
    pytest.param(4, STREAM_4, id="4-byte-prefix"),
]


@pytest.mark.parametrize(("prefix", "stream"), STREAMS)
def test_whole_stream(prefix: int, stream: bytes) -> None:
    decoder = FrameDecoder(prefix, 100)
    assert decoder.feed(stream) == MESSAGES
    assert decoder.pending == 0


@pytest.mark.parametrize(("prefix", "stream"), STREAMS)
def test_byte_by_byte(prefix: int, stream: bytes) -> None:
    decoder = FrameDecoder(prefix, 100)
    assert feed_all(decoder, bytewise(stream)) == MESSAGES
    assert decoder.pending == 0


@pytest.mark.parametrize(("prefix", "stream"), STREAMS)
def test_split_in_two_at_every_offset(prefix: int, stream: bytes) -> None:
    for cut, chunks in two_way_splits(stream):
        decoder = FrameDecoder(prefix, 100)
        assert feed_all(decoder, chunks) == MESSAGES, f"cut at {cut}"


def test_empty_feed_yields_nothing() -> None:
    decoder = FrameDecoder(2, 100)
    assert decoder.feed(b"") == []
    assert decoder.pending == 0


def test_zero_length_frames_are_messages() -> None:
    # An empty message is a message: a length of zero must not be read as "no frame".
    decoder = FrameDecoder(2, 100)
    assert decoder.feed(h("0000 0000 0000")) == [b"", b"", b""]


@pytest.mark.parametrize(
    ("prefix", "data", "pending"),
    [
        pytest.param(2, h("00"), 1, id="half-a-2-byte-length"),
        pytest.param(4, h("000000"), 3, id="three-quarters-of-a-4-byte-length"),
        # A complete length whose body has not come yet: all of it is kept.
        pytest.param(2, h("0003 61"), 3, id="length-and-part-of-the-body"),
        pytest.param(4, h("00000003 6162"), 6, id="4-byte-length-and-part-of-the-body"),
        # Complete messages leave; what follows them stays.
        pytest.param(2, h("0001 61", "0002 62"), 3, id="a-message-then-part-of-one"),
    ],
)
def test_pending_counts_what_waits(prefix: int, data: bytes, pending: int) -> None:
    decoder = FrameDecoder(prefix, 100)
    decoder.feed(data)
    assert decoder.pending == pending


def test_pending_drops_to_zero_once_the_message_completes() -> None:
    decoder = FrameDecoder(2, 100)
    assert decoder.feed(h("0003 61")) == []
    assert decoder.pending == 3
    assert decoder.feed(h("6263")) == [b"abc"]
    assert decoder.pending == 0


@pytest.mark.parametrize("prefix", [2, 4])
def test_a_frame_exactly_at_the_limit_is_taken(prefix: int) -> None:
    decoder = FrameDecoder(prefix, 10)
    frame = (10).to_bytes(prefix) + b"x" * 10
    assert decoder.feed(frame) == [b"x" * 10]


@pytest.mark.parametrize("prefix", [2, 4])
def test_a_length_above_the_limit_raises_before_the_body_comes(prefix: int) -> None:
    # Only the length has arrived: waiting for the body would mean buffering what the
    # limit exists to refuse.
    decoder = FrameDecoder(prefix, 10)
    with pytest.raises(RemoteProtocolError, match="limit 10"):
        decoder.feed((11).to_bytes(prefix))


def test_a_length_above_the_limit_after_good_frames_raises() -> None:
    decoder = FrameDecoder(2, 10)
    assert decoder.feed(h("0001 61")) == [b"a"]
    with pytest.raises(RemoteProtocolError):
        decoder.feed(h("ffff"))


def test_a_length_above_the_limit_arriving_byte_by_byte_raises() -> None:
    decoder = FrameDecoder(4, MAX_HELPER_FRAME)
    too_long = (MAX_HELPER_FRAME + 1).to_bytes(4)
    for byte in bytewise(too_long[:-1]):
        assert decoder.feed(byte) == []
    with pytest.raises(RemoteProtocolError):
        decoder.feed(too_long[-1:])


def test_helper_decoder_limit_is_the_helper_frame_limit() -> None:
    assert helper_decoder().feed(MAX_HELPER_FRAME.to_bytes(4)) == []
    with pytest.raises(RemoteProtocolError):
        helper_decoder().feed((MAX_HELPER_FRAME + 1).to_bytes(4))


def test_dns_decoder_takes_the_longest_dns_message() -> None:
    # Two length bytes cannot say more than 65535, which is also the DNS limit.
    decoder = dns_decoder()
    message = b"m" * MAX_DNS_MESSAGE
    assert decoder.feed(h("ffff") + message) == [message]


# ---- Hypothesis: any chunking gives the same messages ----

messages_strategy = st.lists(st.binary(max_size=300), max_size=12)


@PROPERTY
@given(messages=messages_strategy, prefix=st.sampled_from([2, 4]), data=st.data())
def test_any_chunking_gives_the_same_messages(
    messages: list[bytes], prefix: int, data: st.DataObject
) -> None:
    stream = b"".join(len(m).to_bytes(prefix) + m for m in messages)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    decoder = FrameDecoder(prefix, 300)
    assert feed_all(decoder, split_at(stream, cuts)) == messages
    assert decoder.pending == 0


@PROPERTY
@given(messages=messages_strategy, tail=st.binary(max_size=300), data=st.data())
def test_an_incomplete_last_frame_stays_pending(
    messages: list[bytes], tail: bytes, data: st.DataObject
) -> None:
    stream = b"".join(dns_frame(m) for m in messages)
    # A frame cut short anywhere (even inside its length) is held, never returned.
    last = dns_frame(tail)
    partial = last[: data.draw(st.integers(0, len(last) - 1), label="kept")]
    cuts = data.draw(st.lists(st.integers(0, len(stream + partial)), max_size=20), label="cuts")
    decoder = dns_decoder()
    assert feed_all(decoder, split_at(stream + partial, cuts)) == messages
    assert decoder.pending == len(partial)


# == DNS over TCP ==============================================================================


@pytest.mark.parametrize(
    ("message", "frame"),
    [
        pytest.param(b"", h("0000"), id="empty"),
        pytest.param(h("1234 0100 0001"), h("0006 1234 0100 0001"), id="short"),
    ],
)
def test_dns_frame(message: bytes, frame: bytes) -> None:
    assert dns_frame(message) == frame


def test_dns_frame_takes_65535_bytes() -> None:
    assert dns_frame(b"q" * MAX_DNS_MESSAGE)[:2] == h("ffff")


def test_dns_frame_refuses_more_than_65535_bytes() -> None:
    with pytest.raises(ValueError, match="65536"):
        dns_frame(b"q" * (MAX_DNS_MESSAGE + 1))


# A query header: ID=0xbeef, RD set, one question, no answers (12 bytes, RFC 1035 4.1.1).
DNS_HEADER = h("beef 0100 0001 0000 0000 0000")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param(b"", None, id="empty"),
        pytest.param(h("beef"), None, id="id-only"),
        pytest.param(DNS_HEADER[:11], None, id="eleven-bytes"),
        pytest.param(DNS_HEADER, 0xBEEF, id="header"),
        pytest.param(DNS_HEADER + b"\x07example\x03com\x00", 0xBEEF, id="with-question"),
        pytest.param(h("0000") + DNS_HEADER[2:], 0, id="id-zero-is-an-id"),
    ],
)
def test_dns_id(message: bytes, expected: int | None) -> None:
    assert dns_id(message) == expected


# == UDP helper frames =========================================================================


@pytest.mark.parametrize(
    ("host", "port", "payload", "frame"),
    [
        pytest.param(
            "192.0.2.7",
            53,
            b"q",
            h("00000008", "01 c0000207 0035", "71"),
            id="ipv4",
        ),
        pytest.param(
            "2001:db8::1",
            443,
            b"",
            h("00000013", "04 20010db8 00000000 00000000 00000001 01bb"),
            id="ipv6",
        ),
        pytest.param(
            "localhost",
            7,
            b"ping",
            h("00000011", "03 09 6c6f63616c686f7374 0007", "70696e67"),
            id="name",
        ),
    ],
)
def test_helper_frame(host: str, port: int, payload: bytes, frame: bytes) -> None:
    assert helper_frame(host, port, payload) == frame
    decoder = helper_decoder()
    (body,) = decoder.feed(frame)
    assert parse_helper_frame(body) == HelperFrame(host, port, payload)


def test_helper_frame_takes_the_largest_datagram_with_the_longest_name() -> None:
    # The limit is sized for exactly this: the largest IPv4 UDP payload, 255-byte name.
    name, payload = "n" * 255, b"p" * 65507
    frame = helper_frame(name, 65535, payload)
    assert len(frame) == 4 + MAX_HELPER_FRAME
    (body,) = helper_decoder().feed(frame)
    assert parse_helper_frame(body) == HelperFrame(name, 65535, payload)


def test_helper_frame_refuses_a_body_over_the_limit() -> None:
    # IPv4 adds 7 bytes of address, so this payload is 7 bytes too many.
    with pytest.raises(ValueError, match="datagram"):
        helper_frame("192.0.2.7", 53, b"p" * MAX_HELPER_FRAME)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(h("09 c0000207 0035"), id="unknown-atyp"),
        pytest.param(h("01 c0000207"), id="no-port"),
        pytest.param(h("03 00 0035"), id="empty-name"),
        pytest.param(h("03 02 c328 0035"), id="invalid-utf8"),
    ],
)
def test_parse_helper_frame_refuses_bad_addresses(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_helper_frame(body)


helper_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]{1,20}){0,3}", fullmatch=True),
)


@PROPERTY
@given(
    frames=st.lists(
        st.tuples(helper_hosts, st.integers(0, 65535), st.binary(max_size=200)), max_size=8
    ),
    data=st.data(),
)
def test_helper_frames_round_trip_through_the_decoder(
    frames: list[tuple[str, int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(helper_frame(*frame) for frame in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    bodies = feed_all(helper_decoder(), split_at(stream, cuts))
    parsed = [parse_helper_frame(body) for body in bodies]
    assert parsed == [HelperFrame(host, port, payload) for host, port, payload in frames]
