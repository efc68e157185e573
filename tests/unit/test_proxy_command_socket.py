"""A failed attempt through a ProxyCommand leaves our end of its socket to
:meth:`ProxyCommand.drop_socket`. uvloop can close the descriptor and leave the socket
object holding its number; the next socket made gets that number, and collecting the
stale object would close it (a retried ProxyCommand's connection broke that way, and a
client accepted on the same number was reset). drop_socket must never close a number
that is no longer our socket's, and must not leak one that still is."""

from __future__ import annotations

import os
import socket
from typing import Any

from tunnel import events
from tunnel.proxycommand import ProxyCommand


def command_with(sock: socket.socket) -> ProxyCommand:
    process: Any = None  # not used by drop_socket
    return ProxyCommand("nc %h %p", process, sock, events.discard)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_a_number_closed_and_taken_by_another_socket_is_left_to_it() -> None:
    ours, theirs = socket.socketpair()
    proxy = command_with(ours)
    number = ours.fileno()
    os.close(number)  # as uvloop does, without telling the socket object
    # The next socket made gets the number (the lowest free one).
    newcomer = socket.socket()
    try:
        assert newcomer.fileno() == number
        await proxy.drop_socket()
        assert ours.fileno() == -1  # detached: it will never close the number
        assert is_open(number)
        del ours, proxy
        assert is_open(number)
    finally:
        newcomer.close()
        theirs.close()


async def test_a_closed_number_nobody_took_is_detached() -> None:
    ours, theirs = socket.socketpair()
    proxy = command_with(ours)
    os.close(ours.fileno())
    try:
        await proxy.drop_socket()
        assert ours.fileno() == -1
    finally:
        theirs.close()


async def test_a_socket_still_ours_is_closed() -> None:
    ours, theirs = socket.socketpair()
    proxy = command_with(ours)
    number = ours.fileno()
    try:
        await proxy.drop_socket()
        assert ours.fileno() == -1
        assert not is_open(number)
        assert theirs.recv(1) == b""  # its peer sees the end
    finally:
        theirs.close()


async def test_a_socket_uvloop_detached_is_left_alone() -> None:
    ours, theirs = socket.socketpair()
    proxy = command_with(ours)
    number = ours.detach()
    try:
        await proxy.drop_socket()
        assert is_open(number)
    finally:
        os.close(number)
        theirs.close()
