"""Hybrid logical clock: strictly increasing versions, whatever the wall clock does."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.hlc import HybridClock

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)


class Wall:
    """A wall clock in milliseconds that the test sets."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_version_follows_the_wall_clock() -> None:
    wall = Wall(1_000)
    hlc = HybridClock(wall)
    assert hlc.next() == 1_000 << 16
    assert hlc.next() == (1_000 << 16) + 1  # same millisecond: the logical part counts
    wall.ms = 2_000
    assert hlc.next() == 2_000 << 16


def test_strictly_increasing_when_the_wall_clock_goes_back() -> None:
    wall = Wall(5_000)
    hlc = HybridClock(wall)
    first = hlc.next()
    wall.ms = 1_000  # NTP step backwards
    assert hlc.next() == first + 1
    assert hlc.next() == first + 2
    wall.ms = 5_001
    assert hlc.next() == 5_001 << 16


def test_observe_pushes_past_remote_versions() -> None:
    wall = Wall(1_000)
    hlc = HybridClock(wall)
    remote = (9_000 << 16) + 7  # a node whose clock is ahead
    hlc.observe(remote)
    assert hlc.next() == remote + 1
    hlc.observe(5)  # an older version changes nothing
    assert hlc.next() == remote + 2


def test_version_before() -> None:
    wall = Wall(10_000)
    hlc = HybridClock(wall)
    assert hlc.version_before(2.5) == 7_500 << 16
    assert hlc.version_before(0) == 10_000 << 16
    assert hlc.version_before(60) == 0  # never negative
    # A write made now carries a version at least this; one made 2.5 s ago, at least that.
    assert hlc.next() >= hlc.version_before(0)
    earlier = HybridClock(Wall(7_500)).next()
    assert earlier >= hlc.version_before(2.5)
    assert earlier < hlc.version_before(2.4)


def test_default_wall_clock_is_unix_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    v = HybridClock().next()
    after = time.time_ns() // 1_000_000
    assert before << 16 <= v <= after << 16


@PROPERTY
@given(st.lists(st.one_of(
    st.tuples(st.just("wall"), st.integers(0, 2**40)),
    st.tuples(st.just("observe"), st.integers(0, 2**56)),
    st.tuples(st.just("next"), st.just(0)),
), max_size=40))
def test_versions_strictly_increase_and_pass_everything_seen(
    ops: list[tuple[str, int]]
) -> None:
    wall = Wall(0)
    hlc = HybridClock(wall)
    highest = -1  # highest version issued or observed
    for op, value in ops + [("next", 0)]:
        if op == "wall":
            wall.ms = value
        elif op == "observe":
            hlc.observe(value)
            highest = max(highest, value)
        else:
            v = hlc.next()
            assert v > highest
            assert v >= wall.ms << 16
            highest = v
