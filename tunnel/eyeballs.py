"""Happy Eyeballs (RFC 8305) for the SSH server's TCP connection: the addresses of a
name, IPv6 first and the families interleaved, each attempt started 250 ms after the
previous one (or as soon as it fails), the first to connect wins and the others are
closed. asyncio's ``happy_eyeballs_delay`` would do it, but uvloop lacks it, so the
socket is connected here and handed to asyncssh."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

# RFC 8305 section 5: the recommended Connection Attempt Delay.
ATTEMPT_DELAY = 0.25

T = TypeVar("T")
AddrInfo = tuple[int, int, int, str, Any]  # family, type, proto, canonname, sockaddr


def interleave(infos: Sequence[AddrInfo]) -> list[AddrInfo]:
    """RFC 8305 section 4: keep each family's own order (the resolver's), start with
    IPv6, then alternate families; what is left of one family goes last. Duplicates
    (the same address twice) are tried once."""
    seen: set[Any] = set()
    six: list[AddrInfo] = []
    rest: list[AddrInfo] = []
    for info in infos:
        key = (info[0], info[4])
        if key in seen:
            continue
        seen.add(key)
        (six if info[0] == socket.AF_INET6 else rest).append(info)
    ordered: list[AddrInfo] = []
    for index in range(max(len(six), len(rest))):
        ordered.extend(family[index] for family in (six, rest) if index < len(family))
    return ordered


async def race(
    attempts: Sequence[Callable[[], Awaitable[T]]],
    discard: Callable[[T], None],
    *,
    delay: float = ATTEMPT_DELAY,
) -> T:
    """Start ``attempts`` one after another, each ``delay`` seconds after the previous
    (at once when every running attempt has failed); return the first result. Results
    that come too late are passed to ``discard``; attempts still running are
    cancelled. When all fail, the last error is raised."""
    if not attempts:
        raise OSError("no address to connect to")
    running: set[asyncio.Task[T]] = set()
    errors: list[BaseException] = []
    started = 0
    try:
        while True:
            if started < len(attempts):
                running.add(asyncio.ensure_future(attempts[started]()))
                started += 1
            if not running:
                raise errors[-1]
            done, running = await asyncio.wait(
                running,
                timeout=delay if started < len(attempts) else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            won = [task.result() for task in done if task.exception() is None]
            errors.extend(err for task in done if (err := task.exception()) is not None)
            if won:
                for extra in won[1:]:
                    discard(extra)
                return won[0]
    finally:
        for task in running:
            task.cancel()
        for task in running:
            try:
                late = await task
            except BaseException:
                continue  # a loser's own error, or its cancellation
            discard(late)


async def connect_tcp(
    loop: asyncio.AbstractEventLoop, info: AddrInfo, on_attempt: Callable[[AddrInfo], None]
) -> socket.socket:
    """One non-blocking connect; the socket is closed if it does not connect."""
    family, kind, proto, _, address = info
    on_attempt(info)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except OSError as exc:
        sock.close()
        if exc.errno is None:
            raise
        # The event loop's text ("Connect call failed (addr)") hides the reason: the
        # caller shows strerror, as ssh does ("Connection refused").
        raise OSError(exc.errno, os.strerror(exc.errno)) from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def open_socket(
    host: str,
    port: int,
    family: int = socket.AF_UNSPEC,
    *,
    on_attempt: Callable[[AddrInfo], None] = lambda info: None,
    delay: float = ATTEMPT_DELAY,
) -> socket.socket:
    """A TCP socket connected to ``host`` port ``port`` by Happy Eyeballs; resolver
    errors (``socket.gaierror``) and the last connect error are raised as they are."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    ordered = interleave(infos)

    def attempt(info: AddrInfo) -> Callable[[], Awaitable[socket.socket]]:
        return lambda: connect_tcp(loop, info, on_attempt)

    return await race([attempt(info) for info in ordered], socket.socket.close, delay=delay)
