"""The handover channel (``--master-mode handover``) on real sockets, with this test in
the master's place: it holds its end of the socket pair and the control connection's
other end, as the master would. Each case runs under asyncio's loop and under uvloop,
which pytunnel uses.

What it must do: nothing reaches the client before the proxy's reply has left; the
server's bytes reach the client whatever its pace; the counts are exact both ways; the
end of the master's side of the socket pair is the server's EOF and the control
connection's end (once the pair is drained) the connection's; closed from our side, the
client sees the end although the master still holds a copy of its socket."""

from __future__ import annotations

import asyncio
import os
import socket
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from fixtures.net import sock_recv_exactly

from tunnel import mux
from tunnel.channels import LentSocket

if not mux.HANDOVER_SUPPORTED:
    pytest.skip("handover needs TCP_INFO's byte counts (Linux)", allow_module_level=True)

TIMEOUT = 10.0


@dataclass
class Sink:
    """Records what the channel reports, and does with the client's socket what the
    proxy's client does: EOF shuts down its sending side, the close closes it."""

    proxy_side: socket.socket
    up: int = 0
    down: int = 0
    eof: bool = False
    closed: list[BaseException | None] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def remote_data(self, data: bytes) -> None:
        raise AssertionError("a handover channel sends to the client itself")

    def remote_eof(self) -> None:
        self.eof = True
        self.proxy_side.shutdown(socket.SHUT_WR)

    def remote_pause(self) -> None:
        raise AssertionError("not used in handover mode")

    def remote_resume(self) -> None:
        raise AssertionError("not used in handover mode")

    def remote_closed(self, exc: BaseException | None) -> None:
        self.closed.append(exc)
        self.ended.set()
        self.proxy_side.close()

    def lend_socket(self) -> LentSocket | None:
        return None

    def counted(self, up: int, down: int) -> None:
        self.up += up
        self.down += down


@dataclass
class Setup:
    """A client connected to the proxy's socket, the channel over a duplicate of it, and
    the master's ends: its end of the socket pair and the control connection's far end."""

    client: socket.socket
    proxy_side: socket.socket
    master_end: socket.socket
    control_far: socket.socket
    sink: Sink
    channel: mux._Handover
    unsent: list[int]

    def master_writes(self, data: bytes) -> None:
        self.master_end.sendall(data)

    def master_closes_its_end(self) -> None:
        self.master_end.close()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        proxy_side, _ = listener.accept()
    yield client, proxy_side
    client.close()
    proxy_side.close()


def make(client: socket.socket, proxy_side: socket.socket, consumed: int = 0) -> Setup:
    """What open_handover builds once the master said the channel is open."""
    proxy_side.setblocking(False)
    client.setblocking(False)
    ours, master_end = socket.socketpair()
    ours.setblocking(False)
    control, control_far = socket.socketpair()
    control.setblocking(False)
    sink = Sink(proxy_side)
    unsent = [0]
    lent = LentSocket(
        socket.socket(fileno=os.dup(proxy_side.fileno())), consumed, lambda: unsent[0]
    )
    channel = mux._Handover(sink, lent, ours, control)
    return Setup(client, proxy_side, master_end, control_far, sink, channel, unsent)


