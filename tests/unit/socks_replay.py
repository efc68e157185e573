"""Replay helpers shared by the SOCKS codec tables and the Hypothesis properties.

A replay feeds the codec a list of chunks the way the proxy does: after every chunk it
drains ``next_event()`` until the codec asks for more data, and collects what the codec
wants to send. The result is a plain value, so two replays of the same bytes with
different chunkings can be compared with ``==``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tunnel.errors import RemoteProtocolError
from tunnel.socks import NEED_DATA, AddressType, Request, ServerConnection, SocksVersion, State

# Short names for the codec tables and properties.
V4 = SocksVersion.SOCKS4
V5 = SocksVersion.SOCKS5
IPV4 = AddressType.IPV4
IPV6 = AddressType.IPV6
NAME = AddressType.DOMAINNAME

GREETING = "05 01 00"  # VER NMETHODS=1 METHODS=[NO AUTH]
METHOD_NO_AUTH = bytes.fromhex("05 00")
S4_FAIL = bytes.fromhex("00 5b 0000 00000000")


def h(*parts: str) -> bytes:
    """Bytes from hex words, so a vector reads like the RFC's field table."""
    return bytes.fromhex(" ".join(parts))


@dataclass(frozen=True)
class Outcome:
    """Everything observable about one replay."""

    requests: tuple[Request, ...]
    sent: bytes
    # None: no RemoteProtocolError; otherwise the reply the error carried (maybe b"").
    error_reply: bytes | None
    # None unless a request is complete and awaits a decision.
    trailing: bytes | None
    state: State
    # How many input bytes had been fed when the request (or the error) came out.
    decided_at: int | None


def replay(chunks: Sequence[bytes]) -> Outcome:
    conn = ServerConnection()
    requests: list[Request] = []
    sent = bytearray()
    error_reply: bytes | None = None
    decided_at: int | None = None
    fed = 0
    for chunk in chunks:
        conn.receive_data(chunk)
        fed += len(chunk)
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                assert isinstance(event, Request), f"unexpected event {event!r}"
                requests.append(event)
                decided_at = fed
        except RemoteProtocolError as exc:
            error_reply = exc.reply
            decided_at = fed
        finally:
            sent += conn.data_to_send()
        if error_reply is not None:
            break
    trailing = conn.trailing_data if conn.state is State.AWAITING_DECISION else None
    return Outcome(tuple(requests), bytes(sent), error_reply, trailing, conn.state, decided_at)


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, repeats and 0/len allowed)."""
    points = sorted({0, len(data), *(cut for cut in cuts if 0 <= cut <= len(data))})
    return [data[start:end] for start, end in itertools.pairwise(points)] or [b""]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def two_way_splits(data: bytes) -> Iterator[tuple[int, list[bytes]]]:
    for cut in range(1, len(data)):
        yield cut, [data[:cut], data[cut:]]
