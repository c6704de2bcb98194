"""Filtered search through a collection on the committed WordNet sample: each planner path
(exact, selector, postfilter) returns what brute force over the matching rows returns on a
flat index, and reaches the unfiltered recall on an IVF index at the same nprobe; the
planner's choices, its plans, and writes reaching what the filters keep."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.cluster.model.documents import Hit, Incoming
from aquila.cluster.model.filters import Filter, parse_filter
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import wait_for
from tests.datasets import load_sample, recall_at_k

SHARDS = 4
PATHS = ("exact", "selector", "postfilter")
# From nothing to nearly everything; keyword, range, should and must_not; a correlated one
# (adverbs cluster in the embedding space) and one with fewer matches than k.
FILTERS: dict[str, dict[str, Any]] = {
    "none match": {"must": [{"key": "pos", "match": "no such"}]},
    "3 docs": {"must": [{"key": "r", "in": [7]}, {"key": "pos", "match": "noun"}]},
    "r<10 (1%)": {"must": [{"key": "r", "range": {"lt": 10}}]},
    "adv (3%)": {"must": [{"key": "pos", "match": "adv"}]},
    "verb|r<50": {"should": [{"key": "pos", "match": "verb"}, {"key": "r", "range": {"lt": 50}}]},
    "r<500 (50%)": {"must": [{"key": "r", "range": {"gte": 0, "lt": 500}}]},
    "noun (70%)": {"must": [{"key": "pos", "match": "noun"}]},
    "not r=3 (99.9%)": {"must_not": [{"key": "r", "match": 3}]},
}


def metadata(i: int, pos: str) -> dict[str, Any]:
    return {"pos": pos, "r": (i * 7919) % 1000}  # a numeric field spread evenly


async def load(tmp_path: Path, blocking: Blocking, itype: str, path: str | None = None,
               cache: int = 32) -> tuple[Engine, Collection]:
    smp = load_sample()
    engine = Engine(tmp_path, blocking, Tuning(filter_path=path, filter_cache=cache),
                    fsync=False)
    await engine.start()
    spec = CollectionSpec("c", smp.dim, "cosine", SHARDS, 1, IndexSpec(itype, None, 4))
    coll = await engine.ensure(spec, range(SHARDS), "u")
    by: dict[int, list[Incoming]] = {}
    for i, (v, m) in enumerate(zip(smp.base, smp.base_meta, strict=True)):
        meta = orjson.dumps(metadata(i, m["pos"]))
        by.setdefault(shard_of(str(i), SHARDS), []).append(Incoming(str(i), v, meta, 1, "n"))
    await coll.write(by)
    await wait_for(lambda: coll.state == "trained", 60, what="the index to train")
    return engine, coll


def matching(flt: Filter) -> np.ndarray:
    smp = load_sample()
    return np.array([flt(metadata(i, m["pos"])) for i, m in enumerate(smp.base_meta)])


def exact_filtered(flt: Filter, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and cosine similarities of the k best matching rows, best first."""
    smp = load_sample()
    x = smp.base / np.linalg.norm(smp.base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = np.where(matching(flt)[None, :], q @ x.T, -np.inf)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, axis=1)


