"""SOCKS BIND: ask the SSH server to listen (through the :class:`Binder` the SSH
upstream offers), reply with where, wait for the one peer the request named, reply with
that peer and hand its channel to the client's relay."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from ..channels import Binder, Channel, IncomingSink, RemoteListener
from ..errors import ChannelOpenFailed, ReplyReason
from ..rules import bind_peer_allowed, is_loopback
from ..socks import Request, ServerConnection
from .base import Client, socks_fail

log = logging.getLogger(__name__)

# How long a SOCKS BIND waits for its peer to connect (SOCKS4 asks for a time limit).
BIND_TIMEOUT = 120.0
# What a client may send while its BIND waits for the peer, held until the splice.
BIND_BUFFER = 256 * 1024


class BindHandler:
    def __init__(
        self, client: Client, codec: ServerConnection, request: Request, binder: Binder
    ) -> None:
        self.client = client
        self.codec = codec
        self.request = request
        self.binder = binder
        self.wait: _BindWait | None = None

    def start(self) -> None:
        self.client.transport.pause_reading()
        self.client.spawn(self._listen())

    async def _listen(self) -> None:
        """First reply with where the server listens; the second follows in
        :meth:`connected` with the peer that connected (only the request's DST.ADDR
        may)."""
        client, request = self.client, self.request
        # A peer on the server itself needs only its loopback, asked for by address
        # (sshd honours 127.0.0.1 and ::1 whatever its GatewayPorts, and the reply must
        # name an address it really listens on); any other peer needs the server to
        # listen on every interface, which its GatewayPorts decides.
        listen_host = ""
        if is_loopback(request.host):
            listen_host = "::1" if ":" in request.host else "127.0.0.1"
        wait = _BindWait(self, time.monotonic())
        try:
            # (The host is already in its normal form: the handshake saw to it.)
            client.check_policy(request.host, request.port)
            listener = await self.binder.listen_tcp(listen_host, 0, wait.incoming)
        except ChannelOpenFailed as exc:
            socks_fail(client, self.codec, exc)
            return
        except Exception as exc:  # a bug or an unexpected failure: answer, never hang
            log.debug("BIND failed", exc_info=True)
            failure = ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, f"internal error: {exc!r}")
            socks_fail(client, self.codec, failure)
            return
        if client.closed:
            listener.close()
            return
        wait.listening(listener)
        self.wait = wait
        client.transport.write(self.codec.accept(reply_host(listener.host), listener.port))
        # Read again, to notice a client that gives up; what it sends waits in the codec.
        client.transport.resume_reading()

    def connected(self, wait: _BindWait, channel: Channel, peer: tuple[str, int]) -> None:
        self.wait = None
        client = self.client
        if client.closed:
            channel.close()
            return
        client.opened(time.monotonic() - wait.started)
        client.transport.write(self.codec.accept(reply_host(peer[0]), peer[1]))
        client.start_relay(channel, self.codec.trailing_data)

    def failed(self, exc: ChannelOpenFailed) -> None:
        self.wait = None
        socks_fail(self.client, self.codec, exc)

    def data_received(self, data: bytes) -> None:
        self.codec.receive_data(data)
        if self.wait is not None and self.codec.buffered > BIND_BUFFER:
            self.client.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.wait is None:
            # Still asking the server: the whole request came before EOF.
            return True
        # Before its second reply a BIND client has nothing to send: EOF means it gave
        # up (or closed), so the server stops listening for the peer.
        self.close()
        return False

    def close(self) -> None:
        wait, self.wait = self.wait, None
        if wait is not None:
            wait.close()


class _BindWait:
    """A SOCKS BIND between its two replies: the server listens, we wait for the one
    peer the request named, within :data:`BIND_TIMEOUT`."""

    def __init__(self, handler: BindHandler, started: float) -> None:
        self.handler = handler
        self.started = started
        self.listener: RemoteListener | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.peer: tuple[str, int] | None = None

    def listening(self, listener: RemoteListener) -> None:
        self.listener = listener
        self.timer = asyncio.get_running_loop().call_later(BIND_TIMEOUT, self._timed_out)

    def incoming(self, origin: tuple[str, int]) -> IncomingSink | None:
        """The server reports a connection: take the first one from the right peer."""
        if self.peer is not None or self.listener is None:
            return None
        expected = self.handler.request.host
        if not bind_peer_allowed(expected, origin[0]):
            log.info(
                "BIND #%s: refused a connection from %s (expected %s)",
                self.handler.client.info.id,
                origin[0],
                expected,
            )
            return None
        self.peer = origin
        return _BoundPeer(self, origin)

    def connected(self, channel: Channel, peer: tuple[str, int]) -> None:
        self.close()
        self.handler.connected(self, channel, peer)

    def _timed_out(self) -> None:
        self.timer = None
        self.close()
        self.handler.failed(
            ChannelOpenFailed(
                ReplyReason.TTL_EXPIRED,
                f"no connection from {self.handler.request.host} within {BIND_TIMEOUT:g} s",
            )
        )

    def close(self) -> None:
        """Stop listening on the server (one peer per BIND) and stop the clock."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()


class _BoundPeer:
    """The sink of a BIND's peer channel until the client takes it over: the channel
    arrives paused, so nothing reaches these before the second reply is written."""

    def __init__(self, wait: _BindWait, peer: tuple[str, int]) -> None:
        self.wait = wait
        self.peer = peer

    def channel_opened(self, channel: Channel) -> None:
        self.wait.connected(channel, self.peer)

    def remote_data(self, data: bytes) -> None:
        self.wait.handler.client.remote_data(data)

    def remote_eof(self) -> None:
        self.wait.handler.client.remote_eof()

    def remote_pause(self) -> None:
        self.wait.handler.client.remote_pause()

    def remote_resume(self) -> None:
        self.wait.handler.client.remote_resume()

    def remote_closed(self, exc: BaseException | None) -> None:
        self.wait.handler.client.remote_closed(exc)


def reply_host(host: str) -> str:
    """An address a SOCKS reply can carry (a name cannot be: zeros then)."""
    try:
        return str(ipaddress.ip_address(host.partition("%")[0]))
    except ValueError:
        return "0.0.0.0"
