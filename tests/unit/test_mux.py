"""The PROTOCOL.mux codec of tunnel.mux, byte by byte, and ControlPath's tokens against
the real ``ssh -G``."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.config import expand_control_path
from tunnel.errors import ConfigError
from tunnel.mux import (
    MAX_FRAME,
    ChannelRequest,
    Close,
    Data,
    Eof,
    Frames,
    Hello,
    MuxMessage,
    MuxProtocolError,
    MuxReply,
    OpenConfirmation,
    OpenFailure,
    WindowAdjust,
    encode_alive_check,
    encode_close,
    encode_data,
    encode_eof,
    encode_hello,
    encode_open_direct_tcpip,
    encode_proxy,
    encode_window_adjust,
    parse_mux,
    parse_packet,
)

# Named vectors, written out from PROTOCOL.mux and RFC 4254 by hand.
HELLO = bytes.fromhex("000000080000000100000004")
ALIVE_CHECK_7 = bytes.fromhex("000000081000000400000007")
PROXY_2 = bytes.fromhex("000000081000000f00000002")
DATA_5_HI = bytes.fromhex("0000000c005e0000000500000002") + b"hi"
EOF_5 = bytes.fromhex("00000006006000000005")
CLOSE_5 = bytes.fromhex("00000006006100000005")
ADJUST_5 = bytes.fromhex("0000000a005d0000000500010000")
OPEN_3 = (
    bytes.fromhex("00000042005a")
    + bytes.fromhex("0000000c")
    + b"direct-tcpip"
    + bytes.fromhex("000000030020000000008000")
    + bytes.fromhex("0000000b")
    + b"example.com"
    + bytes.fromhex("00000050")
    + bytes.fromhex("00000009")
    + b"127.0.0.1"
    + bytes.fromhex("0000d431")
)


def test_encoders_match_the_named_vectors() -> None:
    assert encode_hello() == HELLO
    assert encode_alive_check(7) == ALIVE_CHECK_7
    assert encode_proxy(2) == PROXY_2
    assert encode_data(5, b"hi") == DATA_5_HI
    assert encode_eof(5) == EOF_5
    assert encode_close(5) == CLOSE_5
    assert encode_window_adjust(5, 0x10000) == ADJUST_5
    assert encode_open_direct_tcpip(3, "example.com", 80, ("127.0.0.1", 54321), 0x200000) == OPEN_3


# What a master sends, as (frame on the wire, what it parses to).
MUX_REPLIES = [
    (HELLO, Hello(4)),
    (bytes.fromhex("0000000c800000050000000100003039"), MuxReply(MuxMessage.S_ALIVE, 1, 12345)),
    (bytes.fromhex("000000088000000f00000002"), MuxReply(MuxMessage.S_PROXY, 2)),
    (
        bytes.fromhex("00000010800000020000000200000004") + b"nope",
        MuxReply(MuxMessage.S_PERMISSION_DENIED, 2, "nope"),
    ),
]
PACKETS = [
    (DATA_5_HI, Data(5, b"hi")),
    (EOF_5, Eof(5)),
    (CLOSE_5, Close(5)),
    (ADJUST_5, WindowAdjust(5, 0x10000)),
    (
        bytes.fromhex("00000012005b00000003000000090020000000008000"),
        OpenConfirmation(3, 9, 0x200000, 0x8000),
    ),
    (
        bytes.fromhex("00000024005c000000030000000200000012")
        + b"Connection refused"
        + bytes.fromhex("00000000"),
        OpenFailure(3, 2, "Connection refused"),
    ),
    (
        bytes.fromhex("000000150062000000030000000a") + b"keepalive!" + b"\x01",
        ChannelRequest(3, "keepalive!", True),
    ),
]


@pytest.mark.parametrize(("wire", "expected"), MUX_REPLIES)
def test_mux_replies_byte_by_byte_and_whole(wire: bytes, expected: object) -> None:
    frames = Frames()
    got = [f for i in range(len(wire)) for f in frames.feed(wire[i : i + 1])]
    assert [parse_mux(f) for f in got] == [expected]
    assert [parse_mux(f) for f in Frames().feed(wire)] == [expected]


@pytest.mark.parametrize(("wire", "expected"), PACKETS)
def test_proxy_packets_byte_by_byte_and_whole(wire: bytes, expected: object) -> None:
    frames = Frames()
    got = [f for i in range(len(wire)) for f in frames.feed(wire[i : i + 1])]
    assert [parse_packet(f) for f in got] == [expected]
    assert [parse_packet(f) for f in Frames().feed(wire * 2)] == [expected, expected]


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    with pytest.raises(MuxProtocolError):
        Frames().feed((MAX_FRAME + 1).to_bytes(4, "big"))


@given(st.binary(max_size=200))
def test_random_bytes_from_the_master_only_raise_protocol_errors(data: bytes) -> None:
    try:
        for frame in Frames().feed(data):
            parse_packet(frame)
            parse_mux(frame)
    except MuxProtocolError:
        pass


@given(st.lists(st.binary(max_size=100), max_size=5), st.data())
def test_framing_does_not_depend_on_how_the_stream_is_cut(
    payloads: list[bytes], data: st.DataObject
) -> None:
    wire = b"".join(len(p).to_bytes(4, "big") + p for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    frames = Frames()
    got: list[bytes] = []
    last = 0
    for cut in [*cuts, len(wire)]:
        got += frames.feed(wire[last:cut])
        last = cut
    assert got == payloads


# -- ControlPath tokens ----------------------------------------------------------------

TEMPLATE = "/tmp/x/%h-%p-%r-%C-%L-%l-%u-%n-%d-%i-%%"


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
@pytest.mark.parametrize(
    ("dest", "port"), [("bob@Example.COM", "2222"), ("alice@10.0.0.1", "22"), ("web", "22")]
)
def test_tokens_expand_as_ssh_G_expands_them(dest: str, port: str) -> None:
    out = subprocess.run(
        ["ssh", "-F", "/dev/null", "-G", "-o", f"ControlPath={TEMPLATE}", "-p", port, dest],
        capture_output=True, text=True, timeout=30, check=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    expected = next(
        line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("controlpath ")
    )
    user, _, host = dest.rpartition("@")
    local = getpass.getuser()
    assert (
        expand_control_path(
            TEMPLATE,
            host=host,
            original_host=host,
            port=int(port),
            user=user or local,
            local_host=socket.gethostname(),
            local_user=local,
            home=os.path.expanduser("~"),
            uid=os.getuid(),
        )
        == expected
    )


def test_unknown_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="%z"):
        expand_control_path(
            "/tmp/%z", host="h", original_host="h", port=22, user="u",
            local_host="l", local_user="u", home="/home/u", uid=1,
        )  # fmt: skip


# -- the channel layer, driven by hand (no sockets) -------------------------------------


class _Transport:
    """Collects what MuxClient writes."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Sink:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.log: list[str] = []

    def remote_data(self, data: bytes) -> None:
        self.data.append(data)

    def remote_eof(self) -> None:
        self.log.append("eof")

    def remote_pause(self) -> None:
        self.log.append("pause")

    def remote_resume(self) -> None:
        self.log.append("resume")

    def remote_closed(self, exc: BaseException | None) -> None:
        self.log.append("closed")


