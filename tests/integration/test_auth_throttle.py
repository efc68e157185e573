"""The login throttle end to end: pytunnel's proxy in-process, real clients (python-socks,
httpx) and raw sockets for the client that guesses.

The throttle here holds every failure past the free ones for an hour, so "this answer is
still held" needs no clock: the test ends long before. The policy's own numbers (1 s
doubling to 8 s) are tested on a fake clock in tests/unit/test_throttle.py.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from fixtures.in_process import EventLog
from fixtures.net import LOOPBACK4, sock_recv_exactly
from fixtures.targets import EchoTarget, HttpTarget
from python_socks.async_.asyncio import Proxy as AsyncProxy

from tunnel import events
from tunnel.proxy import ProxyServer
from tunnel.throttle import LoginThrottle
from tunnel.upstreams import Direct

pytestmark = pytest.mark.timeout(60)

USER = b"bob"
PASSWORD = b"right-password"
WRONG = b"wrong-password"
FREE = 3
# Held for longer than any test runs: "not answered yet" is a fact, not a race.
HOLD = 3600.0
DEADLINE = 10.0
# Another loopback address: another client, as far as the throttle knows.
OTHER_SOURCE = "127.0.0.2"


class ThrottleLog(EventLog):
    """The proxy's events, with a wait for the n-th wrong password."""

    def auth_rejections(self) -> list[events.ClientRejected]:
        return [e for e in self.seen if isinstance(e, events.ClientRejected) and e.auth]

    async def wait_auth_rejections(self, count: int) -> None:
        await self.wait_until(lambda: len(self.auth_rejections()) >= count, DEADLINE)


@dataclass
class Tunnel:
    proxy: ProxyServer
    log: ThrottleLog
    host: str
    port: int


@pytest.fixture
async def tunnel() -> AsyncIterator[Tunnel]:
    log = ThrottleLog()
    throttle = LoginThrottle(free=FREE, first=HOLD, cap=HOLD)
    proxy = ProxyServer(Direct(DEADLINE), log, credentials=(USER, PASSWORD), throttle=throttle)
    try:
        [listener] = await proxy.listen([(LOOPBACK4, 0)])
        yield Tunnel(proxy, log, listener.host, listener.port)
    finally:
        await proxy.close()


async def connect(tunnel: Tunnel, source: str = LOOPBACK4) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.wait_for(
        asyncio.get_running_loop().sock_connect(sock, (tunnel.host, tunnel.port)), DEADLINE
    )
    return sock


async def recv_exact(sock: socket.socket, count: int) -> bytes:
    return await sock_recv_exactly(sock, count, DEADLINE)


def nothing_arrived(sock: socket.socket) -> bool:
    """True if not a byte (nor EOF) has come back on ``sock`` so far; does not wait."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


async def socks5_login(sock: socket.socket, password: bytes) -> None:
    """RFC 1929: offer username/password, have it chosen, send the credentials."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"\x05\x01\x02")
    assert await recv_exact(sock, 2) == b"\x05\x02"
    await loop.sock_sendall(
        sock, b"\x01" + bytes([len(USER)]) + USER + bytes([len(password)]) + password
    )


async def socks5_wrong_password_answered(tunnel: Tunnel, source: str = LOOPBACK4) -> None:
    """One wrong password, answered (01 01, then the close) within the deadline."""
    sock = await connect(tunnel, source)
    with sock:
        await socks5_login(sock, WRONG)
        assert await recv_exact(sock, 3) == b"\x01\x01"


async def socks5_wrong_password_held(tunnel: Tunnel, source: str = LOOPBACK4) -> socket.socket:
    """A wrong password whose rejection was counted; its socket, for the caller to watch."""
    seen = len(tunnel.log.auth_rejections())
    sock = await connect(tunnel, source)
    await socks5_login(sock, WRONG)
    await tunnel.log.wait_auth_rejections(seen + 1)
    return sock


def still_open(tunnel: Tunnel, sock: socket.socket) -> bool:
    host, port = sock.getsockname()[:2]
    return any(client.info.client == f"{host}:{port}" for client in tunnel.proxy.clients)


