"""The proxy side at unit speed: a client connection (tunnel.proxy.ProxyClient) on a
fake transport, its handlers (CONNECT, BIND, UDP ASSOCIATE, HTTP) and a fake upstream
that records the Request each one builds. No SSH; no TCP sockets (UDP ASSOCIATE binds
its relay on 127.0.0.1, which is what it answers with)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import struct
from typing import Any

import pytest
from fixtures.fake_upstream import FakeChannel, FakeUpstream
from fixtures.replies import SOCKS4_FAILED, SOCKS4_OK, SOCKS5_OK, socks5_failure

from tunnel import events
from tunnel.channels import ChannelSink, IncomingHandler
from tunnel.errors import ChannelOpenFailed, ReplyReason
from tunnel.proxy import ProxyClient, ProxyServer
from tunnel.rules import Action, Rules, parse_rules
from tunnel.udp import UdpSettings
from tunnel.upstreams import Request

PEER = ("127.0.0.9", 40001)
LISTENER = ("127.0.0.1", 1080)
GREETING = b"\x05\x01\x00"
CONNECT_EXAMPLE = b"\x05\x01\x00\x03\x0bexample.com\x00\x50"  # example.com:80


class FakeTransport(asyncio.Transport):
    """Keeps what the proxy writes; closing reports connection_lost on the next pass of
    the loop, as a socket transport does."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__({"peername": PEER, "sockname": LISTENER})
        self.protocol = protocol
        self.written = bytearray()
        self.reading = True
        self.closing = False
        self.eof = False
        self.gone = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "written after close"
        self.written += data

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self._lost)

    def abort(self) -> None:
        self.close()

    def _lost(self) -> None:
        self.protocol.connection_lost(None)
        self.gone.set()

    def get_write_buffer_size(self) -> int:
        return 0


class Harness:
    def __init__(self, upstream: Any = None, **options: Any) -> None:
        self.seen: list[events.Event] = []
        self.upstream = FakeUpstream() if upstream is None else upstream
        self.server = ProxyServer(self.upstream, self.seen.append, **options)
        self.client = ProxyClient(self.server)
        self.transport = FakeTransport(self.client)
        self.client.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        self.client.data_received(data)

    async def until(self, condition: Any) -> None:
        """Let the loop run until ``condition()`` holds (within a generous deadline)."""
        # Everything here is driven by ready callbacks, so polling once per pass of the
        # loop sees each step; nothing waits on a clock.
        async with asyncio.timeout(30):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0)

    async def written(self, size: int) -> bytes:
        await self.until(lambda: len(self.transport.written) >= size or self.transport.closing)
        return bytes(self.transport.written)

    def of(self, kind: type[events.Event]) -> list[Any]:
        return [event for event in self.seen if isinstance(event, kind)]


def expected_request(protocol: str, host: str, port: int, user: str | None = None) -> Request:
    return Request(host, port, PEER, protocol, user, "127.0.0.1:1080")


# -- CONNECT -----------------------------------------------------------------------


async def test_socks5_connect_replies_after_the_channel_opens_and_relays() -> None:
    h = Harness()
    h.send(GREETING + CONNECT_EXAMPLE + b"early")
    assert await h.written(2 + len(SOCKS5_OK)) == b"\x05\x00" + SOCKS5_OK
    assert h.upstream.requests == [expected_request("socks5", "example.com", 80)]
    [channel] = h.upstream.channels
    # The pipelined bytes follow the reply; the channel reads once the reply is out.
    assert channel.written == b"early"
    assert channel.reading
    assert h.transport.reading
    h.send(b"more")
    assert channel.written == b"earlymore"
    h.client.remote_data(b"answer")
    assert h.transport.written.endswith(b"answer")
    [opened] = h.of(events.ChannelOpened)
    assert opened.connection.bytes_up == len(b"earlymore")


@pytest.mark.parametrize(
    "reason",
    [
        ReplyReason.GENERAL_FAILURE,
        ReplyReason.CONNECTION_NOT_ALLOWED,
        ReplyReason.NETWORK_UNREACHABLE,
        ReplyReason.HOST_UNREACHABLE,
        ReplyReason.CONNECTION_REFUSED,
        ReplyReason.TTL_EXPIRED,
    ],
)
async def test_socks5_connect_failure_gets_its_reply(reason: ReplyReason) -> None:
    h = Harness(FakeUpstream(ChannelOpenFailed(reason, "the server said no")))
    h.send(GREETING + CONNECT_EXAMPLE)
    await h.transport.gone.wait()
    assert bytes(h.transport.written) == b"\x05\x00" + socks5_failure(int(reason))
    [failed] = h.of(events.ChannelFailed)
    assert (failed.reply, failed.reason) == (int(reason), "the server said no")


