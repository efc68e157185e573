"""The UDP helper script (tunnel/udp_helper.py) run as the SSH server would run it, but
locally: a subprocess fed frames on stdin, talking UDP to a loopback echo server, its
replies read from stdout. Then the same through the shell command pytunnel sends
(``helper_command()``), which carries the script compressed inline.

Every read has a deadline (select) so that a broken helper fails the test instead of
hanging it; the deadline guards against hangs and is no performance threshold. Every
process is killed in a finally.
"""

from __future__ import annotations

import ast
import base64
import ipaddress
import os
import re
import select
import shlex
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fixtures.net import LOOPBACK4, LOOPBACK6, ipv6_loopback_available
from fixtures.udp_targets import ECHO_PREFIX, UdpEcho
from hypothesis import given, settings
from hypothesis import strategies as st

import tunnel
from tunnel import udp_helper
from tunnel.datagrams import (
    HELPER_HELLO,
    MAX_HELPER_FRAME,
    HelperFrame,
    helper_frame,
    parse_helper_frame,
)
from tunnel.socks import AddressType
from tunnel.udp import helper_command

HELPER_SCRIPT = Path(tunnel.__file__).parent / "udp_helper.py"
# Long enough for a loaded CI machine to start Python; only reached when something hangs.
DEADLINE = 20.0


class HelperProcess:
    """The helper as a subprocess, with deadline-bounded reads of its stdout."""

    def __init__(self, argv: Sequence[str], cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            cwd=cwd,
        )
        self._buffer = bytearray()

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        view = memoryview(data)
        while view:
            written = self.proc.stdin.write(view)
            assert written is not None, "stdin is blocking: write() always writes something"
            view = view[written:]

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def read_exact(self, size: int) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + DEADLINE
        while len(self._buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"helper sent {bytes(self._buffer)!r}, wanted {size} bytes")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"helper closed stdout (status {self.proc.poll()}): {self._why()}")
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_hello(self) -> bytes:
        return self.read_exact(len(HELPER_HELLO))

    def read_frame(self) -> HelperFrame:
        size = int.from_bytes(self.read_exact(4))
        return parse_helper_frame(self.read_exact(size))

    def wait(self) -> int:
        return self.proc.wait(timeout=DEADLINE)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def _why(self) -> str:
        # Only once the process has ended: reading stderr earlier could block.
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode("utf-8", "replace")


@pytest.fixture
def helper() -> Iterator[HelperProcess]:
    process = HelperProcess([sys.executable, str(HELPER_SCRIPT)])
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def echo() -> Iterator[UdpEcho]:
    with UdpEcho(LOOPBACK4) as server:
        yield server


def h(*parts: str) -> bytes:
    return bytes.fromhex(" ".join(parts))


# == the script as a subprocess ==================================================================


def test_hello_comes_first_then_the_echo(helper: HelperProcess, echo: UdpEcho) -> None:
    # The frame goes in before anything is read: the hello must still come out first.
    helper.send(helper_frame(LOOPBACK4, echo.port, b"ping"))
    assert helper.read_hello() == b"PYTUNNEL-UDP 1\n"
    assert helper.read_frame() == HelperFrame(LOOPBACK4, echo.port, ECHO_PREFIX + b"ping")


def test_ipv4_frame_written_by_hand(helper: HelperProcess, echo: UdpEcho) -> None:
    # LENGTH(4) ATYP=1 127.0.0.1 PORT "hi": the format spelled out, not via helper_frame.
    body = h("01 7f000001") + echo.port.to_bytes(2) + b"hi"
    helper.send(len(body).to_bytes(4) + body)
    assert helper.read_hello() == HELPER_HELLO
    reply_size = int.from_bytes(helper.read_exact(4))
    reply = helper.read_exact(reply_size)
    # The source address comes back in the same encoding: ATYP=1 127.0.0.1 echo's port.
    assert reply == h("01 7f000001") + echo.port.to_bytes(2) + ECHO_PREFIX + b"hi"


@pytest.mark.skipif(not ipv6_loopback_available(), reason="IPv6 loopback (::1) not available")
def test_ipv6_destination(helper: HelperProcess) -> None:
    with UdpEcho(LOOPBACK6) as echo6:
        helper.send(helper_frame(LOOPBACK6, echo6.port, b"six"))
        assert helper.read_hello() == HELPER_HELLO
        assert helper.read_frame() == HelperFrame(LOOPBACK6, echo6.port, ECHO_PREFIX + b"six")


