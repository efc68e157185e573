"""The version-guarded asyncssh fast path: what pytunnel needs from asyncssh's connection
class that its public API does not offer.

Today that is one thing: ``forwarded-tcpip`` opens that arrive before the server's answer
to our ``tcpip-forward``. sshd listens before it answers, so a peer can connect, and its
channel open reach us, in that window (it is hit most right after a reconnect, when the
server's clients retry). asyncssh registers a listener only once the answer has been
processed and refuses anything earlier with "No such listener". :class:`HoldingConnection`
holds such opens instead and serves them once the answer comes, or refuses them with it.

This subclasses asyncssh's connection and calls into its internals, so it is enabled only
for the asyncssh versions it was tested with (:data:`TESTED_VERSIONS`); with any other,
pytunnel uses stock asyncssh and says so once at ``-v``. No monkey-patching.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from asyncssh.connection import _connect
from asyncssh.packet import SSHPacket

log = logging.getLogger(__name__)

# Exactly the releases whose connection internals (_connect, _process_forwarded_tcpip_open,
# create_server's bookkeeping) this module was read against and tested with.
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


class HoldingConnection(asyncssh.SSHClientConnection):
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