async def test_socks4_connect_success_and_failure() -> None:
    request = b"\x04\x01\x00\x50" + bytes([127, 0, 0, 5]) + b"me\x00"
    ok = Harness()
    ok.send(request)
    assert (await ok.written(8))[:2] == SOCKS4_OK
    assert ok.upstream.requests == [expected_request("socks4", "127.0.0.5", 80)]
    refused = Harness(FakeUpstream.refusing())
    refused.send(request)
    await refused.transport.gone.wait()
    assert bytes(refused.transport.written)[:2] == SOCKS4_FAILED


async def test_socks4a_request_names_its_protocol() -> None:
    h = Harness()
    h.send(b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.org\x00")
    await h.written(8)
    assert h.upstream.requests == [expected_request("socks4a", "example.org", 443)]


async def test_a_denied_request_is_rejected_before_any_upstream() -> None:
    h = Harness(rules=parse_rules([(Action.DENY, "example.com")]))
    h.send(GREETING + CONNECT_EXAMPLE)
    await h.transport.gone.wait()
    assert bytes(h.transport.written) == b"\x05\x00" + socks5_failure(0x02)
    assert h.upstream.requests == []
    [failed] = h.of(events.ChannelFailed)
    assert failed.reason.startswith("denied by ")


async def test_an_upstream_that_breaks_gets_a_general_failure() -> None:
    class Broken:
        name = "broken"

        async def open(self, request: Request, sink: ChannelSink) -> FakeChannel:
            raise RuntimeError("a bug")

    h = Harness(Broken())
    h.send(GREETING + CONNECT_EXAMPLE)
    await h.transport.gone.wait()
    assert bytes(h.transport.written) == b"\x05\x00" + socks5_failure(0x01)
    [failed] = h.of(events.ChannelFailed)
    assert "internal error" in failed.reason


async def test_socks5_login_names_the_user_in_the_request() -> None:
    h = Harness(credentials=(b"alice", b"secret"))
    login = b"\x01\x05alice\x06secret"
    h.send(b"\x05\x01\x02" + login + CONNECT_EXAMPLE)
    assert await h.written(4 + len(SOCKS5_OK)) == b"\x05\x02\x01\x00" + SOCKS5_OK
    assert h.upstream.requests == [expected_request("socks5", "example.com", 80, "alice")]


# -- BIND ---------------------------------------------------------------------------


class FakeListener:
    host = "127.0.0.1"
    port = 5555

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeBinder:
    def __init__(self) -> None:
        self.handler: IncomingHandler | None = None
        self.listener = FakeListener()

    async def listen_tcp(self, host: str, port: int, handler: IncomingHandler) -> FakeListener:
        self.handler = handler
        return self.listener


def socks5_reply(host: str, port: int) -> bytes:
    return b"\x05\x00\x00\x01" + ipaddress.IPv4Address(host).packed + struct.pack("!H", port)


async def test_bind_replies_twice_then_relays_the_peer() -> None:
    binder = FakeBinder()
    h = Harness(binder=binder)
    h.send(GREETING + b"\x05\x02\x00\x01" + bytes([127, 0, 0, 2]) + b"\x00\x00")
    first = socks5_reply("127.0.0.1", 5555)
    assert await h.written(2 + len(first)) == b"\x05\x00" + first
    assert binder.handler is not None
    # Only the peer the request named may connect.
    assert binder.handler(("127.0.0.3", 4000)) is None
    peer = binder.handler(("127.0.0.2", 4000))
    assert peer is not None
    channel = FakeChannel()
    peer.channel_opened(channel)
    second = socks5_reply("127.0.0.2", 4000)
    assert bytes(h.transport.written) == b"\x05\x00" + first + second
    assert channel.reading
    assert binder.listener.closed
    assert h.upstream.requests == []
    [parsed] = h.of(events.RequestParsed)
    assert parsed.protocol == "socks5-bind"


async def test_bind_where_not_offered_is_command_not_supported() -> None:
    h = Harness(reverse=True)
    h.send(GREETING + b"\x05\x02\x00\x01" + bytes([127, 0, 0, 2]) + b"\x00\x00")
    await h.transport.gone.wait()
    assert bytes(h.transport.written) == b"\x05\x00" + socks5_failure(0x07)
    [failed] = h.of(events.ChannelFailed)
    assert failed.reason == "BIND is not available on this listener"


async def test_bind_to_a_denied_peer_is_refused_before_the_server_listens() -> None:
    binder = FakeBinder()
    h = Harness(binder=binder, rules=parse_rules([(Action.DENY, "127.0.0.2")]))
    h.send(GREETING + b"\x05\x02\x00\x01" + bytes([127, 0, 0, 2]) + b"\x00\x00")
    await h.transport.gone.wait()
    assert bytes(h.transport.written) == b"\x05\x00" + socks5_failure(0x02)
    assert binder.handler is None


# -- UDP ASSOCIATE ------------------------------------------------------------------


async def test_udp_associate_replies_with_its_relay() -> None:
    seen: list[events.Event] = []
    settings = UdpSettings(upstream=FakeUpstream(), runner=None, rules=Rules(), emit=seen.append)
    h = Harness(udp=settings)
    h.send(GREETING + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    reply = (await h.written(12))[2:]
    assert reply[:8] == b"\x05\x00\x00\x01" + bytes([127, 0, 0, 1])
    assert struct.unpack("!H", reply[8:10])[0] != 0
    [opened] = h.of(events.ChannelOpened)
    assert opened.connection.protocol == "socks5-udp"
    # Closing the control connection ends the association.
    assert h.client.eof_received() is False
    await h.server.close()


# -- HTTP ---------------------------------------------------------------------------


async def test_http_connect_200_then_relay() -> None:
    h = Harness()
    h.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nhello")
    head = b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert await h.written(len(head)) == head
    assert h.upstream.requests == [expected_request("http-connect", "example.com", 443)]
    [channel] = h.upstream.channels
    assert channel.written == b"hello"
    assert channel.reading


@pytest.mark.parametrize(
    ("reason", "status"),
    [(ReplyReason.CONNECTION_REFUSED, b"502"), (ReplyReason.CONNECTION_NOT_ALLOWED, b"403")],
)
async def test_http_connect_failure_status(reason: ReplyReason, status: bytes) -> None:
    h = Harness(FakeUpstream(ChannelOpenFailed(reason, "no")))
    h.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    await h.transport.gone.wait()
    assert bytes(h.transport.written).startswith(b"HTTP/1.1 " + status + b" ")


async def test_http_connect_to_a_denied_host_is_403_without_an_upstream() -> None:
    h = Harness(rules=parse_rules([(Action.DENY, "example.com")]))
    h.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    await h.transport.gone.wait()
    assert bytes(h.transport.written).startswith(b"HTTP/1.1 403 ")
    assert h.upstream.requests == []


async def test_over_the_connection_limit_is_a_general_failure() -> None:
    h = Harness(max_clients=0)
    h.send(GREETING + CONNECT_EXAMPLE)
    await h.transport.gone.wait()
    assert bytes(h.transport.written) == b"\x05\x00" + socks5_failure(0x01)
    assert h.upstream.requests == []


async def test_http_basic_login_names_the_user_in_the_request() -> None:
    h = Harness(credentials=(b"bob", b"pw"))
    token = base64.b64encode(b"bob:pw")
    h.send(
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
        b"Proxy-Authorization: Basic " + token + b"\r\n\r\n"
    )
    await h.written(len(b"HTTP/1.1 200"))
    assert h.upstream.requests == [expected_request("http-connect", "example.com", 443, "bob")]


async def test_http_forward_builds_an_http_request() -> None:
    h = Harness()
    h.send(b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n")
    await h.until(lambda: bool(h.upstream.channels))
    assert h.upstream.requests == [expected_request("http", "example.com", 80)]
    [channel] = h.upstream.channels
    await h.until(lambda: channel.written.endswith(b"\r\n\r\n"))
    assert channel.written.startswith(b"GET /x HTTP/1.1\r\n")
    await h.server.close()


# -- ownership ------------------------------------------------------------------------


async def test_server_close_cancels_and_awaits_the_opening_task() -> None:
    class Hanging:
        name = "hanging"

        def __init__(self) -> None:
            self.started = asyncio.Event()
            self.ended = False

        async def open(self, request: Request, sink: ChannelSink) -> FakeChannel:
            self.started.set()
            try:
                await asyncio.Event().wait()
            finally:
                self.ended = True
            raise AssertionError("never opened")

    upstream = Hanging()
    h = Harness(upstream)
    h.send(GREETING + CONNECT_EXAMPLE)
    await upstream.started.wait()
    await h.server.close()
    assert upstream.ended
