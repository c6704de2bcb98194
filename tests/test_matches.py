"""A shard's cached match sets (bitmaps over labels) stay in step with writes and deletes:
after any sequence of them, every cached set is what the payload index (and evaluating the
filter on each document) gives afresh, or it was dropped."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.filters import parse_filter
from aquila.node.storage import matches
from aquila.node.storage.matches import MatchSet, ShardFilters, bits_labels, bits_test, canonical
from aquila.node.storage.payload_index import PayloadIndex
from tests.test_payload_index import docs, filters


def test_bitmap_helpers() -> None:
    mask = np.zeros(21, dtype=bool)
    mask[[0, 3, 8, 20]] = True
    ms = MatchSet.of_mask(mask)
    assert ms.count == 4 and bits_labels(ms.bits).tolist() == [0, 3, 8, 20]
    assert bits_test(ms.bits, np.array([0, 1, 20, 23, 10_000, -1])).tolist() == \
        [True, False, True, False, False, False]


def test_canonical_keys_keep_types_apart_and_ignore_order() -> None:
    def key(spec: dict[str, Any]) -> str:
        flt = parse_filter(spec)
        assert flt is not None
        return canonical(flt)

    a, b = {"key": "a", "match": 1}, {"key": "b", "in": ["x"]}
    assert key({"must": [a, b]}) == key({"must": [b, a]})
    # 1 == True == 1.0 in Python; a filter tells 1 and True apart, and "1" from both.
    assert len({key({"must": [{"key": "a", "match": v}]}) for v in (1, True, "1")}) == 3
    assert key({"must": [a]}) != key({"should": [a]}) != key({"must_not": [a]})


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(st.integers(1, 40), docs(), max_size=30),
       st.lists(filters, min_size=1, max_size=4),
       st.lists(st.lists(st.tuples(st.integers(1, 45), st.one_of(st.none(), docs())),
                         max_size=8), max_size=6),
       st.booleans())
def test_cached_match_sets_follow_writes(
    initial: dict[int, dict[str, Any]], specs: list[dict[str, Any]],
    batches: list[list[tuple[int, dict[str, Any] | None]]], small_budget: bool,
) -> None:
    flts = [f for f in (parse_filter(s) for s in specs) if f is not None]
    meta = {label: orjson.dumps(doc) for label, doc in initial.items()}
    index = PayloadIndex()
    cache = ShardFilters()
    size = 46

    def fresh(flt: Any) -> set[int]:
        return {label for label, raw in meta.items() if flt(orjson.loads(raw))}

    for flt in flts:
        ms, _ = cache.get(flt, canonical(flt), lambda f=flt: index.mask(f, meta, size))
        assert set(ms.labels().tolist()) == fresh(flt)
    budget = matches.UPDATE_BUDGET
    matches.UPDATE_BUDGET = 6 if small_budget else budget  # also drop sets, not only update
    try:
        for batch in batches:
            # As a shard applies a batch: the last write of a label wins; deletes, then writes.
            final = dict(batch)
            gone = [lab for lab, doc in final.items() if doc is None and lab in meta]
            added = [lab for lab, doc in final.items() if doc is not None]
            for lab in gone:
                index.update(lab, meta.pop(lab), None)
            for lab in added:
                new = orjson.dumps(final[lab])
                index.update(lab, meta.get(lab), new)
                meta[lab] = new
            before = {key: (ms.stamp, set(ms.labels().tolist()))
                      for key, (_, ms) in cache._entries.items()}
            docs_added = [final[lab] for lab in added]
            cache.written(gone, added, lambda d=docs_added: d)
            for flt in flts:
                key = canonical(flt)
                entry = cache._entries.get(key)
                if entry is not None and key in before:
                    # The stamp moves when a document that matched before or matches now
                    # was touched (what is derived from the set is rebuilt then), and only
                    # then.
                    stamp, was = before[key]
                    touched = any(lab in was or lab in fresh(flt) for lab in gone + added)
                    assert (entry[1].stamp != stamp) == touched
                ms, _ = cache.get(flt, key, lambda f=flt: index.mask(f, meta, size))
                assert set(ms.labels().tolist()) == fresh(flt) == index.evaluate(flt, meta)
                assert ms.count == len(fresh(flt))
    finally:
        matches.UPDATE_BUDGET = budget


def test_a_capacity_of_zero_caches_nothing() -> None:
    flt = parse_filter({"must": [{"key": "a", "match": 1}]})
    assert flt is not None
    cache = ShardFilters(0)
    calls = []

    def evaluate() -> np.ndarray:
        calls.append(1)
        return np.array([False, True])

    for _ in range(3):
        ms, cached = cache.get(flt, canonical(flt), evaluate)
        assert not cached and ms.labels().tolist() == [1]
    assert len(calls) == 3 and len(cache) == 0


def test_the_cache_keeps_the_most_recent_filters() -> None:
    cache = ShardFilters(2)
    flts = [parse_filter({"must": [{"key": "a", "match": i}]}) for i in range(3)]
    for f in flts:
        assert f is not None
        cache.get(f, canonical(f), lambda: np.zeros(4, dtype=bool))
    assert len(cache) == 2
    f0 = flts[0]
    assert f0 is not None
    _, cached = cache.get(f0, canonical(f0), lambda: np.zeros(4, dtype=bool))
    assert not cached  # the oldest went first
