"""Failed proxy logins: how long to hold the answer to each one, per client address.

A client that guesses passwords (SOCKS5 RFC 1929, HTTP ``Proxy-Authorization``) gets
its first few wrong answers at once, then each further failure's answer later, doubling
up to a cap. Only failures are held, and only for the address that failed: a right
password, and anyone else's login, are answered at once. An address is forgotten after
a quiet period, and the table is bounded, so a flood of addresses cannot grow it.

Pure: no clock and no I/O; the caller passes the time and does the waiting.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

# Typos and stale saved passwords happen: a few wrong ones cost nothing.
FREE_FAILURES: Final = 5
# Then 1 s, 2 s, 4 s, 8 s, 8 s, ...: a client that waits for each answer (every common
# brute-force loop) drops from about 1600 tries a second to one every 8 s.
FIRST_DELAY: Final = 1.0
MAX_DELAY: Final = 8.0
# Fifteen minutes without a failure and an address starts afresh.
FORGET_AFTER: Final = 900.0
# One small record per address: a bounded table even under a flood of addresses; the
# address that failed longest ago is forgotten first.
MAX_ADDRESSES: Final = 4096
# One IPv6 host usually owns a whole /64, and could otherwise start afresh from each
# of its addresses.
IPV6_PREFIX: Final = 64


def client_key(address: str) -> str:
    """What a client is counted as: its IPv4 address (also when written IPv4-mapped), the
    /64 of an IPv6 address, or the text itself if it is not an address."""
    try:
        parsed = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, IPV6_PREFIX), strict=False))
    return str(parsed)


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class LoginThrottle:
    """The failure counts of recent addresses and the hold each next failure gets."""

    def __init__(
        self,
        *,
        free: int = FREE_FAILURES,
        first: float = FIRST_DELAY,
        cap: float = MAX_DELAY,
        forget_after: float = FORGET_AFTER,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        if not (free >= 0 and 0 < first <= cap and forget_after > 0 and max_addresses > 0):
            raise ValueError("throttle needs free >= 0, 0 < first <= cap, forget_after > 0")
        self.free = free
        self.first = first
        self.cap = cap
        self.forget_after = forget_after
        self.max_addresses = max_addresses
        # Oldest failure first: expiry and eviction both take from the front.
        self._table: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def failed(self, address: str, now: float) -> float:
        """Count a failed login from ``address`` at ``now``; how many seconds to hold
        its answer (0 for the first few)."""
        self._expire(now)
        key = client_key(address)
        record = self._table.pop(key, None) or _Failures(0, now)
        record.count += 1
        record.last = now
        self._table[key] = record
        while len(self._table) > self.max_addresses:
            self._table.popitem(last=False)
        return self.hold(record.count)

    def hold(self, failures: int) -> float:
        """The hold for an address's ``failures``-th failure in a row."""
        beyond = failures - self.free
        if beyond <= 0:
            return 0.0
        # Capped before it is raised to a power: the count can grow without bound.
        return min(self.cap, self.first * 2.0 ** min(beyond - 1, 64))

    def failures(self, address: str, now: float) -> int:
        """How many failures ``address`` has to its name at ``now``."""
        self._expire(now)
        record = self._table.get(client_key(address))
        return 0 if record is None else record.count

    def _expire(self, now: float) -> None:
        while self._table:
            key, record = next(iter(self._table.items()))
            if now - record.last < self.forget_after:
                return
            del self._table[key]
