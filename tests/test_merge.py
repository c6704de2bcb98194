"""Top-k merge of ranked lists: table cases and a property against sort-everything."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.merge import merge_topk

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)

Ranked = list[tuple[float, str]]


def reference(lists: list[Ranked], k: int, larger_is_better: bool) -> Ranked:
    """Sort everything (best first; ties by list, then position) and keep k."""
    flat = [
        (-score if larger_is_better else score, li, pos, (score, label))
        for li, lst in enumerate(lists)
        for pos, (score, label) in enumerate(lst)
    ]
    flat.sort(key=lambda t: t[:3])
    return [item for *_, item in flat[: max(k, 0)]]


def ranked(scores: list[float], larger_is_better: bool, tag: str) -> Ranked:
    """A list sorted best first; each item labelled with where it came from."""
    ordered = sorted(scores, reverse=larger_is_better)
    return [(s, f"{tag}:{i}") for i, s in enumerate(ordered)]


@pytest.mark.parametrize(
    ("lists", "k", "larger", "expected"),
    [
        ([[(1.0, "a"), (3.0, "b")], [(2.0, "c")]], 2, False, [(1.0, "a"), (2.0, "c")]),
        ([[(3.0, "a"), (1.0, "b")], [(2.0, "c")]], 2, True, [(3.0, "a"), (2.0, "c")]),
        # Ties: earlier list first, then position within a list.
        ([[(1.0, "x")], [(1.0, "y"), (1.0, "z")], [(1.0, "w")]], 3, False,
         [(1.0, "x"), (1.0, "y"), (1.0, "z")]),
        ([[(5.0, "a")], [(5.0, "b")]], 2, True, [(5.0, "a"), (5.0, "b")]),
        # k above the total: everything, merged.
        ([[(0.5, "a")], [], [(0.1, "b"), (0.9, "c")]], 10, False,
         [(0.1, "b"), (0.5, "a"), (0.9, "c")]),
        ([], 5, True, []),
        ([[], []], 5, False, []),
        ([[(1.0, "a")]], 0, False, []),
        ([[(1.0, "a")]], -3, True, []),
        # -0.0 and 0.0 tie: list order decides.
        ([[(0.0, "pos")], [(-0.0, "neg")]], 2, False, [(0.0, "pos"), (-0.0, "neg")]),
        ([[(float("inf"), "i")], [(1.0, "a")]], 1, True, [(float("inf"), "i")]),
    ],
)
def test_merge_topk_table(lists: list[Ranked], k: int, larger: bool, expected: Ranked) -> None:
    out = merge_topk(lists, k, larger_is_better=larger)
    assert out == expected
    assert [label for _, label in out] == [label for _, label in expected]


def test_accepts_a_one_shot_iterable() -> None:
    gen = (lst for lst in [[(2.0, "a")], [(1.0, "b")]])
    assert merge_topk(gen, 5, larger_is_better=False) == [(1.0, "b"), (2.0, "a")]


def test_does_not_modify_its_inputs() -> None:
    lists = [[(1.0, "a"), (2.0, "b")], [(1.5, "c")]]
    snapshot = [list(lst) for lst in lists]
    merge_topk(lists, 2, larger_is_better=False)
    assert lists == snapshot


# Few distinct values so ties are common; plus arbitrary floats for range.
scores = st.one_of(
    st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]),
    st.floats(allow_nan=False, allow_infinity=True),
)


@PROPERTY
@given(
    st.lists(st.lists(scores, max_size=8), max_size=6),
    st.integers(-2, 40),
    st.booleans(),
)
def test_merge_topk_equals_sort_all(
    raw: list[list[float]], k: int, larger_is_better: bool
) -> None:
    lists = [ranked(s, larger_is_better, f"l{i}") for i, s in enumerate(raw)]
    out = merge_topk(lists, k, larger_is_better=larger_is_better)
    expected = reference(lists, k, larger_is_better)
    # Compare labels too: equal scores must come from the same list and position.
    assert [label for _, label in out] == [label for _, label in expected]
    assert out == expected
    assert len(out) == min(max(k, 0), sum(map(len, lists)))
