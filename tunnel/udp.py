"""SOCKS5 UDP ASSOCIATE: one relay socket per association, bound to its TCP control
connection (RFC 1928 section 7).

SSH carries no UDP, so datagrams travel as streams:

- to port 53, as DNS over TCP on a ``direct-tcpip`` channel to the same server (or to
  ``--dns-server``): one channel per destination, reused for every query, each query
  timed out on its own, and re-sent once on a fresh channel if the server closed the
  old one before answering;
- anything else only with ``--udp-helper``: a small relay started on the SSH server
  over an exec channel (:mod:`tunnel.udp_helper`), fed length-framed datagrams.

Without the helper, other datagrams are dropped, counted, and the first of them per
association is reported with the reason.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import enum
import logging
import shlex
import time
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from . import events
from .channels import Channel, Runner
from .datagrams import (
    DNS_PORT,
    HELPER_HELLO,
    dns_decoder,
    dns_frame,
    dns_id,
    helper_decoder,
    helper_frame,
    parse_helper_frame,
)
from .errors import ChannelOpenFailed, RemoteProtocolError
from .names import BadName, normalize_host
from .rules import Rules, same_host
from .socks import AddressType, build_datagram, parse_datagram
from .upstreams import Request, Upstream

log = logging.getLogger(__name__)

# How long a DNS query waits for its answer (a stub resolver retries after about this).
DNS_TIMEOUT: Final = 5.0
# Bounds on what one association may hold while a channel opens or a query waits.
MAX_PENDING_QUERIES: Final = 256
MAX_QUEUED_DATAGRAMS: Final = 256
# After the helper failed to start, how long before it is tried again.
HELPER_RETRY: Final = 60.0
# DNS servers one association may reach at once, each over a channel of its own. A stub
# resolver asks one to three; a client naming thousands would otherwise open thousands
# of channels on the SSH connection.
MAX_DNS_LINKS: Final = 8
# A DNS channel with no query for this long is closed (the next query opens another).
LINK_IDLE: Final = 30.0


class Drop(enum.StrEnum):
    """Why a datagram was not passed on: the text the status view shows."""

    FOREIGN = "sent from an address other than the association's client"
    MALFORMED = "malformed SOCKS5 UDP header"
    BAD_NAME = "the destination is not a valid host name"
    FRAGMENT = "fragmented (FRAG != 0); pytunnel does not reassemble"
    DENIED = "denied by the --allow/--deny rules"
    NO_HELPER = "not DNS: other UDP needs --udp-helper (SSH has no UDP channel)"
    HELPER_DOWN = "the UDP helper is not running on the server"
    DNS_TIMEOUT = "DNS query unanswered"
    DNS_FAILED = "DNS over TCP could not reach the server"
    BACKLOG = "too many datagrams waiting"
    LINKS = f"DNS to more than {MAX_DNS_LINKS} servers at once from one association"
    LIMIT = "the connection limit is reached (DNS channels count toward it)"


# How an association starts a task (see UdpAssociation).
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


@dataclass(slots=True)
class UdpSettings:
    """What every association shares: where channels come from, the policy, and what is
    known about the helper (it failed once: say so once, and retry only later)."""

    upstream: Upstream
    runner: Runner | None
    rules: Rules
    emit: events.Sink
    dns_server: tuple[str, int] | None = None
    helper: bool = False
    helper_failed_at: float | None = None
    helper_reported: bool = False
    clock: Callable[[], float] = time.monotonic
    # DNS channels open or opening, over every association; and whether the connection
    # limit leaves room for one more (the proxy that serves the associations says).
    links: int = 0
    room: Callable[[], bool] = lambda: True

    def helper_usable(self) -> bool:
        if self.runner is None or not self.helper:
            return False
        failed = self.helper_failed_at
        return failed is None or self.clock() - failed >= HELPER_RETRY

    def helper_failed(self, why: str) -> None:
        self.helper_failed_at = self.clock()
        if not self.helper_reported:
            self.helper_reported = True
            self.emit(
                events.Notice(
                    f"--udp-helper: the UDP helper could not start on the server ({why}); "
                    "only DNS (port 53) is relayed. It needs python3 on the server and "
                    "permission to run a command.",
                    key="udp-helper",
                )
            )


def helper_command() -> str:
    """The exec request that starts the helper: its source rides along, compressed, so
    nothing is installed on the server (and the command line stays short)."""
    source = resources.files(__package__ or "tunnel").joinpath("udp_helper.py").read_bytes()
    packed = base64.b64encode(zlib.compress(source, 9)).decode("ascii")
    code = f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{packed}')))"
    return "python3 -c " + shlex.quote(code)


def _destination_of(data: bytes) -> str:
    """Where a datagram was going, for the status view; "?" if it does not say."""
    try:
        datagram = parse_datagram(data)
    except RemoteProtocolError:
        return "?"
    return _hostport(datagram.host, datagram.port)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UdpAssociation(asyncio.DatagramProtocol):
    """The relay of one UDP ASSOCIATE. Lives as long as its TCP control connection."""

    def __init__(
        self,
        settings: UdpSettings,
        info: events.ConnectionInfo,
        client: tuple[str, int],
        *,
        spawn: Spawn,
        user: str | None = None,
    ) -> None:
        self.settings = settings
        self.info = info
        self.user = user  # the proxy user of the control connection
        # Starts the links' channel opens as tasks of the control connection, which
        # cancels them when it closes and whose proxy awaits them. Required: a bare
        # create_task would leave them to nobody.
        self.spawn = spawn
        # Datagrams are taken only from the control connection's address; the port from
        # the request, or else the first datagram's.
        self.client_host, self.client_port = client
        self._transport: asyncio.DatagramTransport | None = None
        self._dns: dict[tuple[str, int], _DnsLink] = {}
        self._helper: _HelperLink | None = None
        self._reported: set[Drop] = set()
        self.closed = False

    async def start(self, host: str) -> tuple[str, int]:
        """Bind the relay on ``host`` (the address the client reached us on)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, 0))
        self._transport = transport
        address = transport.get_extra_info("sockname")
        return str(address[0]), int(address[1])

    # -- from the client -----------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        if self.closed:
            return
        source_host, source_port = str(addr[0]), int(addr[1])
        if not same_host(source_host, self.client_host) or (
            self.client_port and source_port != self.client_port
        ):
            sender = _hostport(source_host, source_port)
            self.drop(Drop.FOREIGN, _destination_of(data), detail=f"from {sender}")
            return
        self.client_port = source_port
        try:
            datagram = parse_datagram(data)
        except RemoteProtocolError:
            self.drop(Drop.MALFORMED, "?")
            return
        host, port = datagram.host, datagram.port
        if datagram.address_type is AddressType.DOMAINNAME:
            # The normal form is what the rules check and the server gets (tunnel.names).
            # Only a name needs it: the codec writes an address out in its normal form
            # already, and this runs for every datagram.
            try:
                host = normalize_host(host)
            except BadName:
                self.drop(Drop.BAD_NAME, "?")
                return
        where = _hostport(host, port)
        if datagram.frag:
            self.drop(Drop.FRAGMENT, where)
            return
        if self.settings.rules.denies(host, port) is not None:
            self.drop(Drop.DENIED, where)
            return
        self.info.bytes_up += len(datagram.payload)
        if port == DNS_PORT:
            link = self._dns_link(host, port)
            if isinstance(link, Drop):
                self.drop(link, where)
                return
            link.query(datagram.payload, where, (host, port))
        elif self.settings.helper_usable():
            if self._helper is None:
                self._helper = _HelperLink(self)
            self._helper.send(host, port, datagram.payload, where)
        else:
            self.drop(Drop.NO_HELPER if not self.settings.helper else Drop.HELPER_DOWN, where)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP relay %s: %s", self.info.id, exc)

    # -- to the client -------------------------------------------------------------

    def reply(self, host: str, port: int, payload: bytes) -> None:
        """A datagram back to the client, as if from host:port."""
        if self.closed or self._transport is None or not self.client_port:
            return
        self.info.bytes_down += len(payload)
        try:
            packet = build_datagram(host, port, payload)
        except ValueError:
            return
        self._transport.sendto(packet, (self.client_host, self.client_port))

    def drop(self, reason: Drop, where: str, count: int = 1, detail: str = "") -> None:
        self.info.dropped += count
        if reason not in self._reported:
            self._reported.add(reason)
            why = f"{reason.value} ({detail})" if detail else reason.value
            self.settings.emit(events.DatagramsDropped(self.info, why, where))

    def _dns_link(self, host: str, port: int) -> _DnsLink | Drop:
        """The link to the resolver a query goes to, or why there is none."""
        # One link per resolver actually reached: with --dns-server, one for every
        # query, whatever address it was sent to.
        target = self.settings.dns_server or (host, port)
        link = self._dns.get(target)
        if link is None:
            if len(self._dns) >= MAX_DNS_LINKS:
                return Drop.LINKS
            if not self.settings.room():
                return Drop.LIMIT
            link = self._dns[target] = _DnsLink(self, target)
            self.settings.links += 1
        return link

    def forget_link(self, link: _DnsLink) -> None:
        """Close a DNS link and give its place back (idle, or its channel never opened)."""
        if self._dns.get(link.target) is link:
            del self._dns[link.target]
            self.settings.links -= 1
        link.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for link in list(self._dns.values()):
            self.forget_link(link)
        if self._helper is not None:
            self._helper.close()
        if self._transport is not None:
            self._transport.close()


