"""A plain socket as the far side (``direct`` routes; the socket pair of an OpenSSH
master in stdio mode) stays paused until the proxy has written its reply, under
asyncio's loop and under uvloop, which pytunnel runs on.

uvloop starts reading a new transport after ``connection_made`` whatever that asked, so
a server that speaks first (an SSH or SMTP banner) had its first bytes handed to the
proxy, and so to the client, before the SOCKS reply: seen through a stdio master as a
greeting where the client expected ``05 00``. What comes early is now kept and handed
over, in order with the EOF, when the proxy resumes the channel."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from tunnel.upstreams import Direct, Request

BANNER = b"SSH-2.0-speaks-first\r\n"


class Recorder:
    """The proxy's side of the channel: what was reported, in order."""

    def __init__(self) -> None:
        self.reports: list[object] = []

    def remote_data(self, data: bytes) -> None:
        self.reports.append(data)

    def remote_eof(self) -> None:
        self.reports.append("eof")

    def remote_pause(self) -> None:
        self.reports.append("pause")

    def remote_resume(self) -> None:
        self.reports.append("resume")

    def remote_closed(self, exc: BaseException | None) -> None:
        self.reports.append("closed")


def _request(listener: socket.socket) -> Request:
    port = listener.getsockname()[1]
    return Request("127.0.0.1", port, ("127.0.0.1", 1), "socks5", None, "127.0.0.1:1080")


@pytest.mark.parametrize("eof", [False, True])
def test_a_server_that_speaks_first_waits_for_the_release(
    run_loop: Callable[[Awaitable[None]], None], eof: bool
) -> None:
    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop = asyncio.get_running_loop()

        async def serve() -> None:
            conn, _ = await loop.sock_accept(listener)
            await loop.sock_sendall(conn, BANNER)
            if eof:
                conn.shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.5)
            conn.close()

        server = asyncio.ensure_future(serve())
        sink = Recorder()
        request = _request(listener)
        channel = await Direct(5.0).open(request, sink)
        await asyncio.sleep(0.2)  # the banner (and the EOF) are in by now
        assert sink.reports == []
        channel.resume_reading()
        await asyncio.sleep(0.05)
        assert sink.reports == ([BANNER, "eof"] if eof else [BANNER])
        channel.close()
        await server
        listener.close()

    run_loop(main())


def test_after_the_release_data_goes_at_once(run_loop: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[socket.socket] = loop.create_future()

        async def serve() -> None:
            conn, _ = await loop.sock_accept(listener)
            accepted.set_result(conn)

        server = asyncio.ensure_future(serve())
        sink = Recorder()
        request = _request(listener)
        channel = await Direct(5.0).open(request, sink)
        conn = await accepted
        channel.resume_reading()
        await loop.sock_sendall(conn, b"one")
        await asyncio.sleep(0.05)
        await loop.sock_sendall(conn, b"two")
        await asyncio.sleep(0.05)
        assert b"".join(r for r in sink.reports if isinstance(r, bytes)) == b"onetwo"
        channel.write(b"to the server")
        assert await loop.sock_recv(conn, 100) == b"to the server"
        conn.close()
        await asyncio.sleep(0.05)
        assert sink.reports[-1] == "eof"  # a half-close: the proxy closes the rest
        channel.close()
        await asyncio.sleep(0.05)
        assert sink.reports[-1] == "closed"
        await server
        listener.close()

    run_loop(main())
