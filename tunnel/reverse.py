"""Reverse dynamic forwarding, ``-R [bind_address:]port`` (as in OpenSSH 7.6 and later).

The SSH server listens; each connection to that port comes back to us as a
``forwarded-tcpip`` channel and speaks SOCKS (or HTTP). The same :class:`ProxyClient`
that serves ``-D`` serves it, through :class:`ChannelTransport`, which dresses the
channel as an asyncio transport; its requests are opened from this machine by
:class:`tunnel.upstreams.Direct`. So the server's side reaches the client's network, with the same
replies, rules and events as ``-D``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import NoReturn, Protocol

from . import events
from .channels import (
    Binder,
    Channel,
    IncomingSink,
    RemoteListener,
)
from .config import Forward
from .errors import ChannelOpenFailed, ListenError, SessionError
from .proxy import ProxyClient, ProxyServer
from .retry import backoff
from .tasks import raise_if_cancelling

log = logging.getLogger(__name__)


class ChannelTransport(asyncio.Transport):
    """An SSH channel seen from a :class:`ProxyClient` as its client's transport."""

    def __init__(
        self, protocol: asyncio.Protocol, peer: tuple[str, int], sockname: tuple[str, int]
    ) -> None:
        super().__init__({"peername": peer, "sockname": sockname})
        self._protocol = protocol
        self._channel: Channel | None = None
        self._closing = False
        self._lost = False
        self._reading = True

    # -- the channel's side (IncomingSink) ----------------------------------------

    def channel_opened(self, channel: Channel) -> None:
        # The channel arrives paused; it reads once the protocol has not asked otherwise.
        self._channel = channel
        self._protocol.connection_made(self)
        if self._reading and not self._closing:
            channel.resume_reading()

    def remote_data(self, data: bytes) -> None:
        # After close() nothing more reaches the protocol, as with a socket transport.
        if not self._closing:
            self._protocol.data_received(data)

    def remote_eof(self) -> None:
        if not self._closing and not self._protocol.eof_received():
            self.close()

    def remote_pause(self) -> None:
        self._protocol.pause_writing()

    def remote_resume(self) -> None:
        self._protocol.resume_writing()

    def remote_closed(self, exc: BaseException | None) -> None:
        self._channel = None
        self._closing = True
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc if isinstance(exc, Exception) else None)

    # -- the protocol's side (asyncio.Transport) ------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._channel is not None and not self._closing:
            self._channel.write(bytes(data))

    def write_eof(self) -> None:
        if self._channel is not None and not self._closing:
            self._channel.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self._reading = False
        if self._channel is not None:
            self._channel.pause_reading()

    def resume_reading(self) -> None:
        self._reading = True
        if self._channel is not None and not self._closing:
            self._channel.resume_reading()

    def is_reading(self) -> bool:
        return self._reading

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        # The channel sends what it holds, then closes; remote_closed follows.
        self._closing = True
        if self._channel is not None:
            self._channel.close()

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0


class _Server(Binder, Protocol):
    """What :class:`ReverseForwards` needs from the session."""

    async def wait_up(self) -> None: ...
    async def wait_lost(self) -> SessionError: ...


def remote_bind_host(forward: Forward) -> str:
    """What ``tcpip-forward`` asks for. No address is the server's loopback, asked for
    as 127.0.0.1: ssh sends "localhost", for which sshd binds each family's loopback and
    succeeds if any one works, so no address could be announced that is sure to be
    listening (``-R localhost:PORT`` still asks for exactly that). ``*`` or an empty
    address is every interface ("")."""
    return "127.0.0.1" if forward.host is None else forward.host


class ReverseForwards:
    """The ``-R`` listeners: opened once the session is up, opened again after every
    reconnect (on the same port when the server picked one), each connection handed to
    a :class:`ProxyClient` of ``proxy``."""

    def __init__(
        self,
        session: _Server,
        proxy: ProxyServer,
        forwards: Sequence[Forward],
        emit: events.Sink,
    ) -> None:
        self.session = session
        self.proxy = proxy
        self.forwards = list(forwards)
        self.emit = emit
        self.listeners: list[events.Listener] = []
        self._open: list[RemoteListener] = []

    async def open(self) -> list[events.Listener]:
        """Ask for every listener; all or nothing, like ``-D``: ListenError if the
        server refuses one."""
        opened: list[tuple[RemoteListener, events.Listener]] = []
        try:
            for index, forward in enumerate(self.forwards):
                remote, listener = await self._listen(index, forward)
                opened.append((remote, listener))
        except ChannelOpenFailed as exc:
            for remote, _ in opened:
                remote.close()
            raise ListenError(
                f"-R {forward}: {exc.message}",
                hint="the server must allow remote forwarding (AllowTcpForwarding yes or "
                "remote); a bind address other than loopback also needs GatewayPorts",
            ) from exc
        self._open = [remote for remote, _ in opened]
        self.listeners = [listener for _, listener in opened]
        for listener in self.listeners:
            self.emit(events.ListenerStarted(listener))
        return self.listeners

    async def _listen(self, index: int, forward: Forward) -> tuple[RemoteListener, events.Listener]:
        holder: list[events.Listener] = []

        def incoming(origin: tuple[str, int]) -> IncomingSink:
            listener = holder[0]
            client = ProxyClient(self.proxy)
            return ChannelTransport(client, origin, (listener.host, listener.port))

        remote = await self.session.listen_tcp(remote_bind_host(forward), forward.port, incoming)
        listener = events.Listener(remote.host, remote.port, remote=True)
        holder.append(listener)
        if forward.port == 0:
            # Ask for the same port after a reconnect, so clients keep working.
            self.forwards[index] = Forward(forward.host, remote.port)
        return remote, listener

    async def keep(self) -> NoReturn:
        """After each reconnect, listen again; if the server refuses now (the old
        session still holds the port), say so and retry with backoff."""
        while True:
            await self.session.wait_lost()
            self._open = []  # they went with the connection
            await self.session.wait_up()
            for delay in backoff(cap=30.0, random=random.random):
                await asyncio.sleep(delay)
                try:
                    await self.open()
                except ListenError as exc:
                    raise_if_cancelling()
                    self.emit(events.Notice(f"{exc.message}; retrying", key="reverse"))
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # session lost meanwhile: wait for the next one
                    raise_if_cancelling()
                    log.info("re-opening -R listeners: %s", exc)
                break

    def close(self) -> None:
        for remote in self._open:
            remote.close()
        self._open = []
