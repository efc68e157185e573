"""A pure fold of events into counters, and rates computed from samples.

Nothing here reads a clock: whoever calls :meth:`Stats.sample` passes ``now``.
Byte counts of open connections are read from their live
:class:`~tunnel.events.ConnectionInfo`, so the relay never calls into this module.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import deque
from dataclasses import dataclass, field

from . import events

_WAY_STATES: dict[type, str] = {
    events.SessionConnecting: "connecting",
    events.SessionUp: "up",
    events.SessionLost: "lost",
    events.ReconnectScheduled: "reconnecting",
}


@dataclass(frozen=True, slots=True)
class Failure:
    destination: str
    reply: int
    label: str
    reason: str


@functools.lru_cache(maxsize=1024)
def is_public_address(host: str) -> bool:
    """True for an IP address outside loopback, private, link-local and reserved ranges:
    the kind a client can only have got from a local DNS lookup."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_global


@dataclass(slots=True)
class Stats:
    """Counters for a whole run."""

    served: int = 0
    failed: int = 0
    rejected: int = 0
    # Clients that closed without sending a byte (port probes, preconnects).
    unused: int = 0
    auth_failures: int = 0
    closed_bytes_up: int = 0
    closed_bytes_down: int = 0
    local_dns_requests: int = 0
    closed_dropped: int = 0
    session_state: str = "starting"
    session_since: float | None = None
    reconnect_at: float | None = None
    cipher: str = ""
    server_version: str = ""
    listeners: list[events.Listener] = field(default_factory=list)
    # Each route destination's state by its label ("connecting", "up", "lost",
    # "reconnecting"); the command line's is session_state.
    ways: dict[str, str] = field(default_factory=dict)
    open: dict[int, events.ConnectionInfo] = field(default_factory=dict)
    failures: deque[Failure] = field(default_factory=lambda: deque(maxlen=5))
    _last_total: int = 0
    _last_time: float | None = None
    rate: float = 0.0

    def apply(self, event: events.Event, now: float) -> None:
        """Fold one event in. ``now`` is the time the event was received."""
        session_event = (
            events.SessionConnecting | events.SessionUp | events.SessionLost
        ) | events.ReconnectScheduled
        if isinstance(event, session_event) and event.upstream:
            self.ways[event.upstream] = _WAY_STATES[type(event)]
            return
        match event:
            case events.ListenerStarted(listener=listener):
                # A -R listener is announced again after each reconnect.
                if listener not in self.listeners:
                    self.listeners.append(listener)
            case events.Ready() if self.session_state == "starting":
                # Riding an OpenSSH master: no session_up of ours came before.
                self.session_state = "up"
                self.session_since = now
            case events.SessionConnecting():
                self.session_state = "connecting"
                self.reconnect_at = None
            case events.SessionUp(cipher=cipher, server_version=version):
                self.session_state = "up"
                self.session_since = now
                self.cipher = cipher
                self.server_version = version
            case events.SessionLost():
                self.session_state = "lost"
                self.session_since = now
            case events.ReconnectScheduled(delay=delay):
                self.session_state = "waiting"
                self.reconnect_at = now + delay
            case events.RequestParsed(host=host, sent_name=sent_name):
                if not sent_name and is_public_address(host):
                    self.local_dns_requests += 1
            case events.ChannelOpened(connection=info):
                self.served += 1
                self.open[info.id] = info
            case events.ChannelFailed(connection=info, reply=reply, reply_label=label, reason=why):
                self.failed += 1
                self.failures.append(Failure(_destination(info), reply, label, why))
            case events.ClientRejected(empty=True):
                self.unused += 1
            case events.ClientRejected(auth=auth):
                self.rejected += 1
                self.auth_failures += auth
            case events.ConnectionClosed(connection=info, bytes_up=up, bytes_down=down):
                self.open.pop(info.id, None)
                self.closed_dropped += info.dropped
                self.closed_bytes_up += up
                self.closed_bytes_down += down
            case events.Stopping():
                self.session_state = "stopping"

    @property
    def datagrams_dropped(self) -> int:
        """UDP datagrams the relay could not pass on, closed associations and open."""
        return self.closed_dropped + sum(info.dropped for info in self.open.values())

    @property
    def bytes_up(self) -> int:
        return self.closed_bytes_up + sum(info.bytes_up for info in self.open.values())

    @property
    def bytes_down(self) -> int:
        return self.closed_bytes_down + sum(info.bytes_down for info in self.open.values())

    def sample(self, now: float) -> float:
        """Update and return the throughput (bytes/s, both ways) since the last sample."""
        total = self.bytes_up + self.bytes_down
        if self._last_time is not None and now > self._last_time:
            self.rate = (total - self._last_total) / (now - self._last_time)
        self._last_total = total
        self._last_time = now
        return self.rate


def _destination(info: events.ConnectionInfo) -> str:
    host = f"[{info.host}]" if ":" in info.host else info.host
    return f"{host}:{info.port}"
