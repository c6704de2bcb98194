"""Random filters under random writes give the same answers with and without the per-filter
caches (the shards' match sets and the collection's selectors, gathered vectors and list
counts), on a flat index (where both also equal brute force) and on a trained IVF index; the
counts and scrolls that read the same match sets equal the model's."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.filters import Filter, parse_filter
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.filtered import GroupCache
from tests.conftest import wait_for
from tests.test_payload_index import docs, filters

DIM, SHARDS, POOL = 8, 3, 60
ops = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"),
                  st.lists(st.tuples(st.integers(0, POOL - 1), st.integers(0, 2**16), docs()),
                           min_size=1, max_size=12)),
        st.tuples(st.just("delete"), st.lists(st.integers(0, POOL - 1), min_size=1, max_size=6)),
        st.tuples(st.just("search"), st.integers(0, 3)),
    ),
    min_size=1, max_size=12,
)


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


async def open_collection(root: Path, blocking: Blocking, itype: str, path: str | None,
                          cached: bool) -> tuple[Engine, Collection]:
    # IVF trains once, on the initial documents, and never again (both copies alike).
    tuning = Tuning(train_min=64, retrain_growth=1e9, filter_path=path,
                    filter_cache=32 if cached else 0)
    engine = Engine(root, blocking, tuning, fsync=False)
    await engine.start()
    coll = await engine.ensure(CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec(itype, None, 2)),
                               range(SHARDS), "u")
    if not cached:
        coll.groups = GroupCache(capacity=0)
    return engine, coll


async def scenario(itype: str, path: str | None, initial: list[dict[str, Any]],
                   specs: list[dict[str, Any]], steps: list[tuple[str, Any]]) -> None:
    flts: list[Filter] = [f for f in (parse_filter(s) for s in specs) if f is not None] or [
        Filter((), (), ())]
    queries = np.stack([vector(10**6 + i) for i in range(4)])
    model: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    version = 1
    blocking = Blocking(2)
    with tempfile.TemporaryDirectory() as tmp:
        a = await open_collection(Path(tmp) / "a", blocking, itype, path, cached=True)
        b = await open_collection(Path(tmp) / "b", blocking, itype, path, cached=False)
        try:
            async def write(docs_: list[tuple[str, np.ndarray | None, dict[str, Any]]]) -> None:
                nonlocal version
                by: dict[int, list[Incoming]] = {}
                for doc_id, vec, meta in docs_:
                    version += 1  # the later of two writes of an id in a batch wins
                    by.setdefault(shard_of(doc_id, SHARDS), []).append(
                        Incoming(doc_id, vec, orjson.dumps(meta), version, "n"))
                    if vec is None:
                        model.pop(doc_id, None)
                    else:
                        model[doc_id] = (vec, meta)
                for _, coll in (a, b):
                    await coll.write(by)

            async def compare() -> None:
                for flt in flts:
                    ra = await a[1].search(queries, 5, None, flt)
                    rb = await b[1].search(queries, 5, None, flt)
                    assert [[(h.id, h.score) for h in r] for r in ra] == \
                        [[(h.id, h.score) for h in r] for r in rb]
                    if itype == "flat":
                        want = brute_force(model, flt, queries, 5)
                        got = [[h.score for h in r] for r in ra]
                        for g, w in zip(got, want, strict=True):
                            assert np.allclose(g, w, atol=1e-4)
                    # Counts and scrolls read the same match sets: equal to the model's
                    # with the cache (kept current by the writes so far) and without.
                    admitted = sorted(i for i, (_, m) in model.items() if flt(m))
                    for _, coll in (a, b):
                        counts = await coll.count_matching(list(range(SHARDS)), flt)
                        assert sum(counts.values()) == len(admitted)
                        pages = [await coll.scroll(s, None, 10_000, flt, False)
                                 for s in range(SHARDS)]
                        assert all(after is None for _, after in pages)
                        assert sorted(h.id for hits, _ in pages for h in hits) == admitted

            await write([(f"i{i}", vector(i), m) for i, m in enumerate(initial)])
            if itype != "flat":
                await wait_for(lambda: a[1].index.trained and b[1].index.trained, 30,
                               what="both indexes to train")
            await compare()  # fills the caches of `a`
            for kind, arg in steps:
                if kind == "upsert":
                    await write([(f"d{i}", vector(seed), meta) for i, seed, meta in arg])
                elif kind == "delete":
                    await write([(f"d{i}", None, {}) for i in arg])
                else:
                    await compare()
            await compare()
        finally:
            for engine, _ in (a, b):
                await engine.close()
    blocking.close()


def brute_force(model: dict[str, tuple[np.ndarray, dict[str, Any]]], flt: Filter,
                queries: np.ndarray, k: int) -> list[list[float]]:
    rows = [v for v, m in model.values() if flt(m)]
    if not rows:
        return [[] for _ in queries]
    x = np.stack(rows).astype(np.float64)
    d = ((queries.astype(np.float64)[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return [sorted(r.tolist())[:k] for r in d]


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.sampled_from([None, "exact", "selector", "postfilter"]),
       st.lists(docs(), min_size=0, max_size=40), st.lists(filters, min_size=1, max_size=3),
       ops)
def test_same_answers_with_and_without_the_cache_flat(
    path: str | None, initial: list[dict[str, Any]], specs: list[dict[str, Any]],
    steps: list[tuple[str, Any]],
) -> None:
    asyncio.run(scenario("flat", path, initial, specs, steps))


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(st.sampled_from([None, "exact", "selector", "postfilter"]),
       st.lists(docs(), min_size=200, max_size=200), st.lists(filters, min_size=1, max_size=3),
       ops)
def test_same_answers_with_and_without_the_cache_ivf(
    path: str | None, initial: list[dict[str, Any]], specs: list[dict[str, Any]],
    steps: list[tuple[str, Any]],
) -> None:
    asyncio.run(scenario("ivf_flat", path, initial, specs, steps))