class _Stream(abc.ABC):
    """What the DNS link and the helper link share: a channel being opened or open, the
    frames queued meanwhile, and flow control (datagrams are dropped, not held)."""

    def __init__(self, association: UdpAssociation) -> None:
        self.association = association
        self.paused = False
        self.channel: Channel | None = None
        self.opening: asyncio.Task[None] | None = None
        self.queued: list[bytes] = []

    def remote_pause(self) -> None:
        # The channel's send buffer is full: UDP may lose datagrams, so new ones are
        # dropped (and counted) rather than buffered without bound.
        self.paused = True

    def remote_resume(self) -> None:
        self.paused = False

    def remote_eof(self) -> None:
        if self.channel is not None:
            self.channel.close()

    def ready(self) -> bool:
        """Whether frames may go straight to the channel."""
        return self.channel is not None

    def write(self, frame: bytes) -> bool:
        """Write now, or queue until the channel is ready; False if there is no room."""
        if self.paused:
            return False
        if self.channel is not None and self.ready():
            self.channel.write(frame)
            return True
        if len(self.queued) >= MAX_QUEUED_DATAGRAMS:
            return False
        self.queued.append(frame)
        if self.opening is None and self.channel is None:
            self.opening = self.association.spawn(self._open())
        return True

    @abc.abstractmethod
    async def _open(self) -> None:
        """Open the channel; call :meth:`opened` with it, or fail what is queued."""

    def opened(self, channel: Channel) -> None:
        self.opening = None
        if self.association.closed:
            channel.close()
            return
        self.channel = channel
        channel.resume_reading()
        self.flush()

    def flush(self) -> None:
        if self.channel is None or not self.ready():
            return
        queued, self.queued = self.queued, []
        if queued:
            self.channel.write(b"".join(queued))

    def close(self) -> None:
        self.queued.clear()
        if self.opening is not None:
            self.opening.cancel()
            self.opening = None
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()