def test_nothing_overtakes_the_reply(
    run_loop: Callable[[Awaitable[None]], None], tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    """The server's first bytes wait in the socket pair until the proxy wants them and its own
    reply has left its transport's buffer."""

    async def main() -> None:
        setup = make(*tcp_pair)
        setup.master_writes(b"SSH-2.0-banner\r\n")
        await asyncio.sleep(0.05)
        with pytest.raises(BlockingIOError):
            setup.client.recv(100)  # paused: nothing yet
        setup.unsent[0] = 10  # the reply is still in the transport's buffer
        setup.channel.resume_reading()
        await asyncio.sleep(0.05)
        with pytest.raises(BlockingIOError):
            setup.client.recv(100)
        setup.unsent[0] = 0
        assert await sock_recv_exactly(setup.client, 16) == b"SSH-2.0-banner\r\n"
        assert setup.sink.down == 16
        setup.channel.close()

    run_loop(main())


def test_a_slow_client_gets_every_byte_in_order(
    run_loop: Callable[[Awaitable[None]], None], tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    """More than the socket pair and the client's socket hold: the channel waits for the
    client to take more (the pair fills, and the master would stop reading the
    channel)."""
    body = os.urandom(12 << 20)

    async def main() -> None:
        setup = make(*tcp_pair)
        setup.channel.resume_reading()
        loop = asyncio.get_running_loop()
        writer = loop.run_in_executor(None, setup.master_writes, body)
        await asyncio.sleep(0.2)  # the client reads nothing for a while
        received = await sock_recv_exactly(setup.client, len(body))
        await writer
        assert received == body
        assert setup.sink.down == len(body)
        setup.master_closes_its_end()
        assert await loop.sock_recv(setup.client, 1) == b""  # the server's EOF, passed on
        assert setup.sink.eof
        setup.channel.close()

    run_loop(main())


def test_the_pairs_end_is_the_servers_eof_and_the_controls_end_the_connections(
    run_loop: Callable[[Awaitable[None]], None], tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    async def main() -> None:
        setup = make(*tcp_pair)
        setup.channel.resume_reading()
        setup.master_writes(b"last words")
        setup.master_closes_its_end()
        assert await sock_recv_exactly(setup.client, 10) == b"last words"
        for _ in range(100):
            if setup.sink.eof:
                break
            await asyncio.sleep(0.01)
        assert setup.sink.eof
        assert setup.sink.closed == []  # the channel is not over until the master says so
        setup.control_far.close()
        await asyncio.wait_for(setup.sink.ended.wait(), TIMEOUT)
        assert setup.sink.closed == [None]

    run_loop(main())


def test_what_is_in_the_pair_when_the_channel_ends_still_arrives(
    run_loop: Callable[[Awaitable[None]], None], tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    async def main() -> None:
        setup = make(*tcp_pair)
        setup.master_writes(b"x" * 60_000)
        setup.control_far.close()  # the channel is gone before the proxy wanted the bytes
        await asyncio.sleep(0.05)
        setup.master_closes_its_end()
        assert setup.sink.closed == []
        setup.channel.resume_reading()
        assert await sock_recv_exactly(setup.client, 60_000) == b"x" * 60_000
        await asyncio.wait_for(setup.sink.ended.wait(), TIMEOUT)
        assert setup.sink.closed == [None]
        assert setup.sink.down == 60_000

    run_loop(main())


@pytest.mark.parametrize("fin", [True, False])
def test_the_upload_count_is_what_the_client_sent_after_the_handshake(
    run_loop: Callable[[Awaitable[None]], None],
    tcp_pair: tuple[socket.socket, socket.socket],
    fin: bool,
) -> None:
    """The kernel counts what the client's socket received; the handshake the proxy read
    itself comes off, and so does the client's FIN, which the kernel counts as a byte."""
    client, proxy_side = tcp_pair

    async def main() -> None:
        client.sendall(b"\x05\x01\x00")  # the handshake the proxy read
        assert proxy_side.recv(3) == b"\x05\x01\x00"
        setup = make(client, proxy_side, consumed=3)
        setup.channel.resume_reading()
        client.sendall(b"u" * 70_000)  # for the master, which reads the socket itself
        if fin:
            client.shutdown(socket.SHUT_WR)
        await asyncio.sleep(mux.COUNT_EVERY * 2.5)
        assert setup.sink.up == 70_000
        setup.master_closes_its_end()  # the server's EOF: we shut ours, the client closes
        assert await sock_recv_exactly(client, 1) == b""
        client.close()
        await asyncio.sleep(0.05)
        setup.control_far.close()
        await asyncio.wait_for(setup.sink.ended.wait(), TIMEOUT)
        assert setup.sink.up == 70_000

    run_loop(main())


def test_closed_from_our_side_the_client_sees_the_end(
    run_loop: Callable[[Awaitable[None]], None], tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    """The master still holds a copy of the socket: only a shutdown ends it for the
    client. Everything of ours is given back."""
    client, proxy_side = tcp_pair
    before = len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        setup = make(client, proxy_side)
        master_copy = os.dup(proxy_side.fileno())  # what the master holds
        try:
            setup.channel.resume_reading()
            setup.channel.close()
            client.settimeout(TIMEOUT)
            assert client.recv(1) == b""
            assert setup.sink.closed == []  # the proxy closed it: nothing to tell it
        finally:
            os.close(master_copy)
        setup.master_end.close()
        setup.control_far.close()

    run_loop(main())
    # Our end of the pair, the control connection and the duplicate are closed (the loop's own are
    # gone with it).
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_client_that_resets_ends_the_connection_with_the_error(
    run_loop: Callable[[Awaitable[None]], None], tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    client, proxy_side = tcp_pair

    async def main() -> None:
        setup = make(client, proxy_side)
        setup.channel.resume_reading()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # a reset
        await asyncio.sleep(0.05)
        setup.master_writes(b"y" * 10_000)
        await asyncio.wait_for(setup.sink.ended.wait(), TIMEOUT)
        (error,) = setup.sink.closed
        assert isinstance(error, (BrokenPipeError, ConnectionResetError))
        setup.control_far.close()

    run_loop(main())


def test_received_bytes_is_none_for_a_socket_without_tcp_counts() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert mux.received_bytes(ours) is None


def test_open_connections_share_one_read_buffer(
    run_loop: Callable[[Awaitable[None]], None],
) -> None:
    """1000 open connections once held 1000 read buffers of 256 KiB (304 MiB RSS in
    bench/run.py): a connection's channel must cost little memory of its own. Measured
    with tracemalloc, which counts Python's allocations, not the machine's load."""
    count = 20
    per_channel_limit = 16 * 1024

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            pairs = []
            for _ in range(count):
                client = socket.create_connection(listener.getsockname())
                pairs.append((client, listener.accept()[0]))
        mux._scratch()  # the one shared buffer, made once
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            setups = [make(client, proxy_side) for client, proxy_side in pairs]
            for setup in setups:
                setup.channel.resume_reading()
                setup.master_writes(b"z" * 1000)
            await asyncio.sleep(0.1)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        for setup in setups:
            assert await sock_recv_exactly(setup.client, 1000) == b"z" * 1000
            setup.channel.close()
            setup.master_end.close()
            setup.control_far.close()
            setup.client.close()
        assert grown < count * per_channel_limit, grown

    run_loop(main())
