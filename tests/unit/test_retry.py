"""The reconnect schedule and the retry classifier (``tunnel.retry``): pure functions, so
the randomness is passed in and every sequence is replayed exactly."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.errors import (
    AuthenticationFailed,
    ChannelOpenFailed,
    ConfigError,
    ConnectFailed,
    HostKeyRejected,
    ListenError,
    ReplyReason,
    SessionClosed,
    SessionError,
)
from tunnel.retry import backoff, is_retryable

PROPERTY = settings(max_examples=300, deadline=None)


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


def take(schedule: Iterator[float], count: int) -> list[float]:
    return list(itertools.islice(schedule, count))


# -- backoff: exact sequences ---------------------------------------------------------------


def test_first_attempt_is_immediate() -> None:
    assert next(backoff(random=fixed(0.9))) == 0.0


def test_no_jitter_draw_doubles_up_to_the_cap() -> None:
    # random() == 0 scales by (1 - jitter*0) = 1: the bare exponential schedule.
    assert take(backoff(random=fixed(0.0)), 10) == [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_largest_jitter_draw_halves_each_delay() -> None:
    # Default jitter 0.5: a draw near 1 takes each delay down to (just above) half.
    delays = take(backoff(random=fixed(0.999999)), 9)
    expected = [0, 1, 2, 4, 8, 16, 32, 60, 60]
    for got, base in zip(delays[1:], expected[1:], strict=True):
        assert got == pytest.approx(base * (1 - 0.5 * 0.999999))
        assert base / 2 < got < base


def test_custom_parameters() -> None:
    schedule = backoff(first=0.25, factor=3, cap=5, jitter=0.0, random=fixed(0.7))
    assert take(schedule, 6) == [0, 0.25, 0.75, 2.25, 5, 5]


def test_full_jitter_spans_the_whole_range_above_zero() -> None:
    assert take(backoff(jitter=1.0, random=fixed(0.0)), 3) == [0, 1, 2]
    assert take(backoff(jitter=1.0, random=fixed(0.5)), 3) == [0, 0.5, 1]
    assert all(0 < d < 1e-5 for d in take(backoff(jitter=1.0, random=fixed(1 - 1e-6)), 4)[1:])


def test_each_delay_draws_once_from_the_given_random() -> None:
    draws = iter([0.0, 0.5, 0.25, 0.75])
    calls: list[float] = []

    def random() -> float:
        calls.append(value := next(draws))
        return value

    delays = take(backoff(random=random), 5)
    assert delays == [0, 1 * 1.0, 2 * 0.75, 4 * 0.875, 8 * 0.625]
    assert calls == [0.0, 0.5, 0.25, 0.75]  # the immediate first attempt draws nothing


def test_cap_equal_to_first_is_flat() -> None:
    assert take(backoff(first=3, cap=3, random=fixed(0.0)), 5) == [0, 3, 3, 3, 3]


def test_factor_one_is_constant() -> None:
    assert take(backoff(first=2, factor=1, random=fixed(0.0)), 4) == [0, 2, 2, 2]


def test_never_ends() -> None:
    schedule = backoff(random=fixed(0.3))
    assert len(take(schedule, 10_000)) == 10_000
    assert next(schedule) <= 60


@pytest.mark.parametrize(
    "params",
    [
        {"first": 0},
        {"first": -1},
        {"first": math.nan},
        {"factor": 0.5},
        {"factor": math.nan},
        {"cap": 0.5},  # below first (1.0)
        {"first": 10, "cap": 5},
        {"cap": math.nan},
        {"jitter": -0.1},
        {"jitter": 1.5},
        {"jitter": math.nan},
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_bad_parameters_raise_value_error(params: dict[str, float]) -> None:
    # backoff is a generator: the check runs when the first delay is asked for.
    with pytest.raises(ValueError, match="backoff needs"):
        next(backoff(random=fixed(0.0), **params))


# -- backoff: properties --------------------------------------------------------------------

params = st.fixed_dictionaries(
    {
        "first": st.floats(0.001, 100),
        "factor": st.floats(1, 10),
        "extra_cap": st.floats(0, 1000),
        "jitter": st.floats(0, 1),
    }
)
draws = st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=40)


def replay(values: list[float]) -> Callable[[], float]:
    cycle = itertools.cycle(values)
    return lambda: next(cycle)


@PROPERTY
@given(params, draws)
def test_delays_stay_in_the_jitter_band_of_the_capped_exponential(
    p: dict[str, float], values: list[float]
) -> None:
    cap = p["first"] + p["extra_cap"]
    schedule = backoff(
        first=p["first"], factor=p["factor"], cap=cap, jitter=p["jitter"], random=replay(values)
    )
    delays = take(schedule, 40)
    assert delays[0] == 0.0
    base = p["first"]
    for delay in delays[1:]:
        nominal = min(cap, base)
        assert nominal * (1 - p["jitter"]) - 1e-9 <= delay <= nominal + 1e-9
        assert 0.0 <= delay <= cap
        base = min(cap, base * p["factor"])


@PROPERTY
@given(params)
def test_without_a_jitter_draw_the_schedule_grows_then_stays_at_the_cap(
    p: dict[str, float],
) -> None:
    cap = p["first"] + p["extra_cap"]
    schedule = backoff(
        first=p["first"], factor=p["factor"], cap=cap, jitter=p["jitter"], random=fixed(0.0)
    )
    delays = take(schedule, 60)[1:]
    assert delays[0] == p["first"]
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert max(delays) <= cap
    if p["first"] * p["factor"] ** 50 >= cap:  # surely reached within the 59 steps
        assert delays[-1] == cap


@PROPERTY
@given(params, st.floats(0, 1, exclude_max=True))
def test_same_draws_same_schedule(p: dict[str, float], draw: float) -> None:
    kwargs = {
        "first": p["first"],
        "factor": p["factor"],
        "cap": p["first"] + p["extra_cap"],
        "jitter": p["jitter"],
    }
    one = take(backoff(random=fixed(draw), **kwargs), 20)
    two = take(backoff(random=fixed(draw), **kwargs), 20)
    assert one == two


# -- is_retryable ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (AuthenticationFailed("permission denied (publickey)"), False),
        (HostKeyRejected("HOST KEY CHANGED"), False),
        (ConnectFailed("Connection refused"), True),
        (SessionClosed("user@host", "connection closed by the server"), True),
        (SessionError("lost"), True),
        (ConfigError("bad option"), False),
        (ListenError("address in use"), False),
        (ChannelOpenFailed(ReplyReason.CONNECTION_REFUSED, "refused"), False),
        (OSError("network is unreachable"), True),
        (ConnectionResetError("reset"), True),
        (TimeoutError(), True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_is_retryable(error: BaseException, retryable: bool) -> None:
    assert is_retryable(error) is retryable


def test_fatal_errors_stay_fatal_whatever_they_wrap() -> None:
    # Chaining (raise ... from exc) must not change the verdict.
    fatal = AuthenticationFailed("permission denied")
    fatal.__cause__ = ConnectionResetError("reset during auth")
    assert is_retryable(fatal) is False
    retryable = ConnectFailed("timed out")
    retryable.__cause__ = ValueError("not an OSError")
    assert is_retryable(retryable) is True
