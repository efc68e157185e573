"""The version-guarded asyncssh fast path: what pytunnel needs from asyncssh's connection
class that its public API does not offer.

Two things. First, ``forwarded-tcpip`` opens that arrive before the server's answer to our
``tcpip-forward``. sshd listens before it answers, so a peer can connect, and its channel
open reach us, in that window (it is hit most right after a reconnect, when the server's
clients retry). asyncssh registers a listener only once the answer has been processed and
refuses anything earlier with "No such listener". :class:`HoldingConnection` holds such
opens instead and serves them once the answer comes, or refuses them with it.

Second, the packet path (:class:`FastPackets`), where asyncssh spends most of pytunnel's
CPU (bench/README.md): no empty ``MSG_IGNORE`` before every packet where the cipher is AEAD
or encrypt-then-MAC, padding drawn from a buffered CSPRNG pool instead of one
``getrandom()`` per packet, the keepalive timer left running instead of re-armed on every
received segment, and the packets of one loop pass written to the socket together.

This subclasses asyncssh's connection and calls into its internals, so it is enabled only
for the asyncssh versions it was tested with (:data:`TESTED_VERSIONS`); with any other,
pytunnel uses stock asyncssh and says so once at ``-v``. No monkey-patching.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from asyncssh.connection import _connect
from asyncssh.constants import (
    MSG_DEBUG,
    MSG_IGNORE,
    MSG_KEX_LAST,
    MSG_NEWKEYS,
    MSG_SERVICE_ACCEPT,
    MSG_SERVICE_REQUEST,
    MSG_USERAUTH_BANNER,
    MSG_USERAUTH_LAST,
)
from asyncssh.encryption import ChachaEncryption, ETMEncryption, GCMEncryption
from asyncssh.packet import Byte, SSHPacket, SSHPacketLogger, String, UInt32

log = logging.getLogger(__name__)

# Exactly the releases whose connection internals (_connect, _process_forwarded_tcpip_open,
# create_server's bookkeeping, send_packet, _send, the keepalive timer) this module was
# read against and tested with.
TESTED_VERSIONS = frozenset({"2.24.1"})

# (listen host, listen port), (origin host, origin port), why.
RefusalSink = Callable[[tuple[str, int], tuple[str, int], str], None]

# What create_server is given: called with the origin, returns the channel's session.
SessionFactory = Callable[[str, int], Any]


def supported(version: str = asyncssh.__version__) -> bool:
    """Whether the fast path may be used with this asyncssh version."""
    return version in TESTED_VERSIONS


_said_stock = False


def _say_stock_once() -> None:
    global _said_stock
    if not _said_stock:
        _said_stock = True
        log.info(
            "asyncssh %s is not a version pytunnel's fast path was tested with (%s): using "
            "stock asyncssh, which refuses -R and BIND connections that arrive before the "
            "server's answer to listening",
            asyncssh.__version__,
            ", ".join(sorted(TESTED_VERSIONS)),
        )


@dataclass(eq=False, slots=True)
class _Asked:
    """A ``tcpip-forward`` we sent and have not yet seen answered."""

    host: str
    port: int
    factory: SessionFactory
    # The listener once the server agreed, or why there is none.
    answer: asyncio.Future[asyncssh.SSHListener | str] = field(repr=False)

    def may_be(self, host: str, port: int) -> bool:
        # Port 0 asked the server to pick one: any port it reports could be that one.
        return self.host == host and self.port in (0, port)


def _listening_on(listener: asyncssh.SSHListener, port: int) -> bool:
    # Some servers report port 0 for a port they picked (asyncssh copes with it too).
    return port == 0 or listener.get_port() == port


# Ciphers whose packets carry their own integrity over the ciphertext. The empty MSG_IGNORE
# asyncssh puts before every packet defends CBC with a MAC over the plaintext (a
# predictable IV chained from the last packet, the Rogaway/Dai attack on SSH's CBC mode);
# with these there is no IV to predict and nothing for an ignore packet to hide.
_SELF_PROTECTING = (GCMEncryption, ChachaEncryption, ETMEncryption)

# One getrandom() per this many padding bytes instead of one per packet (4 to 255 each).
PADDING_POOL = 4096

_EMPTY_STRING = String(b"")

# Input handed to asyncssh's parser at a time: one full-size data packet (32 KiB of data
# and its framing) fits, so most packets are parsed from a buffer of at most two.
FEED = 36 * 1024


class _PaddingPool:
    """Random padding from a buffer refilled from the OS CSPRNG. Every byte is handed out
    once, so padding stays as unpredictable as ``os.urandom(padlen)`` per packet."""

    __slots__ = ("_at", "_pool", "_source")

    def __init__(self, source: Callable[[int], bytes] = os.urandom) -> None:
        self._source = source
        self._pool = b""
        self._at = 0

    def take(self, count: int) -> bytes:
        at = self._at
        if at + count > len(self._pool):
            self._pool = self._source(max(PADDING_POOL, count))
            at = 0
        self._at = at + count
        return self._pool[at : at + count]


class FastPackets(asyncssh.SSHClientConnection):
    """asyncssh's client connection with a cheaper packet path (see the module's doc).
    Every step of ``send_packet`` that is not named there is asyncssh's own, in its order:
    rekey by bytes or time, packets deferred during key exchange and authentication,
    compression, sequence numbers (strict kex included), packet logging."""

    def __init__(self, loop: asyncio.AbstractEventLoop, options: Any, wait: str) -> None:
        super().__init__(loop, options, wait=wait)
        self._padding = _PaddingPool()
        # The packets of this loop pass after its first (None: nothing written this pass).
        self._held: list[bytes] | None = None
        # When the last segment arrived after authentication, and the interval the running
        # keepalive timer was armed with: the timer is moved only when it fires.
        self._heard = loop.time()
        self._armed_interval = 0.0

    def data_received(self, data: bytes, datatype: int | None = None) -> None:
        # asyncssh keeps unread input in one bytes object and slices the rest off it twice
        # per packet: a 256 KiB read (uvloop's size) holding eight 32 KiB packets is
        # copied about eight times over, in transient objects big enough to grow the heap.
        # Fed a packet's worth at a time, as if TCP had delivered smaller segments (which
        # asyncssh must handle anyway), the rest stays small and so do the copies.
        if len(data) <= FEED:
            super().data_received(data, datatype)
            return
        view = memoryview(data)
        for at in range(0, len(data), FEED):
            if self._transport is None:
                # A packet closed the connection: nothing after it is read, as in stock.
                return
            super().data_received(view[at : at + FEED], datatype)  # type: ignore[arg-type]

    def send_packet(
        self, pkttype: int, *args: bytes, handler: SSHPacketLogger | None = None
    ) -> None:
        if (
            self._auth_complete
            and self._kex_complete
            and (
                self._rekey_bytes_sent >= self._rekey_bytes
                or (self._rekey_seconds and time.monotonic() >= self._rekey_time)
            )
        ):
            self._send_kexinit()
            self._kexinit_sent = True

        if (
            (
                (
                    pkttype in {MSG_DEBUG, MSG_SERVICE_REQUEST, MSG_SERVICE_ACCEPT}
                    or pkttype > MSG_KEX_LAST
                )
                and not self._kex_complete
            )
            or (
                pkttype == MSG_USERAUTH_BANNER
                and not (self._auth_in_progress or self._auth_complete)
            )
            or (pkttype > MSG_USERAUTH_LAST and not self._auth_complete)
        ):
            self._deferred_packets.append((pkttype, args))
            return

        encryption = self._send_encryption
        if (
            encryption is not None
            and pkttype > MSG_KEX_LAST
            and not isinstance(encryption, _SELF_PROTECTING)
        ):
            # Plain CTR/CBC with a MAC over the plaintext: keep asyncssh's ignore packet.
            self.send_packet(MSG_IGNORE, _EMPTY_STRING)

        orig_payload = Byte(pkttype) + b"".join(args)
        payload = orig_payload
        if self._compressor and (self._auth_complete or not self._compress_after_auth):
            compressed = self._compressor.compress(orig_payload)
            if compressed is None:
                raise asyncssh.CompressionError("Compression failed")
            payload = compressed

        blocksize = self._send_blocksize
        padlen = -(self._send_enchdrlen + len(payload)) % blocksize
        if padlen < 4:
            padlen += blocksize
        packet = Byte(padlen) + payload + self._padding.take(padlen)
        pktlen = len(packet)
        hdr = UInt32(pktlen)
        seq = self._send_seq

        if encryption is not None:
            packet, mac = encryption.encrypt_packet(seq, hdr, packet)
            self._send(packet + mac)
        else:
            self._send(hdr + packet)

        if self._send_seq == 0xFFFFFFFF and encryption is None:
            self._send_seq = 0
            raise asyncssh.ProtocolError("Sequence rollover before kex complete")
        if pkttype == MSG_NEWKEYS and self._strict_kex:
            self._send_seq = 0
        else:
            self._send_seq = (seq + 1) & 0xFFFFFFFF
        if self._kex_complete:
            self._rekey_bytes_sent += pktlen
        (handler or self).log_sent_packet(pkttype, seq, orig_payload)

    def _send(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        held = self._held
        if held is not None:
            held.append(data)
            return
        # The first packet of a pass goes out at once (a lone reply waits for nothing);
        # the rest of the pass follows in one write at its end. Flushed with the transport
        # of this pass: a forced close aborts it with call_soon, after this flush.
        self._held = []
        self._loop.call_soon(self._flush, transport)
        with contextlib.suppress(ConnectionError):
            transport.write(data)

    def _flush(self, transport: asyncio.Transport) -> None:
        held = self._held
        self._held = None
        if held:
            with contextlib.suppress(ConnectionError):
                transport.writelines(held)

    def _set_keepalive_timer(self) -> None:
        super()._set_keepalive_timer()
        self._armed_interval = self._keepalive_interval

    def _reset_keepalive_timer(self) -> None:
        # asyncssh cancels and re-arms the timer on every received segment; note the time
        # instead, and let the timer, when it fires, wait out the rest of the interval.
        if not self._auth_complete:
            return
        self._heard = self._loop.time()
        if self._keepalive_timer is None or self._armed_interval != self._keepalive_interval:
            # set_keepalive() changed the interval, or no timer runs: asyncssh's way.
            self._cancel_keepalive_timer()
            self._set_keepalive_timer()

    def _keepalive_timer_callback(self) -> None:
        quiet = self._loop.time() - self._heard
        if quiet < self._keepalive_interval:
            # Heard from the server since the timer was armed: not yet a keepalive's turn.
            self._keepalive_timer = self._loop.call_later(
                self._keepalive_interval - quiet, self._keepalive_timer_callback
            )
            return
        super()._keepalive_timer_callback()


class HoldingConnection(FastPackets):
    """An asyncssh client connection that holds ``forwarded-tcpip`` opens for the
    ``tcpip-forward`` requests it has sent and not yet seen answered, and reports every
    such open it refuses to ``on_refused``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        options: asyncssh.SSHClientConnectionOptions,
        on_refused: RefusalSink,
    ) -> None:
        super().__init__(loop, options, wait="auth")
        self._asked: list[_Asked] = []
        self._on_refused = on_refused

    def send_newkeys(self, k: bytes, h: bytes) -> None:
        # asyncssh names the key exchange algorithm in a debug line only, and forgets it
        # once the exchange is over: keep it here, where it is still known, for -v and
        # the session_up event.
        kex = getattr(self, "_kex", None)
        algorithm = getattr(kex, "algorithm", None)
        if isinstance(algorithm, bytes):
            self.set_extra_info(kex=algorithm.decode("ascii", "replace"))
        super().send_newkeys(k, h)

    async def listen(self, factory: SessionFactory, host: str, port: int) -> asyncssh.SSHListener:
        """``create_server``, with opens that come before the answer held for it."""
        # asyncssh lowercases the host it asks for; the server names it back that way.
        asked = _Asked(host.lower(), port, factory, self._loop.create_future())
        self._asked.append(asked)
        try:
            listener = await self.create_server(factory, host, port)
        except asyncssh.ChannelListenError:
            asked.answer.set_result(f"the server refused to listen on {_where(host, port)}")
            raise
        except BaseException:
            asked.answer.set_result(f"pytunnel gave up listening on {_where(host, port)}")
            raise
        else:
            # Same step as asyncssh's registration: no open can fall between the two.
            asked.answer.set_result(listener)
            return listener
        finally:
            self._asked.remove(asked)

    def _process_forwarded_tcpip_open(self, packet: SSHPacket) -> tuple[Any, Any]:
        # Read the addresses from a copy: asyncssh's own handler consumes the packet.
        peek = SSHPacket(packet.get_remaining_payload())
        dest_host = peek.get_string().decode("utf-8", "replace")
        dest_port = peek.get_uint32()
        origin = (peek.get_string().decode("utf-8", "replace"), peek.get_uint32())
        candidates = [a for a in self._asked if a.may_be(dest_host, dest_port)]
        # With no listener registered for exactly this port, asyncssh falls back to the
        # last port-0 listener on the host: while one we asked for may be this port's,
        # that could hand the peer to another BIND. Hold it for the answers instead.
        if not candidates or (dest_host, dest_port) in self._remote_listeners:
            try:
                return super()._process_forwarded_tcpip_open(packet)
            except asyncssh.ChannelOpenError as exc:
                self._on_refused((dest_host, dest_port), origin, f"no such listener ({exc.reason})")
                raise
        chan = self.create_tcp_channel()
        chan.set_inbound_peer_names(dest_host, dest_port, *origin)
        return chan, self._when_answered(candidates, (dest_host, dest_port), origin)

    async def _when_answered(
        self, candidates: list[_Asked], listen: tuple[str, int], origin: tuple[str, int]
    ) -> Any:
        """The held open's session, once every request it may belong to is answered."""
        # Shielded: several held opens share each answer, and one of them being cancelled
        # must not cancel the answer for the others, or for listen().
        answers = [await asyncio.shield(asked.answer) for asked in candidates]
        for asked, answer in zip(candidates, answers, strict=True):
            if not isinstance(answer, str) and _listening_on(answer, listen[1]):
                session = asked.factory(*origin)
                return await session if inspect.isawaitable(session) else session
        why = next((answer for answer in answers if isinstance(answer, str)), None)
        reason = why or f"no such listener: the server listens on another port for {listen[0]}"
        self._on_refused(listen, origin, reason)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason)


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"


