"""Datagrams carried over byte streams: pure framing, no I/O.

SSH has no UDP channel, so the UDP relay turns datagrams into streams two ways:

- DNS over TCP (RFC 1035 section 4.2.2, RFC 7766): each message is preceded by its
  length in two bytes. Any DNS server answers this way, so no software is needed on the
  SSH server: a ``direct-tcpip`` channel to port 53 is enough.
- The UDP helper (``--udp-helper``): a small program on the server reads and writes
  frames of ``LENGTH(4) ATYP ADDR PORT PAYLOAD`` on its stdin and stdout, the address
  encoded as in RFC 1928 (the destination going out, the source coming back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .errors import RemoteProtocolError
from .socks import decode_address, encode_address

DNS_PORT: Final = 53
# A DNS message over TCP is at most 65535 bytes: its length must fit two bytes.
MAX_DNS_MESSAGE: Final = 0xFFFF
# The largest UDP payload (IPv4: 65535 - 20 - 8) plus the longest address.
MAX_HELPER_FRAME: Final = 65507 + 1 + 1 + 255 + 2
# What the helper writes first, so that a shell's error message is never taken for data.
HELPER_HELLO: Final = b"PYTUNNEL-UDP 1\n"


class FrameDecoder:
    """Splits a byte stream into length-prefixed messages, however it is chunked."""

    def __init__(self, prefix: int, limit: int) -> None:
        self._prefix = prefix
        self._limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by ``data``. A length above the limit raises
        :class:`RemoteProtocolError`: the stream cannot be trusted after it."""
        buf = self._buffer
        buf += data
        messages: list[bytes] = []
        start = 0
        prefix = self._prefix
        while len(buf) - start >= prefix:
            size = int.from_bytes(buf[start : start + prefix])
            if size > self._limit:
                raise RemoteProtocolError(f"frame of {size} bytes (limit {self._limit})")
            end = start + prefix + size
            if len(buf) < end:
                break
            messages.append(bytes(buf[start + prefix : end]))
            start = end
        del buf[:start]
        return messages

    @property
    def pending(self) -> int:
        return len(self._buffer)


def dns_decoder() -> FrameDecoder:
    return FrameDecoder(2, MAX_DNS_MESSAGE)


def dns_frame(message: bytes) -> bytes:
    """One DNS message as DNS over TCP sends it."""
    if len(message) > MAX_DNS_MESSAGE:
        raise ValueError(f"DNS message of {len(message)} bytes")
    return len(message).to_bytes(2) + message


def dns_id(message: bytes) -> int | None:
    """The 16-bit ID that pairs a DNS answer with its query; None if too short."""
    return int.from_bytes(message[:2]) if len(message) >= 12 else None


@dataclass(frozen=True, slots=True)
class HelperFrame:
    host: str
    port: int
    payload: bytes


def helper_decoder() -> FrameDecoder:
    return FrameDecoder(4, MAX_HELPER_FRAME)


def helper_frame(host: str, port: int, payload: bytes) -> bytes:
    body = encode_address(host, port) + payload
    if len(body) > MAX_HELPER_FRAME:
        raise ValueError(f"datagram of {len(payload)} bytes")
    return len(body).to_bytes(4) + body


def parse_helper_frame(frame: bytes) -> HelperFrame:
    _, host, port, end = decode_address(frame)
    return HelperFrame(host, port, frame[end:])