@dataclass(slots=True)
class _Query:
    message: bytes
    where: str
    # The address the client sent it to: its answer comes back as if from there.
    reply_as: tuple[str, int]
    timer: asyncio.TimerHandle | None = None
    sent: int = 1


class _DnsLink(_Stream):
    """DNS over TCP to one server, for one association."""

    def __init__(self, association: UdpAssociation, target: tuple[str, int]) -> None:
        super().__init__(association)
        self.target = target
        # For an answer that comes after its query timed out.
        self.last_reply_as = target
        self.decoder = dns_decoder()
        self.pending: dict[int, list[_Query]] = {}
        self.waiting = 0
        loop = asyncio.get_running_loop()
        self.last_query = loop.time()
        self.idle_timer: asyncio.TimerHandle | None = loop.call_later(LINK_IDLE, self._check_idle)

    def query(self, message: bytes, where: str, reply_as: tuple[str, int]) -> None:
        qid = dns_id(message)
        if qid is None:
            self.association.drop(Drop.MALFORMED, where)
            return
        if self.waiting >= MAX_PENDING_QUERIES:
            self.association.drop(Drop.BACKLOG, where)
            return
        query = _Query(message, where, reply_as)
        self.last_reply_as = reply_as
        self.last_query = asyncio.get_running_loop().time()
        query.timer = asyncio.get_running_loop().call_later(DNS_TIMEOUT, self._expire, qid, query)
        self.pending.setdefault(qid, []).append(query)
        self.waiting += 1
        self._send(query)

    def _send(self, query: _Query) -> None:
        try:
            frame = dns_frame(query.message)
        except ValueError:
            self._forget(query)
            self.association.drop(Drop.MALFORMED, query.where)
            return
        if not self.write(frame):
            self._forget(query)
            self.association.drop(Drop.BACKLOG, query.where)

    def _forget(self, query: _Query) -> None:
        qid = dns_id(query.message)
        queries = self.pending.get(qid) if qid is not None else None
        if queries and query in queries:
            queries.remove(query)
            self.waiting -= 1
            if not queries:
                del self.pending[qid]  # type: ignore[arg-type]
        if query.timer is not None:
            query.timer.cancel()

    def _expire(self, qid: int, query: _Query) -> None:
        query.timer = None
        self._forget(query)
        self.association.drop(Drop.DNS_TIMEOUT, query.where)

    def _check_idle(self) -> None:
        self.idle_timer = None
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self.last_query
        if quiet >= LINK_IDLE and not self.waiting:
            self.association.forget_link(self)
            return
        # Queries still waiting end within DNS_TIMEOUT; look again then.
        later = LINK_IDLE - quiet if quiet < LINK_IDLE else DNS_TIMEOUT
        self.idle_timer = loop.call_later(later, self._check_idle)

    async def _open(self) -> None:
        host, port = self.target
        association = self.association
        try:
            request = Request(
                host=host,
                port=port,
                origin=(association.client_host, association.client_port),
                protocol="socks5-udp",
                user=association.user,
                listener=association.info.listener,
            )
            channel = await association.settings.upstream.open(request, self)
        except ChannelOpenFailed as exc:
            log.info("DNS over TCP to %s:%s failed: %s", host, port, exc.message)
            self.opening = None
            self.queued.clear()
            for queries in list(self.pending.values()):
                for query in list(queries):
                    self._forget(query)
                    association.drop(Drop.DNS_FAILED, query.where)
            # Its place goes to the next resolver asked for; this one is tried afresh.
            association.forget_link(self)
            return
        self.opened(channel)

    def remote_data(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except RemoteProtocolError:
            self.remote_eof()
            return
        for message in messages:
            qid = dns_id(message)
            queries = self.pending.get(qid) if qid is not None else None
            reply_as = self.last_reply_as
            if queries:
                reply_as = queries[0].reply_as
                self._forget(queries[0])
            # An answer that comes after its query timed out is still passed on: the
            # client's resolver may still want it.
            self.association.reply(*reply_as, message)

    def remote_closed(self, exc: BaseException | None) -> None:
        # The server closed the connection (idle, or a limit on queries per connection):
        # what it left unanswered goes once more on a new channel.
        self.channel = None
        self.decoder = dns_decoder()
        if self.association.closed:
            return
        for queries in list(self.pending.values()):
            for query in list(queries):
                if query.sent > 1:
                    self._forget(query)
                    self.association.drop(Drop.DNS_FAILED, query.where)
                else:
                    query.sent += 1
                    self._send(query)

    def close(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        for queries in list(self.pending.values()):
            for query in list(queries):
                self._forget(query)
        super().close()


class _HelperLink(_Stream):
    """The UDP helper on the server, for one association."""

    def __init__(self, association: UdpAssociation) -> None:
        super().__init__(association)
        self.decoder = helper_decoder()
        self.hello = b""
        self.running = False
        # The first datagram waiting for the helper to start, to name it if it fails.
        self.waiting_for = ""

    def ready(self) -> bool:
        # Datagrams wait for the hello: if the helper never says it, they are counted
        # as dropped instead of vanishing into a shell that is not listening.
        return self.channel is not None and self.running

    def send(self, host: str, port: int, payload: bytes, where: str) -> None:
        try:
            frame = helper_frame(host, port, payload)
        except ValueError:
            self.association.drop(Drop.MALFORMED, where)
            return
        if not self.write(frame):
            self.association.drop(Drop.BACKLOG, where)
        elif self.queued and not self.waiting_for:
            self.waiting_for = where

    async def _open(self) -> None:
        settings = self.association.settings
        assert settings.runner is not None
        try:
            channel = await settings.runner.run_process(helper_command(), self)
        except ChannelOpenFailed as exc:
            self._failed(exc.message)
            return
        self.opened(channel)

    def _failed(self, why: str) -> None:
        dropped, where = len(self.queued), self.waiting_for
        self.opening = None
        self.queued.clear()
        self.waiting_for = ""
        if dropped:
            self.association.drop(Drop.HELPER_DOWN, where, dropped)
        self.association.settings.helper_failed(why)

    def remote_data(self, data: bytes) -> None:
        if not self.running:
            # The hello first: anything else is a shell or Python talking, not the helper.
            self.hello += data
            if len(self.hello) < len(HELPER_HELLO):
                if not HELPER_HELLO.startswith(self.hello):
                    self._garbled()
                return
            if not self.hello.startswith(HELPER_HELLO):
                self._garbled()
                return
            self.running = True
            data, self.hello = self.hello[len(HELPER_HELLO) :], b""
            self.waiting_for = ""
            self.flush()
        try:
            frames = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            log.info("UDP helper sent a bad frame: %s", exc)
            self.remote_eof()
            return
        for frame in frames:
            try:
                datagram = parse_helper_frame(frame)
            except RemoteProtocolError:
                continue
            self.association.reply(datagram.host, datagram.port, datagram.payload)

    def _garbled(self) -> None:
        text = self.hello.decode("utf-8", "replace").strip()[:200]
        self.hello = b""
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()
        self._failed(f"it printed {text!r}")

    def remote_closed(self, exc: BaseException | None) -> None:
        self.channel = None
        if self.association.closed:
            return
        if not self.running:
            self._failed(str(exc) if exc else "it ended at once")
            return
        # It ran and ended (the session was lost, or it was killed): start anew on the
        # next datagram.
        self.running = False
        self.decoder = helper_decoder()