def _proxy_frame(kind: int, payload: bytes) -> bytes:
    return (len(payload) + 2).to_bytes(4, "big") + bytes((0, kind)) + payload


async def _opened_channel() -> tuple[object, _Transport, _Sink, object]:
    import asyncio
    import struct as _struct

    from tunnel.mux import MuxClient

    loop = asyncio.get_running_loop()
    client = MuxClient(loop)
    transport = _Transport()
    client.connection_made(transport)  # type: ignore[arg-type]
    assert bytes(transport.written) == HELLO + ALIVE_CHECK_7[:8] + (1).to_bytes(4, "big") + PROXY_2
    client.data_received(
        HELLO
        + bytes.fromhex("0000000c800000050000000100000929")
        + bytes.fromhex("000000088000000f00000002")
    )
    assert client.pid == 0x929
    sink = _Sink()
    opening = loop.create_task(client.open_tcp("h", 80, ("127.0.0.1", 1), sink, 30.0))
    await asyncio.sleep(0)
    # The server's confirmation: our id 0, its id 77, a 64-byte window, 32-byte packets.
    client.data_received(_proxy_frame(91, _struct.pack(">IIII", 0, 77, 64, 32)))
    channel = await opening
    transport.written.clear()
    return client, transport, sink, channel


async def test_data_waits_while_paused_and_the_window_is_kept() -> None:
    from tunnel.mux import WINDOW

    client, transport, sink, channel = await _opened_channel()
    client.data_received(encode_data(0, b"early"))  # type: ignore[attr-defined]
    assert sink.data == []  # handed over paused: held until the reply is written
    channel.resume_reading()  # type: ignore[attr-defined]
    assert sink.data == [b"early"]
    # Beyond the window we granted: the master is broken; the control connection ends.
    client.data_received(encode_data(0, b"x" * (WINDOW + 1)))  # type: ignore[attr-defined]
    assert transport.closed


async def test_writes_respect_the_servers_window_and_packet_size() -> None:
    client, transport, _sink, channel = await _opened_channel()
    channel.write(b"a" * 100)  # type: ignore[attr-defined]
    # 64 bytes of window, 32 per packet: two packets, 36 bytes wait.
    assert bytes(transport.written) == encode_data(77, b"a" * 32) * 2
    channel.write_eof()  # type: ignore[attr-defined]
    assert bytes(transport.written).count(encode_eof(77)) == 0  # not before the data
    transport.written.clear()
    client.data_received(encode_window_adjust(0, 100))  # type: ignore[attr-defined]
    assert bytes(transport.written) == encode_data(77, b"a" * 32) + encode_data(
        77, b"a" * 4
    ) + encode_eof(77)


async def test_open_failure_maps_to_the_reply_table() -> None:
    import asyncio

    from tunnel.errors import ChannelOpenFailed, ReplyReason
    from tunnel.mux import MuxClient

    loop = asyncio.get_running_loop()
    client = MuxClient(loop)
    client.connection_made(_Transport())  # type: ignore[arg-type]
    client.data_received(HELLO + bytes.fromhex("000000088000000f00000002"))
    opening = loop.create_task(client.open_tcp("h", 80, ("127.0.0.1", 1), _Sink(), 30.0))
    await asyncio.sleep(0)
    failure = bytes.fromhex("0000000000000001") + (0).to_bytes(4, "big")
    client.data_received(_proxy_frame(92, failure))
    with pytest.raises(ChannelOpenFailed) as info:
        await opening
    assert info.value.reason is ReplyReason.CONNECTION_NOT_ALLOWED
    assert "no reason" in info.value.message
