"""The login throttle (tunnel.throttle): a pure policy with the time passed in, so every
test here runs on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.throttle import (
    FIRST_DELAY,
    FORGET_AFTER,
    FREE_FAILURES,
    MAX_DELAY,
    LoginThrottle,
    client_key,
)

A = "192.0.2.1"
B = "192.0.2.2"


def holds(throttle: LoginThrottle, address: str, count: int, now: float = 0.0) -> list[float]:
    return [throttle.failed(address, now) for _ in range(count)]


def test_the_first_failures_are_answered_at_once_then_held_doubling_to_the_cap() -> None:
    throttle = LoginThrottle()
    assert holds(throttle, A, FREE_FAILURES + 6) == [0.0] * FREE_FAILURES + [
        1.0,
        2.0,
        4.0,
        8.0,
        8.0,
        8.0,
    ]
    assert (FIRST_DELAY, MAX_DELAY) == (1.0, 8.0)


def test_another_address_is_not_held() -> None:
    throttle = LoginThrottle()
    holds(throttle, A, 10)
    assert holds(throttle, B, FREE_FAILURES) == [0.0] * FREE_FAILURES
    assert throttle.failures(B, 0.0) == FREE_FAILURES


def test_an_address_is_forgotten_after_a_quiet_period() -> None:
    throttle = LoginThrottle()
    holds(throttle, A, 8, now=100.0)
    # Just before the quiet period ends, it still counts...
    assert throttle.failures(A, 100.0 + FORGET_AFTER - 0.5) == 8
    # ...and once it has ended, the address starts afresh.
    later = 100.0 + FORGET_AFTER
    assert throttle.failures(A, later) == 0
    assert len(throttle) == 0
    assert throttle.failed(A, later) == 0.0


def test_each_failure_restarts_the_quiet_period() -> None:
    throttle = LoginThrottle(forget_after=60.0)
    for step in range(10):
        throttle.failed(A, step * 59.0)
    assert throttle.failures(A, 9 * 59.0 + 59.0) == 10


def test_the_table_is_bounded_and_forgets_the_oldest_first() -> None:
    throttle = LoginThrottle(max_addresses=3)
    for index, address in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]):
        throttle.failed(address, float(index))
    assert len(throttle) == 3
    assert throttle.failures("10.0.0.1", 4.0) == 0
    assert throttle.failures("10.0.0.4", 4.0) == 1


def test_a_repeat_offender_is_not_evicted_by_older_entries() -> None:
    throttle = LoginThrottle(max_addresses=2)
    throttle.failed("10.0.0.1", 0.0)
    throttle.failed("10.0.0.2", 1.0)
    throttle.failed("10.0.0.1", 2.0)  # now the most recent
    throttle.failed("10.0.0.3", 3.0)
    assert throttle.failures("10.0.0.1", 3.0) == 2
    assert throttle.failures("10.0.0.2", 3.0) == 0


KEYS = [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::99", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not-an-address", "not-an-address"),
]


@pytest.mark.parametrize(("address", "key"), KEYS, ids=[a for a, _ in KEYS])
def test_client_key(address: str, key: str) -> None:
    assert client_key(address) == key


def test_one_ipv6_host_counts_once_across_its_64() -> None:
    throttle = LoginThrottle()
    for suffix in range(FREE_FAILURES):
        throttle.failed(f"2001:db8::{suffix + 1}", 0.0)
    assert throttle.failed("2001:db8::ffff", 0.0) == FIRST_DELAY


@pytest.mark.parametrize(
    "settings",
    [{"first": 0.0}, {"first": 2.0, "cap": 1.0}, {"free": -1}, {"forget_after": 0.0}],
)
def test_nonsense_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="throttle needs"):
        LoginThrottle(**settings)  # type: ignore[arg-type]


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=2 * FORGET_AFTER), max_size=60),
    address=st.sampled_from([A, B, "2001:db8::1", "::ffff:192.0.2.1"]),
)
def test_holds_stay_within_bounds_and_never_shrink_without_a_quiet_period(
    gaps: list[float], address: str
) -> None:
    throttle = LoginThrottle()
    now, previous = 0.0, 0.0
    for gap in gaps:
        now += gap
        hold = throttle.failed(address, now)
        assert 0.0 <= hold <= MAX_DELAY
        if gap < FORGET_AFTER:
            assert hold >= previous
        previous = hold


def test_a_huge_count_still_gives_the_cap() -> None:
    throttle = LoginThrottle()
    assert throttle.hold(10**9) == MAX_DELAY
