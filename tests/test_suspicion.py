"""Suspicion timeout math and Lifeguard awareness (memberlist suspicion_test.go, util_test.go)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aquila.cluster.membership.suspicion import (
    Awareness,
    Suspicion,
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    suspicion_timeout,
)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 1.0), (5, 1.0), (10, 1.0), (50, 1.699), (100, 2.0), (500, 2.699), (1000, 3.0)],
)
def test_suspicion_timeout_scales_with_log10_n(n: int, expected: float) -> None:
    assert suspicion_timeout(3, n, 1.0) / 3 == pytest.approx(expected, abs=1e-3)


def test_default_lan_suspicion_timeout() -> None:
    # mult 4, 1 s probe interval, 50 nodes: 4 × log10(50) ≈ 6.8 s.
    assert suspicion_timeout(4, 50, 1.0) == pytest.approx(6.796, abs=1e-3)


@pytest.mark.parametrize(
    ("n", "k", "elapsed", "expected"),
    [
        (0, 3, 0.0, 30.0),  # no confirmations: the max
        (1, 3, 2.0, 14.0),  # log(2)/log(4) = 1/2 of the way down, minus elapsed
        (2, 3, 3.0, 4.81),
        (3, 3, 4.0, -2.0),  # all k confirmations: the min
        (4, 3, 5.0, -3.0),  # more than k never goes below the min
        (5, 3, 10.0, -8.0),
        (0, 0, 1.0, 1.0),  # k = 0: nobody to confirm, min from the start
    ],
)
def test_remaining_suspicion_time(n: int, k: int, elapsed: float, expected: float) -> None:
    assert remaining_suspicion_time(n, k, elapsed, 2.0, 30.0) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("n", "expected"), [(0, 0), (1, 3), (9, 3), (10, 6), (99, 6), (100, 9)])
def test_retransmit_limit(n: int, expected: int) -> None:
    assert retransmit_limit(3, n) == expected


@pytest.mark.parametrize(("n", "mult"), [(1, 1), (32, 1), (33, 2), (64, 2), (65, 3), (128, 3)])
def test_push_pull_scale(n: int, mult: int) -> None:
    assert push_pull_scale(30.0, n) == 30.0 * mult


@given(
    k=st.integers(1, 10),
    lo=st.floats(0.1, 100),
    span=st.floats(0, 100),
    n=st.integers(0, 20),
)
def test_remaining_time_is_bounded_and_monotone(k: int, lo: float, span: float, n: int) -> None:
    hi = lo + span
    t = remaining_suspicion_time(n, k, 0.0, lo, hi)
    assert lo - 1e-9 <= t <= hi + 1e-9
    # More confirmations never lengthen the timeout.
    assert remaining_suspicion_time(n + 1, k, 0.0, lo, hi) <= t + 1e-9
    if n >= k:
        assert t == pytest.approx(lo)


def test_suspicion_counts_distinct_confirmers_only() -> None:
    s = Suspicion(start=10.0, k=2, lo=2.0, hi=30.0, first_from="accuser")
    assert s.deadline() == pytest.approx(40.0)
    assert not s.confirm("accuser")  # the originator never counts
    assert s.confirm("a")
    assert not s.confirm("a")  # the same node twice is not independent
    after_one = s.deadline()
    assert 12.0 < after_one < 40.0
    assert s.confirm("b")
    assert s.deadline() == pytest.approx(12.0)
    assert not s.confirm("c")  # k reached: nothing more to learn
    assert s.num_confirmations == 2


@given(st.lists(st.integers(-3, 3), max_size=50))
def test_awareness_stays_in_range(deltas: list[int]) -> None:
    a = Awareness(8)
    for d in deltas:
        a.apply_delta(d)
        assert 0 <= a.score <= 7
        assert a.scale(1.0) == a.score + 1


def test_awareness_scales_timeouts() -> None:
    a = Awareness(8)
    assert a.scale(0.5) == 0.5
    a.apply_delta(100)
    assert a.scale(0.5) == 4.0
    a.apply_delta(-1)
    assert math.isclose(a.scale(1.0), 7.0)
