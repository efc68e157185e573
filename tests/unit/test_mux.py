"""The PROTOCOL.mux codec of tunnel.mux, byte by byte, and ControlPath's tokens against
the real ``ssh -G``."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import threading

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
    encode_new_stdio_fwd,
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
# MUX_C_NEW_STDIO_FWD, request 1, reserved "", "db.internal", port 5432.
STDIO_FWD_1 = (
    bytes.fromhex("0000001f1000000800000001000000000000000b")
    + b"db.internal"
    + bytes.fromhex("00001538")
)
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
    assert encode_new_stdio_fwd(1, "db.internal", 5432) == STDIO_FWD_1
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
        bytes.fromhex("0000000c800000060000000100000011"),
        MuxReply(MuxMessage.S_SESSION_OPENED, 1, 17),
    ),
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


# -- stdio mode against a scripted master (the real one: tests/integration/test_master.py)


class _ScriptedMaster:
    """A listening socket that takes one control connection, says hello, reads the
    request and the two descriptors exactly as OpenSSH's master does, and answers with
    ``answer`` (None: never)."""

    def __init__(self, path: str, answer: bytes | None) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.answer = answer
        self.request = b""
        self.fds: list[int] = []
        self.fd_bytes: list[bytes] = []

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(HELLO)
            hello = _recv_exact(conn, len(HELLO))
            assert hello == HELLO
            length = int.from_bytes(_recv_exact(conn, 4), "big")
            self.request = length.to_bytes(4, "big") + _recv_exact(conn, length)
            for _ in range(2):
                # One descriptor per message, one byte with each: mm_receive_fd's way.
                data, fds, _flags, _addr = socket.recv_fds(conn, 1, 1)
                self.fd_bytes.append(data)
                self.fds.extend(fds)
            if self.answer is None:
                conn.recv(1)  # until the client gives up and closes
                return
            conn.sendall(self.answer)
            if self.answer.startswith(bytes.fromhex("0000000c80000006")):
                with socket.socket(fileno=self.fds[0]) as relayed:
                    relayed.sendall(b"from the far end")
                    assert relayed.recv(100) == b"from the client"
                os.close(self.fds[1])
                conn.recv(1)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


async def _stdio_against(
    tmp_path: object, answer: bytes | None, answer_within: float = 10.0
) -> tuple[_ScriptedMaster, object]:
    import asyncio

    from tunnel.mux import open_stdio

    path = os.path.join(str(tmp_path), "m.sock")
    master = _ScriptedMaster(path, answer)
    thread = threading.Thread(target=master.serve, daemon=True)
    thread.start()
    try:
        result: object = await open_stdio(path, "db.internal", 5432, _Sink(), answer_within)
    except Exception as exc:
        result = exc
    await asyncio.to_thread(thread.join, 10)
    master.listener.close()
    return master, result


async def test_stdio_request_passes_one_socket_twice_and_relays_through_it(
    tmp_path: object,
) -> None:
    import asyncio

    sink = _Sink()
    opened = bytes.fromhex("0000000c800000060000000100000011")
    path = os.path.join(str(tmp_path), "m.sock")
    master = _ScriptedMaster(path, opened)
    from tunnel.mux import open_stdio

    thread = threading.Thread(target=master.serve, daemon=True)
    thread.start()
    channel = await open_stdio(path, "db.internal", 5432, sink, 10.0)
    assert master.request == STDIO_FWD_1
    assert master.fd_bytes == [b"\0", b"\0"]
    await asyncio.sleep(0.2)
    assert sink.data == []  # handed over paused
    channel.resume_reading()
    channel.write(b"from the client")
    for _ in range(100):
        if "eof" in sink.log:
            break
        await asyncio.sleep(0.02)
    assert b"".join(sink.data) == b"from the far end"
    # The master closed both of its descriptors: the channel is over, ours is closed.
    assert sink.log[-2:] == ["eof", "closed"]
    await asyncio.to_thread(thread.join, 10)
    master.listener.close()


@pytest.mark.parametrize(
    ("answer", "reason", "words"),
    [
        (
            bytes.fromhex("0000002880000003000000010000001c") + b"Session open refused by peer",
            "GENERAL_FAILURE",
            "gives no reason",
        ),
        (
            bytes.fromhex("0000001d800000020000000100000011") + b"Permission denied",
            "CONNECTION_NOT_ALLOWED",
            "Permission denied",
        ),
        (b"", "GENERAL_FAILURE", "closed the control connection"),
    ],
)
async def test_stdio_failures_map_to_the_reply_table(
    tmp_path: object, answer: bytes, reason: str, words: str
) -> None:
    from tunnel.errors import ChannelOpenFailed

    _master, result = await _stdio_against(tmp_path, answer)
    assert isinstance(result, ChannelOpenFailed)
    assert result.reason.name == reason
    assert words in result.message


async def test_stdio_without_an_answer_times_out(tmp_path: object) -> None:
    from tunnel.errors import ChannelOpenFailed, ReplyReason

    _master, result = await _stdio_against(tmp_path, None, answer_within=0.5)
    assert isinstance(result, ChannelOpenFailed)
    assert result.reason is ReplyReason.TTL_EXPIRED


async def test_stdio_with_no_master_listening_is_a_general_failure(tmp_path: object) -> None:
    from tunnel.errors import ChannelOpenFailed, ReplyReason
    from tunnel.mux import open_stdio

    path = os.path.join(str(tmp_path), "nobody.sock")
    with pytest.raises(ChannelOpenFailed) as info:
        await open_stdio(path, "db.internal", 5432, _Sink(), 5.0)
    assert info.value.reason is ReplyReason.GENERAL_FAILURE
    assert path in info.value.message