def assert_brute_force(rows: list[list[Hit]], flt: Filter, queries: np.ndarray, k: int) -> None:
    """The k best matches: every hit matches with its true score, and the scores are the k
    best there are (so ties between equal scores may fall either way)."""
    smp = load_sample()
    top, best = exact_filtered(flt, queries, k)
    x = smp.base / np.linalg.norm(smp.base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for i, row in enumerate(rows):
        want = best[i][np.isfinite(best[i])]
        assert len(row) == len(want), (i, len(row), len(want))
        assert [h.score for h in row] == pytest.approx(want.tolist(), abs=1e-5)
        for h in row:
            r = int(h.id)
            assert flt(orjson.loads(h.metadata))
            assert h.score == pytest.approx(float(q[i] @ x[r]), abs=1e-5)
        assert len({h.id for h in row}) == len(row)


@pytest.mark.parametrize("path", [None, *PATHS])
async def test_every_path_equals_brute_force_on_a_flat_index(
    tmp_path: Path, blocking: Blocking, path: str | None
) -> None:
    engine, coll = await load(tmp_path, blocking, "flat", path)
    q = load_sample().queries[:24]
    for name, spec in FILTERS.items():
        flt = parse_filter(spec)
        assert flt is not None
        plans: dict[int, dict[str, Any]] = {}
        rows = await coll.search(q, 10, None, flt, plans=plans)
        # (The checks run on a thread: brute force would hold the event loop up.)
        await asyncio.to_thread(assert_brute_force, rows, flt, q, 10)
        want = "none" if not (await asyncio.to_thread(matching, flt)).any() else path
        if want is not None:
            assert {p["path"] for p in plans.values()} <= {want, "none"}, name
    # Some of the shards only (a replica answering for part of a collection).
    flt = parse_filter(FILTERS["r<500 (50%)"])
    assert flt is not None
    rows = await coll.search(q, 10, None, flt, shards=[0, 2])
    for row in rows:
        assert row and all(h.shard in (0, 2) for h in row)
    await engine.close()


@pytest.mark.parametrize("path", [None, *PATHS])
async def test_every_path_reaches_the_unfiltered_recall_on_ivf(
    tmp_path: Path, blocking: Blocking, path: str | None
) -> None:
    smp = load_sample()
    engine, coll = await load(tmp_path, blocking, "ivf_flat", path)
    assert coll.index.trained
    q = smp.queries
    rows = await coll.search(q, 10, 4, None)
    unfiltered = recall_at_k([[int(h.id) for h in r] for r in rows], smp.gt_I, 10)
    assert unfiltered < 0.99  # nprobe 4 of 283 lists: the filters' recall means something
    for name, spec in FILTERS.items():
        flt = parse_filter(spec)
        assert flt is not None
        top, best = await asyncio.to_thread(exact_filtered, flt, q, 10)
        rows = await coll.search(q, 10, 4, flt)
        found = [{int(h.id) for h in r} for r in rows]
        # Recall against the exact filtered top 10 (fewer when fewer match).
        got = sum(len(f & {int(t) for t, s in zip(tr, bs, strict=True) if np.isfinite(s)})
                  for f, tr, bs in zip(found, top, best, strict=True))
        total = int(np.isfinite(best).sum())
        recall = got / total if total else 1.0
        assert recall >= unfiltered, (name, recall, unfiltered)
        for row in rows:
            assert all(flt(orjson.loads(h.metadata)) for h in row)
    await engine.close()


async def test_the_planner_chooses_by_share_and_says_so(tmp_path: Path, blocking: Blocking) -> None:
    engine, coll = await load(tmp_path, blocking, "ivf_flat")
    q = load_sample().queries[:8]
    want = {"none match": "none", "r<10 (1%)": "exact", "r<500 (50%)": "selector",
            "not r=3 (99.9%)": "postfilter"}
    for name, path in want.items():
        flt = parse_filter(FILTERS[name])
        assert flt is not None
        first: dict[int, dict[str, Any]] = {}
        again: dict[int, dict[str, Any]] = {}
        await coll.search(q, 10, 4, flt, plans=first)
        await coll.search(q, 10, 4, flt, plans=again)
        assert sorted(first) == list(range(SHARDS))
        for s, p in first.items():
            assert p["path"] == path, (name, p)
            assert p["documents"] == coll.shards[s].count
            assert p["matches"] == int(sum(
                flt(orjson.loads(m)) for m in coll.shards[s].meta.values()))
            assert not p["cached"] and again[s]["cached"]  # evaluated once, then kept
            if path in ("selector", "postfilter"):
                assert p["nprobe"] >= 4
            if path == "postfilter":
                assert p["candidates"] >= 10
    assert coll.plan_counts["selector"] >= 2 * SHARDS * len(q)
    unfiltered: dict[int, dict[str, Any]] = {}
    await coll.search(q, 10, 4, None, plans=unfiltered)
    assert {p["path"] for p in unfiltered.values()} == {"unfiltered"}
    await engine.close()


@pytest.mark.parametrize("path", PATHS)
async def test_writes_reach_cached_filters(tmp_path: Path, blocking: Blocking, path: str) -> None:
    """A kept filter sees a matching document's new vector, a new match, a document that no
    longer matches and a deleted one."""
    smp = load_sample()
    engine, coll = await load(tmp_path, blocking, "ivf_flat", path)
    flt = parse_filter({"must": [{"key": "pos", "match": "adv"}]})
    assert flt is not None
    q = smp.queries[:1]
    rows = await coll.search(q, 5, 4, flt)
    top = [h.id for h in rows[0]]
    assert len(top) == 5

    async def write(doc_id: str, vector: np.ndarray | None, pos: str) -> None:
        meta = orjson.dumps({"pos": pos, "r": 1})
        await coll.write({shard_of(doc_id, SHARDS): [Incoming(doc_id, vector, meta, 2, "n")]})

    # The best match moves far away (same metadata): it drops out of the top.
    await write(top[0], -q[0], "adv")
    # A document that was not an adverb becomes one, right on the query.
    other = next(str(i) for i, m in enumerate(smp.base_meta) if m["pos"] == "noun")
    await write(other, q[0], "adv")
    # The second best stops matching; the third is deleted.
    await write(top[1], smp.base[int(top[1])], "noun")
    await write(top[2], None, "adv")
    rows = await coll.search(q, 5, 4, flt)
    ids = [h.id for h in rows[0]]
    assert ids[0] == other
    assert not {top[0], top[1], top[2]} & set(ids)
    assert {top[3], top[4]} <= set(ids)
    await engine.close()


async def test_concurrent_searches_with_one_filter_share_a_batch(
    tmp_path: Path, blocking: Blocking
) -> None:
    smp = load_sample()
    engine, coll = await load(tmp_path, blocking, "flat")
    flts = [parse_filter(FILTERS[n]) for n in ("adv (3%)", "r<500 (50%)")]
    q = smp.queries[:40]
    calls = []
    run = coll._run_filtered

    async def counted(key: Any, queries: np.ndarray, k: int) -> Any:
        calls.append(len(queries))
        return await run(key, queries, k)

    coll._filtered._run = counted
    rows = await asyncio.gather(*(coll.search(q[i : i + 1], 10, None, flts[i % 2])
                                  for i in range(len(q))))
    for j, flt in enumerate(flts):
        assert flt is not None
        await asyncio.to_thread(assert_brute_force, [r[0] for r in rows[j::2]], flt, q[j::2], 10)
    assert len(calls) < len(q)  # batched: fewer calls than searches
    await engine.close()


async def test_concurrent_filtered_searches_asking_for_plans_each_get_their_own(
    tmp_path: Path, blocking: Blocking
) -> None:
    """A filtered batch's plans are all of its queries' (how many lists each probed to find
    its matches): searches that ask for plans (explain, a target recall's nprobe) report
    what they report alone, run one at a time or sixteen at once; the others still batch."""
    engine, coll = await load(tmp_path, blocking, "ivf_flat")
    q = load_sample().queries[:16]
    flt = parse_filter(FILTERS["r<500 (50%)"])
    alone: list[dict[int, dict[str, Any]]] = []
    for i in range(len(q)):
        p: dict[int, dict[str, Any]] = {}
        await coll.search(q[i : i + 1], 10, 4, flt, plans=p)
        alone.append(p)
    together: list[dict[int, dict[str, Any]]] = [{} for _ in range(len(q))]
    await asyncio.gather(*(coll.search(q[i : i + 1], 10, 4, flt, plans=together[i])
                           for i in range(len(q))))

    def probes(plans: list[dict[int, dict[str, Any]]]) -> list[dict[int, tuple[Any, ...]]]:
        # ("cached": the first search alone made the match set the others found)
        return [{s: (p["path"], p["nprobe"], p["nprobe_mean"], p["matches"]) for s, p in x.items()}
                for x in plans]

    assert probes(together) == probes(alone)
    assert len({str(p) for p in probes(alone)}) > 1  # the queries' own: a shared one shows
    await engine.close()
