"""A failed attempt through a ProxyCommand, under uvloop as pytunnel runs: no socket
object may be left holding the number of a descriptor that is already closed.

When the command is gone before asyncssh's first write, the write fails inside
``connection_made`` and uvloop closes the descriptor before it takes charge of the
socket object, which it then never detaches. The next socket made gets that number,
and collecting the stale object closed it: a retried ProxyCommand's working connection
broke that way, and a client accepted on the same number was reset.
tunnel.proxycommand.ProxyCommand.drop_socket detaches it."""

from __future__ import annotations

import gc
import os
import socket

import pytest
from fixtures.in_process import sshd_config
from fixtures.sshd import SshdServer

from tunnel import events
from tunnel.errors import SessionError
from tunnel.session import Session

uvloop = pytest.importorskip("uvloop")

ATTEMPTS = 5


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def stale_sockets() -> list[int]:
    """Numbers held by live socket objects whose descriptor is closed."""
    return [
        sock.fileno()
        for sock in gc.get_objects()
        if isinstance(sock, socket.socket) and sock.fileno() != -1 and _closed(sock.fileno())
    ]


def test_a_failed_proxycommand_attempt_leaves_no_socket_on_a_closed_number(
    sshd: SshdServer,
) -> None:
    command = "sh -c 'exit 1'"
    config = sshd_config(sshd, proxy_command=command, proxy_run=command)

    async def attempts() -> list[list[int]]:
        found = []
        for _ in range(ATTEMPTS):
            session = Session(config, events.discard)
            try:
                with pytest.raises(SessionError, match="ProxyCommand"):
                    await session.connect()
                found.append(stale_sockets())
            finally:
                await session.close()
        return found

    assert uvloop.run(attempts()) == [[]] * ATTEMPTS
