"""SOCKS BIND in process: the ProxyServer against a scripted Binder, so that the peer
check, the wait limit and the order of the two replies can be driven exactly (the real
sshd path is in test_bind.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fixtures.fake_upstream import FakeChannel

from tunnel import events
from tunnel.channels import Channel, ChannelSink, IncomingHandler
from tunnel.errors import ChannelOpenFailed, ReplyReason
from tunnel.handlers import bind
from tunnel.proxy import ProxyServer
from tunnel.upstreams import Request

pytestmark = pytest.mark.timeout(30)

GREETING = b"\x05\x01\x00"
SOCKS5_BIND_TO_127_0_0_2 = b"\x05\x02\x00\x01\x7f\x00\x00\x02\x00\x00"
LISTEN_PORT = 4242


class ScriptedListener:
    host = "127.0.0.1"
    port = LISTEN_PORT

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class ScriptedBinder:
    """Records what the proxy asked for; the test plays the server's part."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.asked: list[tuple[str, int]] = []
        self.handler: IncomingHandler | None = None
        self.listener = ScriptedListener()
        self.listening = asyncio.Event()

    async def listen_tcp(self, host: str, port: int, handler: IncomingHandler) -> ScriptedListener:
        self.asked.append((host, port))
        if self.refuse:
            raise ChannelOpenFailed(ReplyReason.CONNECTION_NOT_ALLOWED, "refused by the script")
        self.handler = handler
        self.listening.set()
        return self.listener


class NoUpstream:
    name = "none"

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        raise AssertionError("BIND must not open a direct-tcpip channel")


@asynccontextmanager
async def bind_proxy(
    binder: ScriptedBinder, seen: list[events.Event]
) -> AsyncIterator[tuple[str, int]]:
    server = ProxyServer(NoUpstream(), seen.append, binder=binder)
    [listener] = await server.listen([("127.0.0.1", 0)])
    try:
        yield listener.host, listener.port
    finally:
        await server.close()


async def request_bind(
    address: tuple[str, int], request: bytes = SOCKS5_BIND_TO_127_0_0_2
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(GREETING + request)
    assert await reader.readexactly(2) == b"\x05\x00"
    return reader, writer


async def test_two_replies_and_only_the_named_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[events.Event] = []
    binder = ScriptedBinder()
    async with bind_proxy(binder, seen) as address:
        reader, writer = await request_bind(address)
        first = await reader.readexactly(10)
        # BND = where the server listens for the peer.
        assert first == b"\x05\x00\x00\x01\x7f\x00\x00\x01" + LISTEN_PORT.to_bytes(2)
        # A loopback DST.ADDR: the server only needs to listen on its loopback.
        assert binder.asked == [("127.0.0.1", 0)]
        # Data before the second reply waits for the peer's channel.
        writer.write(b"early")
        await writer.drain()
        assert binder.handler is not None
        assert binder.handler(("127.0.0.1", 5000)) is None  # not the DST.ADDR
        sink = binder.handler(("127.0.0.2", 5001))
        assert sink is not None
        assert binder.handler(("127.0.0.2", 5002)) is None  # one peer per BIND
        channel = FakeChannel()
        sink.channel_opened(channel)
        second = await reader.readexactly(10)
        assert second == b"\x05\x00\x00\x01\x7f\x00\x00\x02" + (5001).to_bytes(2)
        assert binder.listener.closed  # the server stops listening once the peer came
        assert channel.reading
        sink.remote_data(b"from the peer")
        assert await reader.readexactly(13) == b"from the peer"
        for _ in range(100):
            if bytes(channel.written) == b"early":
                break
            await asyncio.sleep(0.01)
        assert bytes(channel.written) == b"early"
        writer.write_eof()
        for _ in range(100):
            if channel.eof:
                break
            await asyncio.sleep(0.01)
        assert channel.eof
        sink.remote_closed(None)
        assert await reader.read() == b""
        writer.close()
    kinds = [type(event).__name__ for event in seen]
    assert "ChannelOpened" in kinds
    parsed = next(e for e in seen if isinstance(e, events.RequestParsed))
    assert (parsed.protocol, parsed.command, parsed.host) == ("socks5-bind", "BIND", "127.0.0.2")


async def test_no_peer_within_the_limit_is_ttl_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bind, "BIND_TIMEOUT", 0.2)
    seen: list[events.Event] = []
    binder = ScriptedBinder()
    async with bind_proxy(binder, seen) as address:
        reader, writer = await request_bind(address)
        assert (await reader.readexactly(10))[1] == 0x00
        second = await reader.readexactly(10)
        assert second[:2] == b"\x05\x06"
        assert await reader.read() == b""
        assert binder.listener.closed
        writer.close()
    [failed] = [e for e in seen if isinstance(e, events.ChannelFailed)]
    assert failed.reply == 6
    assert "127.0.0.2" in failed.reason


async def test_server_refusal_is_the_first_reply() -> None:
    seen: list[events.Event] = []
    async with bind_proxy(ScriptedBinder(refuse=True), seen) as address:
        reader, writer = await request_bind(address)
        assert (await reader.readexactly(10))[:2] == b"\x05\x02"
        assert await reader.read() == b""
        writer.close()


async def test_client_gone_stops_the_server_listening() -> None:
    binder = ScriptedBinder()
    async with bind_proxy(binder, []) as address:
        reader, writer = await request_bind(address)
        await reader.readexactly(10)
        writer.close()
        for _ in range(200):
            if binder.listener.closed:
                break
            await asyncio.sleep(0.01)
        assert binder.listener.closed
        assert binder.handler is not None
        assert binder.handler(("127.0.0.2", 5001)) is None


async def test_socks4_bind_replies_and_a_name_takes_any_peer() -> None:
    binder = ScriptedBinder()
    async with bind_proxy(binder, []) as address:
        reader, writer = await asyncio.open_connection(*address)
        # SOCKS4a BIND naming a host: the peer's address cannot be checked against it.
        writer.write(b"\x04\x02\x00\x15\x00\x00\x00\x01\x00ftp.example\x00")
        first = await reader.readexactly(8)
        assert first == b"\x00\x5a" + LISTEN_PORT.to_bytes(2) + socket.inet_aton("127.0.0.1")
        # Not loopback: the server is asked to listen on every interface.
        assert binder.asked == [("", 0)]
        assert binder.handler is not None
        sink = binder.handler(("192.0.2.7", 20))
        assert sink is not None
        sink.channel_opened(FakeChannel())
        second = await reader.readexactly(8)
        assert second == b"\x00\x5a" + (20).to_bytes(2) + socket.inet_aton("192.0.2.7")
        writer.close()