async def connect(
    host: str, on_refused: RefusalSink, **kwargs: Any
) -> asyncssh.SSHClientConnection:
    """``asyncssh.connect(host, **kwargs)``, with a :class:`HoldingConnection` where this
    asyncssh version was tested; stock otherwise."""
    if not supported():
        _say_stock_once()
        return await asyncssh.connect(host, **kwargs)
    loop = asyncio.get_running_loop()
    # What asyncssh.connect does, with our class in its connection factory: a socket
    # (a ProxyCommand's) and flags go to _connect, not into the options.
    sock = kwargs.pop("sock", None)
    flags = kwargs.pop("flags", 0)
    options = await asyncssh.SSHClientConnectionOptions.construct(None, host=host, **kwargs)

    def factory() -> HoldingConnection:
        return HoldingConnection(loop, options, on_refused)

    opening: Awaitable[HoldingConnection] = _connect(
        options, kwargs.get("config", ()), loop, flags, sock, factory, "Opening SSH connection to"
    )
    return await asyncio.wait_for(opening, timeout=options.connect_timeout)


async def listen(
    conn: asyncssh.SSHClientConnection, factory: SessionFactory, host: str, port: int
) -> asyncssh.SSHListener:
    """Ask ``conn``'s server to listen; held opens where the connection can hold them."""
    if isinstance(conn, HoldingConnection):
        return await conn.listen(factory, host, port)
    return await conn.create_server(factory, host, port)