def test_name_is_resolved_by_the_helper(helper: HelperProcess) -> None:
    # The helper sends to the first address "localhost" resolves to; listen there.
    address = str(socket.getaddrinfo("localhost", None, 0, socket.SOCK_DGRAM)[0][4][0])
    if address == LOOPBACK6 and not ipv6_loopback_available():
        pytest.skip("localhost resolves to ::1, which is not available")
    with UdpEcho(address) as named:
        helper.send(helper_frame("localhost", named.port, b"by-name"))
        assert helper.read_hello() == HELPER_HELLO
        # The reply says where it really came from: an address, not the name.
        assert helper.read_frame() == HelperFrame(address, named.port, ECHO_PREFIX + b"by-name")


def framed(body: bytes) -> bytes:
    return len(body).to_bytes(4) + body


MALFORMED_BODIES = [
    pytest.param(h("09 7f000001 0007", "78"), id="unknown-atyp"),
    pytest.param(h("00 7f000001 0007"), id="atyp-zero"),
    pytest.param(h("01 7f0000"), id="ipv4-cut-short"),
    pytest.param(h("04 00000000 00000000"), id="ipv6-cut-short"),
    pytest.param(h("03 09 6c6f63616c"), id="name-cut-short"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("bad", MALFORMED_BODIES)
def test_malformed_frames_are_skipped(helper: HelperProcess, echo: UdpEcho, bad: bytes) -> None:
    helper.send(framed(bad) + helper_frame(LOOPBACK4, echo.port, b"after"))
    assert helper.read_hello() == HELPER_HELLO
    # The next reply is the good frame's: the bad one sent nothing and broke nothing.
    assert helper.read_frame() == HelperFrame(LOOPBACK4, echo.port, ECHO_PREFIX + b"after")
    helper.send(helper_frame(LOOPBACK4, echo.port, b"again"))
    assert helper.read_frame() == HelperFrame(LOOPBACK4, echo.port, ECHO_PREFIX + b"again")
    assert len(echo.sources) == 2
    assert helper.proc.poll() is None


def test_frames_arriving_byte_by_byte(helper: HelperProcess, echo: UdpEcho) -> None:
    assert helper.read_hello() == HELPER_HELLO
    for byte in helper_frame(LOOPBACK4, echo.port, b"slow"):
        helper.send(bytes((byte,)))
    assert helper.read_frame() == HelperFrame(LOOPBACK4, echo.port, ECHO_PREFIX + b"slow")


def test_several_frames_in_one_write(helper: HelperProcess, echo: UdpEcho) -> None:
    payloads = [b"one", b"two", b"three"]
    helper.send(b"".join(helper_frame(LOOPBACK4, echo.port, p) for p in payloads))
    assert helper.read_hello() == HELPER_HELLO
    replies = [helper.read_frame() for _ in payloads]
    # UDP may reorder; each datagram must come back once.
    assert sorted(r.payload for r in replies) == sorted(ECHO_PREFIX + p for p in payloads)
    assert {(r.host, r.port) for r in replies} == {(LOOPBACK4, echo.port)}


def test_a_frame_at_the_limit_is_read_and_the_helper_goes_on(
    helper: HelperProcess, echo: UdpEcho
) -> None:
    # The largest frame the limit allows carries a payload no IPv4 datagram can hold:
    # sendto fails, and UDP has no way to say so. The helper must drop it and go on.
    oversized = framed(h("01 7f000001") + echo.port.to_bytes(2) + b"x" * (MAX_HELPER_FRAME - 7))
    assert len(oversized) == 4 + MAX_HELPER_FRAME
    helper.send(oversized + helper_frame(LOOPBACK4, echo.port, b"small"))
    assert helper.read_hello() == HELPER_HELLO
    assert helper.read_frame() == HelperFrame(LOOPBACK4, echo.port, ECHO_PREFIX + b"small")


def test_stdin_eof_exits_zero(helper: HelperProcess) -> None:
    assert helper.read_hello() == HELPER_HELLO
    helper.close_stdin()
    assert helper.wait() == 0


def test_stdin_eof_in_the_middle_of_a_frame_exits_zero(helper: HelperProcess) -> None:
    assert helper.read_hello() == HELPER_HELLO
    helper.send(helper_frame(LOOPBACK4, 9, b"cut")[:6])
    helper.close_stdin()
    assert helper.wait() == 0


def test_over_limit_length_exits_2(helper: HelperProcess) -> None:
    assert helper.read_hello() == HELPER_HELLO
    # Only the length: the helper must not wait for 64 KiB that will never be trusted.
    helper.send((MAX_HELPER_FRAME + 1).to_bytes(4))
    assert helper.wait() == 2


def test_over_limit_length_after_a_good_frame_exits_2(helper: HelperProcess, echo: UdpEcho) -> None:
    helper.send(helper_frame(LOOPBACK4, echo.port, b"first"))
    assert helper.read_hello() == HELPER_HELLO
    assert helper.read_frame() == HelperFrame(LOOPBACK4, echo.port, ECHO_PREFIX + b"first")
    helper.send(h("ffffffff"))
    assert helper.wait() == 2


# == through the shell command pytunnel sends ===================================================


def test_helper_command_round_trip_through_sh(echo: UdpEcho, tmp_path: Path) -> None:
    # Run from an empty directory: the script must come from the command line alone.
    process = HelperProcess(["sh", "-c", helper_command()], cwd=tmp_path)
    try:
        process.send(helper_frame(LOOPBACK4, echo.port, b"via sh"))
        assert process.read_hello() == HELPER_HELLO
        assert process.read_frame() == HelperFrame(LOOPBACK4, echo.port, ECHO_PREFIX + b"via sh")
        process.close_stdin()
        assert process.wait() == 0
    finally:
        process.kill()


def test_helper_command_carries_the_script_compressed() -> None:
    argv = shlex.split(helper_command())
    assert argv[:2] == ["python3", "-c"]
    assert len(argv) == 3
    match = re.fullmatch(
        r"import base64,zlib;exec\(zlib\.decompress\(base64\.b64decode\('([A-Za-z0-9+/=]+)'\)\)\)",
        argv[2],
    )
    assert match is not None, argv[2]
    assert zlib.decompress(base64.b64decode(match.group(1))) == HELPER_SCRIPT.read_bytes()


# == the script's own pieces, imported ==========================================================


def test_script_and_pytunnel_agree_on_the_constants() -> None:
    # The script cannot import tunnel (it runs alone on the server): its copies must match.
    assert udp_helper.HELLO == HELPER_HELLO
    assert udp_helper.MAX_FRAME == MAX_HELPER_FRAME
    assert (udp_helper.IPV4, udp_helper.NAME, udp_helper.IPV6) == (
        AddressType.IPV4,
        AddressType.DOMAINNAME,
        AddressType.IPV6,
    )


def test_script_parses_as_python_3_6() -> None:
    # Servers run old Pythons: no syntax newer than 3.6 (walrus, positional-only, match).
    ast.parse(HELPER_SCRIPT.read_text(), feature_version=(3, 6))


ip_hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
host_names = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?(\.[a-z]{1,10}){0,3}", fullmatch=True
)
ports = st.integers(0, 65535)
payloads = st.binary(max_size=256)


@settings(max_examples=250, deadline=None)
@given(host=ip_hosts, port=ports, payload=payloads)
def test_script_encodes_replies_as_pytunnel_reads_them(
    host: str, port: int, payload: bytes
) -> None:
    # What the script writes (source addresses are always IP addresses) is what
    # tunnel.datagrams writes for the same datagram, byte for byte.
    assert udp_helper.encode(host, port, payload) == helper_frame(host, port, payload)


@pytest.mark.parametrize("bad", MALFORMED_BODIES)
def test_script_decode_refuses_malformed_bodies(bad: bytes) -> None:
    # The subprocess tests can only see that nothing came back; a cut-short name could
    # also be "sent" to a garbage name that fails to resolve. Here the refusal is direct.
    assert udp_helper.decode(bad) is None


def test_script_drops_the_zone_id_of_a_link_local_source() -> None:
    # recvfrom names link-local sources with their interface; the frame has no room.
    assert udp_helper.encode("fe80::1%lo", 53, b"a") == helper_frame("fe80::1", 53, b"a")


@settings(max_examples=250, deadline=None)
@given(host=st.one_of(ip_hosts, host_names), port=ports, payload=payloads)
def test_script_decodes_what_pytunnel_sends(host: str, port: int, payload: bytes) -> None:
    body = helper_frame(host, port, payload)[4:]
    decoded = udp_helper.decode(body)
    assert decoded is not None
    decoded_host, decoded_port, decoded_payload = decoded
    assert (decoded_port, decoded_payload) == (port, payload)
    # Addresses as addresses: inet_ntop and ipaddress spell some differently
    # (::ffff:0.0.0.0 and ::ffff:0:0). Names exactly as sent.
    if _is_ip(host):
        assert ipaddress.ip_address(decoded_host) == ipaddress.ip_address(host)
    else:
        assert decoded_host == host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
