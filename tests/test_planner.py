"""The filtered-search planner (pure): which path a shard takes by how many of its documents
match, and how far a query's probed lists are widened."""

from __future__ import annotations

import numpy as np
import pytest

from aquila.node.storage.planner import (
    EXACT,
    EXACT_MAX_BYTES,
    NONE,
    POSTFILTER,
    SELECTOR,
    IndexShape,
    choose,
    costs,
    probes,
)

# The WordNet benchmark's shape: 107,659 documents in 8 shards, nlist about 4·√n.
IVF = IndexShape(ivf=True, nlist=1312, ntotal=107_659, nprobe=64, dim=384)
SHARD = 107_659 // 8


@pytest.mark.parametrize(
    ("share", "path"),
    [(0.0, NONE), (0.001, EXACT), (0.01, EXACT), (0.05, EXACT), (0.3, SELECTOR),
     (0.5, SELECTOR), (0.9, SELECTOR), (0.999, POSTFILTER)],
)
def test_paths_by_share_of_matches(share: float, path: str) -> None:
    assert choose(round(share * SHARD), SHARD, IVF) == path


def test_every_path_is_costed_where_it_is_allowed() -> None:
    few = costs(10, SHARD, IVF)
    assert set(few) == {EXACT, SELECTOR}  # post-filtering a 0.1 % filter is not an option
    assert few[EXACT] < few[SELECTOR]
    nearly_all = costs(SHARD - 5, SHARD, IVF)
    assert set(nearly_all) == {SELECTOR, POSTFILTER}  # too many vectors to gather
    assert nearly_all[POSTFILTER] < nearly_all[SELECTOR]


def test_gathering_is_bounded_in_memory() -> None:
    flat = IndexShape(ivf=False, nlist=1, ntotal=10**6, nprobe=1, dim=384)
    most = EXACT_MAX_BYTES // (384 * 4)
    # A flat index scores every document unfiltered: gathering the matches is always cheaper,
    # while their vectors fit the bound.
    assert choose(most, 10**6, flat) == EXACT
    assert choose(most + 1, 10**6, flat) == SELECTOR


def test_probes_widen_until_the_lists_hold_the_target() -> None:
    sizes = np.full(10, 100)
    matches = np.array([0, 0, 50, 50, 100, 0, 0, 0, 0, 100])
    lists = np.array([np.arange(10), np.arange(10)[::-1]])
    # nprobe 2: unfiltered scores 200 vectors; the filtered search probes lists until they
    # hold 200 matches. Row 0: 0, 0, 50, 100, 200 → 5 lists; row 1: 100, 100, ... → 6 lists.
    need, short = probes(lists, matches, sizes, nprobe=2, share=1.0)
    assert need.tolist() == [5, 6]
    assert short.tolist() == [False, False]
    # Never fewer than nprobe, even when the first list holds enough.
    need, _ = probes(lists[1:], np.full(10, 500), sizes, nprobe=3, share=1.0)
    assert need.tolist() == [3]
    # Lists that never hold enough: every list given, and the row says it fell short.
    need, short = probes(lists[:, :4], matches, sizes, nprobe=2, share=1.0)
    assert need.tolist() == [4, 4] and short.tolist() == [True, True]
    # The target is the wanted shards' part of the lists (`share`).
    need, _ = probes(lists[:1], matches, sizes, nprobe=2, share=0.5)
    assert need.tolist() == [4]
