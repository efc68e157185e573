"""The fast path's padding pool (tunnel/fastpath.py): every byte drawn from the CSPRNG is
handed out at most once, each take is exactly the length asked for and comes from one
draw, in order; so padding stays as unpredictable as one ``os.urandom`` per packet."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from tunnel.fastpath import PADDING_POOL, _PaddingPool


class _Draws:
    """A stand-in CSPRNG whose every output byte is unique (a running counter, 4 bytes
    per position), so a byte handed out twice shows."""

    def __init__(self) -> None:
        self.counter = itertools.count()
        self.draws: list[bytes] = []

    def __call__(self, count: int) -> bytes:
        assert count % 4 == 0, "the pool draws whole 4-byte units in this test"
        out = b"".join(next(self.counter).to_bytes(4, "big") for _ in range(count // 4))
        self.draws.append(out)
        return out


# Padding lengths asyncssh asks for are 4..255; whole 4-byte units keep the counter intact.
_LENGTHS = st.lists(st.integers(1, 63).map(lambda units: units * 4), max_size=400)


@given(_LENGTHS)
def test_every_take_is_a_fresh_slice_of_one_draw(lengths: list[int]) -> None:
    draws = _Draws()
    pool = _PaddingPool(draws)
    taken = [pool.take(n) for n in lengths]
    assert [len(t) for t in taken] == lengths
    # Walk the draws in order: each take is the next unused run of the current draw, or
    # the start of a new draw when the current one has too little left.
    draw, at = -1, 0
    for piece in taken:
        if draw < 0 or at + len(piece) > len(draws.draws[draw]):
            draw, at = draw + 1, 0
        assert piece == draws.draws[draw][at : at + len(piece)]
        at += len(piece)
    assert len(draws.draws) == draw + 1
    # And so no byte (4-byte unit) was handed out twice.
    units = [p[i : i + 4] for p in taken for i in range(0, len(p), 4)]
    assert len(units) == len(set(units))


def test_one_draw_serves_many_packets() -> None:
    draws = _Draws()
    pool = _PaddingPool(draws)
    for _ in range(PADDING_POOL // 16):
        pool.take(16)
    assert len(draws.draws) == 1
    pool.take(16)
    assert len(draws.draws) == 2


def test_the_default_source_is_the_os_csprng() -> None:
    first, second = _PaddingPool(), _PaddingPool()
    # Two pools, 32 bytes each: equal only if the source were not random.
    assert first.take(32) != second.take(32)
