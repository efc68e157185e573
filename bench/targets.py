"""Loopback targets for the benchmark, run as their own process.

Three listeners on 127.0.0.1, each on a port the kernel picks:

* ``source``: reads an 8-byte big-endian count N, sends N bytes, then closes.
* ``sink``: counts what it receives until EOF, then answers with the count (8 bytes,
  big-endian) and closes.
* ``echo``: sends back what it receives; closes after EOF.

The first line on stdout is ``{"source": port, "sink": port, "echo": port}``. The process
serves until SIGTERM or SIGINT. It lives apart from the measuring client and from the
subjects so its CPU time is nobody's and its work does not slow the client down.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import struct
import sys

HOST = "127.0.0.1"
COUNT = struct.Struct("!Q")
CHUNK = 256 * 1024
# One shared, read-only block; every write is a slice of it.
_BLOCK = memoryview(bytes(CHUNK))


class Source(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.header = b""
        self.left = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if len(self.header) >= COUNT.size:
            return
        self.header += data
        if len(self.header) >= COUNT.size:
            (self.left,) = COUNT.unpack_from(self.header)
            self._pump()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def _pump(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.left > 0 and not self.paused:
            n = min(CHUNK, self.left)
            self.left -= n
            transport.write(_BLOCK[:n])
        if self.left == 0 and not transport.is_closing():
            transport.close()

    def eof_received(self) -> bool:
        return True


class Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write(COUNT.pack(self.count))
        self.transport.close()
        return True


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.close()
        return True


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = {
        name: await loop.create_server(factory, HOST, 0, backlog=4096)
        for name, factory in (("source", Source), ("sink", Sink), ("echo", Echo))
    }
    ports = {name: server.sockets[0].getsockname()[1] for name, server in servers.items()}
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    await stop.wait()
    for server in servers.values():
        server.close()


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
