"""When to try the SSH connection again: a pure backoff schedule and the classifier.

No clock and no global randomness: the caller passes ``random`` (a function returning
floats in [0, 1)), so a test can replay any schedule exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .errors import SessionError, TunnelError


def backoff(
    *,
    first: float = 1.0,
    factor: float = 2.0,
    cap: float = 60.0,
    jitter: float = 0.5,
    random: Callable[[], float],
) -> Iterator[float]:
    """Delays before each attempt: 0 (retry at once), then ``first``, ``first*factor``,
    ... up to ``cap``, each scaled into ``[1-jitter, 1]`` of itself so that many tunnels
    cut off together do not come back in lockstep. Never ends; never exceeds ``cap``."""
    if not (first > 0 and factor >= 1 and cap >= first and 0 <= jitter <= 1):
        raise ValueError("backoff needs first > 0, factor >= 1, cap >= first, 0 <= jitter <= 1")
    yield 0.0
    delay = first
    while True:
        yield min(cap, delay) * (1.0 - jitter * random())
        delay = min(cap, delay * factor)


def is_retryable(error: BaseException) -> bool:
    """Network trouble is worth another try; a refused login or a changed host key is
    not (retrying would lock the account or talk to an impostor)."""
    if isinstance(error, SessionError):
        return error.retryable
    return not isinstance(error, TunnelError)