async def served_by_socks5(tunnel: Tunnel, echo: EchoTarget, source: str = LOOPBACK4) -> None:
    """The right password, through python-socks, and a round trip to the echo target."""
    proxy = AsyncProxy.from_url(
        f"socks5://{USER.decode()}:{PASSWORD.decode()}@{tunnel.host}:{tunnel.port}"
    )
    sock = await asyncio.wait_for(
        proxy.connect(LOOPBACK4, echo.port, local_addr=(source, 0)), DEADLINE
    )
    with sock:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"ping")
        sock.shutdown(socket.SHUT_WR)
        expected = EchoTarget.expected_reply(b"ping")
        assert await recv_exact(sock, len(expected) + 1) == expected


async def test_a_client_guessing_socks5_passwords_is_held_and_nobody_else_is(
    tunnel: Tunnel, echo_target: EchoTarget
) -> None:
    for _ in range(FREE):
        await socks5_wrong_password_answered(tunnel, OTHER_SOURCE)
    held = await socks5_wrong_password_held(tunnel, OTHER_SOURCE)
    with held:
        # The right password is served at once: from another address, and from the very
        # address that is guessing (a success is never held).
        await served_by_socks5(tunnel, echo_target)
        await served_by_socks5(tunnel, echo_target, OTHER_SOURCE)
        # Another address's wrong password is answered at once, too.
        await socks5_wrong_password_answered(tunnel)
        # Meanwhile the guess is still waiting for its answer.
        assert nothing_arrived(held)
        assert still_open(tunnel, held)


async def test_a_held_client_that_hangs_up_is_forgotten(tunnel: Tunnel) -> None:
    for _ in range(FREE):
        await socks5_wrong_password_answered(tunnel)
    held = await socks5_wrong_password_held(tunnel)
    held.close()
    # drain() returns as soon as the last client is gone (or at the deadline).
    await tunnel.proxy.drain(DEADLINE)
    assert not tunnel.proxy.clients
    # Gone quietly: no second rejection for the same client.
    assert len(tunnel.log.auth_rejections()) == FREE + 1


def basic(password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(USER + b":" + password)


async def http_request(tunnel: Tunnel, url: str, header: bytes | None) -> socket.socket:
    sock = await connect(tunnel, OTHER_SOURCE)
    lines = [f"GET {url} HTTP/1.1".encode(), b"Host: " + url.split("/")[2].encode()]
    if header is not None:
        lines.append(b"Proxy-Authorization: " + header)
    await asyncio.get_running_loop().sock_sendall(sock, b"\r\n".join([*lines, b"", b""]))
    return sock


async def answered_407(sock: socket.socket) -> bool:
    with sock:
        return (await recv_exact(sock, 12)).startswith(b"HTTP/1.1 407")


async def test_a_client_guessing_http_proxy_passwords_is_held_and_nobody_else_is(
    tunnel: Tunnel, http_target: HttpTarget
) -> None:
    url = http_target.url("/hello")
    # The challenge every browser starts with (no credentials at all) is not a guess.
    for _ in range(2 * FREE):
        assert await answered_407(await http_request(tunnel, url, None))
    assert tunnel.proxy.throttle.failures(OTHER_SOURCE, tunnel.proxy.clock()) == 0
    for _ in range(FREE):
        assert await answered_407(await http_request(tunnel, url, basic(WRONG)))
    seen = len(tunnel.log.auth_rejections())
    held = await http_request(tunnel, url, basic(WRONG))
    with held:
        await tunnel.log.wait_auth_rejections(seen + 1)
        proxy_url = f"http://{USER.decode()}:{PASSWORD.decode()}@{tunnel.host}:{tunnel.port}"
        async with httpx.AsyncClient(proxy=proxy_url, timeout=DEADLINE) as client:
            response = await client.get(url)
        assert response.status_code == 200
        assert response.content == http_target.hello_body
        assert nothing_arrived(held)
        assert still_open(tunnel, held)


async def test_socks5_and_http_guesses_count_together(
    tunnel: Tunnel, http_target: HttpTarget
) -> None:
    for _ in range(FREE):
        await socks5_wrong_password_answered(tunnel, OTHER_SOURCE)
    seen = len(tunnel.log.auth_rejections())
    held = await http_request(tunnel, http_target.url("/hello"), basic(WRONG))
    with held:
        await tunnel.log.wait_auth_rejections(seen + 1)
        assert nothing_arrived(held)
        assert still_open(tunnel, held)
