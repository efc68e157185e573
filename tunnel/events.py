"""Observable facts, as frozen dataclasses, and the sink they are sent to.

The core (session, proxy, app) emits these and never prints. Renderers turn them into a
live view, plain lines or JSON. Events carry no timestamps: the sink is called
synchronously at the moment the fact happens, so whoever receives one stamps it.
Byte counts of open connections are not events (that would put a call on every chunk);
renderers read them from :class:`ConnectionInfo` on their own timer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class ConnectionInfo:
    """Live, mutable facts about one client connection, read by renderers on a timer.

    The relay adds to ``bytes_up``/``bytes_down`` (one integer add per chunk)."""

    id: int
    client: str
    started: float
    listener: str = ""
    # "socks5", "socks4", "socks4a", "http-connect" or "http" once the request is read;
    # "socks5-bind", "socks4-bind" and "socks5-udp" for the other SOCKS commands.
    protocol: str = ""
    host: str = ""
    port: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    open: bool = False
    # UDP associations only: datagrams the relay could not pass on (see DatagramsDropped).
    dropped: int = 0
    # The way out once routed: the destination's label (the alias as written in the
    # route or on the command line), "direct" or "reject"; "" until then.
    upstream: str = ""
    # --isolate: the proxy user name the connection is isolated by, printable-escaped
    # (None: no name given, the shared default session). Never the password.
    isolation: str | None = None


@dataclass(frozen=True, slots=True)
class Listener:
    """A SOCKS/HTTP proxy port: here, or (``remote``, from ``-R``) on the SSH server."""

    host: str
    port: int
    remote: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"socks5h://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenerStarted:
    listener: Listener


@dataclass(frozen=True, slots=True)
class Ready:
    """The SSH session is authenticated and every listener accepts connections."""

    listeners: tuple[Listener, ...]
    server: str
    # The command line's destination as written: the label of what no route matches.
    upstream: str = ""
    # "ssh" (our own login) or "openssh-master" (riding ssh -M), with the master's PID.
    transport: str = "ssh"
    master_pid: int | None = None


# Why a session was given up and made again (``cause`` of SessionLost, ReconnectScheduled
# and SessionUp): it died; the machine resumed from sleep or its network changed and the
# probe found it dead; SIGHUP (or another caller of Supervisor.reconnect_now) asked.
CAUSE_LOST = "lost"
CAUSE_SLEEP = "sleep"
CAUSE_NETWORK = "network"
CAUSE_SIGHUP = "sighup"


@dataclass(frozen=True, slots=True)
class SessionConnecting:
    server: str
    attempt: int
    # A client's request cut the backoff short (it waits for this attempt).
    demand: bool = False
    # A route's destination: its label as written; "" for the command line's.
    upstream: str = ""


@dataclass(frozen=True, slots=True)
class SessionUp:
    server: str
    server_version: str
    cipher: str
    kex: str
    mac: str
    compression: str
    # Set when this ends an outage: why the session was remade, and the seconds from
    # the loss (or the request) to now, in which no channel could be opened.
    cause: str | None = None
    outage: float | None = None
    # A route's destination: its label as written; "" for the command line's.
    upstream: str = ""


@dataclass(frozen=True, slots=True)
class SessionLost:
    server: str
    reason: str
    cause: str = CAUSE_LOST
    # A route's destination: its label as written; "" for the command line's.
    upstream: str = ""


@dataclass(frozen=True, slots=True)
class ReconnectScheduled:
    server: str
    delay: float
    attempt: int
    reason: str
    cause: str = CAUSE_LOST
    # A route's destination: its label as written; "" for the command line's.
    upstream: str = ""


@dataclass(frozen=True, slots=True)
class Status:
    """The answer to SIGUSR1 (as ``dd`` gives one): where the session is and what went
    through it. ``state`` is Stats' (up, lost, connecting, waiting); ``state_seconds``
    how long it has been so (the session's uptime when up, the outage otherwise)."""

    server: str
    state: str
    state_seconds: float
    uptime: float
    reconnects: int
    open: int
    served: int
    failed: int
    rejected: int
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True, slots=True)
class SessionProbed:
    """The session was probed at once because the machine slept (``cause`` "sleep") or
    the network changed ("network"); without an answer it is dropped and made
    again."""

    server: str
    cause: str
    answered: bool


@dataclass(frozen=True, slots=True)
class ClientAccepted:
    connection: ConnectionInfo


@dataclass(frozen=True, slots=True)
class ClientRejected:
    """The client broke the protocol, timed out before a complete request, or (``auth``)
    gave wrong proxy credentials; or (``empty``) closed before sending a byte, as port
    probes and browsers' preconnects do: counted, but not a problem."""

    connection: ConnectionInfo
    reason: str
    auth: bool = False
    empty: bool = False


@dataclass(frozen=True, slots=True)
class RequestParsed:
    connection: ConnectionInfo
    protocol: str
    command: str
    host: str
    port: int
    sent_name: bool


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    connection: ConnectionInfo
    latency: float


@dataclass(frozen=True, slots=True)
class ChannelFailed:
    connection: ConnectionInfo
    reply: int
    reply_label: str
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    connection: ConnectionInfo
    bytes_up: int
    bytes_down: int
    duration: float


@dataclass(frozen=True, slots=True)
class DatagramsDropped:
    """The first datagram of a UDP association dropped for ``reason``; later ones for
    the same reason are only counted (``ConnectionInfo.dropped``)."""

    connection: ConnectionInfo
    reason: str
    destination: str


@dataclass(frozen=True, slots=True)
class IncomingRefused:
    """A connection the SSH server accepted on a port it listens on for us (``-R``, a
    SOCKS BIND) that we refused: ``client`` connected to listen_host:listen_port."""

    listen_host: str
    listen_port: int
    client: str
    reason: str


@dataclass(frozen=True, slots=True)
class IsolatedSession:
    """An SSH session of one isolation key (``--isolate``): ``state`` is "connecting",
    "up", "failed" (the request that wanted it is refused), "lost" (the next request
    reconnects it) or "closed" (``reason``: idle, or stopping). ``isolation`` is the
    proxy user name, printable-escaped."""

    isolation: str
    server: str
    state: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Stopping:
    reason: str


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user should know once, such as a DNS-leak hint."""

    message: str
    key: str = field(default="")


Event = (
    ListenerStarted
    | Ready
    | SessionConnecting
    | SessionUp
    | SessionLost
    | ReconnectScheduled
    | SessionProbed
    | ClientAccepted
    | ClientRejected
    | RequestParsed
    | ChannelOpened
    | ChannelFailed
    | ConnectionClosed
    | DatagramsDropped
    | IncomingRefused
    | IsolatedSession
    | Stopping
    | Notice
    | Status
)

Sink = Callable[[Event], None]


class Prompter(Protocol):
    """How the core asks the person at the terminal something. ``ask`` blocks, so the
    session calls it from a thread of its own; the rest are called from the event loop.
    ``None`` means no answer (no terminal, or the person gave up). Secrets are returned,
    never logged."""

    def ask(self, prompt: str, echo: bool) -> str | None: ...
    def show(self, text: str) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def interrupt(self) -> None: ...


def discard(event: Event) -> None:
    """A sink that drops everything (for tests and embedding)."""
