"""Turning a batch's index answers into hits (`node.storage.search.resolve`) reads each
document once for the whole batch and only what the answer holds: its answers must be the
ones the former per-hit resolve gave (kept below as the reference), hit for hit, for random
batches with documents found by several queries, padding, shards not held, with and without
vectors, re-scored or not, and for documents deleted or relabelled between the index's answer
and the record's read. End to end too: `Collection.search`, unfiltered and filtered, answers
the same with either."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aquila.cluster.model.documents import Hit, Incoming
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage import filtered, search
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import LABEL_BITS
from aquila.node.storage.search import Searchable, _rescored, resolve
from aquila.node.storage.store import Record, doc_key, encode_record, label_key, record_meta
from tests.conftest import wait_for

_MASK = (1 << LABEL_BITS) - 1
DIM = 8
SHARDS = 4
HELD = [0, 1, 2]  # shard 3 is not held here: its keys are left out
DOCS = 120


def reference_resolve(
    coll: Searchable, scores: np.ndarray, keys: np.ndarray, with_vectors: bool,
    rescore: tuple[np.ndarray, int] | None = None,
) -> list[list[Hit]]:
    """The resolve this one replaced (one read of label and record per hit), verbatim."""
    shards = coll.shards
    found: list[tuple[int, float, int, int]] = []  # row, score, shard, label
    for r, (srow, krow) in enumerate(zip(scores.tolist(), keys.tolist(), strict=True)):
        for score, key in zip(srow, krow, strict=True):
            if key < 0:
                break
            if key >> LABEL_BITS in shards:
                found.append((r, score, key >> LABEL_BITS, key & _MASK))
    out: list[list[Hit]] = [[] for _ in range(len(scores))]
    if not found:
        return out
    store = coll.store
    ids = store.raw_records([label_key(s, lab) for _, _, s, lab in found])
    raws = store.raw_records([doc_key(s, "") + i for (_, _, s, _), i in zip(found, ids,
                                                                          strict=True)
                              if i is not None])
    it = iter(raws)
    for (r, score, s, label), doc_id in zip(found, ids, strict=True):
        if doc_id is None:
            continue
        raw = next(it)
        if raw is None:
            continue
        own, tomb, meta = record_meta(raw)
        if tomb or own != label:
            continue
        vec = Record.decode(raw).vector if with_vectors or rescore else b""
        out[r].append(Hit(doc_id.decode(), score, meta, vec, s))
    if rescore is not None:
        out = _rescored(coll.spec.metric, out, *rescore, with_vectors)
    return out


def _vector(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


class Fixture:
    def __init__(self, loop: asyncio.AbstractEventLoop, coll: Collection) -> None:
        self.loop = loop
        self.coll = coll
        # Every live document's key, and keys that name no document (labels never given).
        self.keys = np.asarray(coll.index.all_keys(), dtype=np.int64)
        assert len(self.keys) == DOCS
        self.absent = np.asarray([(s << LABEL_BITS) | (10_000 + s) for s in range(SHARDS)])


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    yield from _opened(tmp_path_factory.mktemp("resolve"))


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Fixture]:
    yield from _opened(tmp_path)


def _opened(root: Path) -> Iterator[Fixture]:
    loop = asyncio.new_event_loop()
    blocking = Blocking(2)
    engine = Engine(root, blocking, Tuning(), fsync=False)
    spec = CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec("flat"))

    async def setup() -> Collection:
        await engine.start()
        coll = await engine.ensure(spec, HELD, "u")
        by: dict[int, list[Incoming]] = {}
        for i in range(DOCS):
            meta = orjson.dumps({"i": i, "even": i % 2 == 0, "t": f"doc {i}"})
            by.setdefault(HELD[i % len(HELD)], []).append(
                Incoming(f"d{i}", _vector(i), meta, 1, "n1"))
        await coll.write(by)
        return coll

    coll = loop.run_until_complete(setup())
    try:
        yield Fixture(loop, coll)
    finally:
        loop.run_until_complete(engine.close())
        blocking.close()
        loop.close()


@st.composite
def batches(draw: st.DrawFn, fx: Fixture) -> tuple[np.ndarray, np.ndarray]:
    """(scores, keys) as an index answers a batch: rows of live keys (often the same ones in
    several rows), keys of documents that do not exist, of a shard not held, and -1 padding
    (after which a row ends, even where a key follows)."""
    nq = draw(st.integers(0, 12))
    k = draw(st.integers(1, 10))
    pool = [*fx.keys.tolist(), *fx.absent.tolist()]
    keys = np.full((nq, k), -1, np.int64)
    for r in range(nq):
        for c in range(k):
            keys[r, c] = draw(st.one_of(st.sampled_from(pool[:15]), st.sampled_from(pool),
                                        st.just(-1)))
    scores = np.asarray(draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=nq * k,
                                      max_size=nq * k)), np.float32).reshape(nq, k)
    return scores, keys


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(data=st.data(), with_vectors=st.booleans(), rescore=st.booleans())
def test_resolve_answers_as_the_per_hit_resolve(fixture: Fixture, data: st.DataObject,
                                                with_vectors: bool, rescore: bool) -> None:
    scores, keys = data.draw(batches(fixture))
    again: tuple[np.ndarray, int] | None = None
    if rescore:
        again = (np.random.default_rng(len(keys)).standard_normal((len(keys), DIM))
                 .astype(np.float32), data.draw(st.integers(1, 5)))
    got = resolve(fixture.coll, scores, keys, with_vectors, again)
    want = reference_resolve(fixture.coll, scores, keys, with_vectors, again)
    assert got == want


def test_documents_deleted_or_relabelled_after_the_index_answered(fresh: Fixture) -> None:
    """The index still holds them (it catches up right after a write): the record's read is
    what leaves them out, in both."""
    coll = fresh.coll
    q = np.stack([_vector(i) for i in range(0, 30, 3)])
    scores, keys = coll.index.search(q, 20, 1)
    before = resolve(coll, scores, keys, False)
    gone = sorted({h.id for row in before for h in row[:3]})
    store = coll.store
    # Tombstones written straight into the store: the index and bitmaps are not told.
    for doc_id in gone[: len(gone) // 2]:
        s = next(h.shard for row in before for h in row if h.id == doc_id)
        rec = store.get_records(s, [doc_id])[0]
        assert rec is not None
        store.db.put(doc_key(s, doc_id), encode_record(rec.version + 1, rec.label, rec.seq,
                                                       True, b"n1", b"", b""))
    # A record whose label is now another one (as after a purge and a new write).
    for doc_id in gone[len(gone) // 2 :]:
        s = next(h.shard for row in before for h in row if h.id == doc_id)
        rec = store.get_records(s, [doc_id])[0]
        assert rec is not None
        store.db.put(doc_key(s, doc_id), encode_record(
            rec.version, rec.label + 50_000, rec.seq, False, rec.writer.encode(), rec.vector,
            rec.metadata))
    for with_vectors in (False, True):
        got = resolve(coll, scores, keys, with_vectors)
        assert got == reference_resolve(coll, scores, keys, with_vectors)
        assert not {h.id for row in got for h in row} & set(gone)
        assert sum(map(len, got)) < sum(map(len, before))


async def _searched(coll: Collection, q: np.ndarray, flt: Any, with_vectors: bool
                    ) -> list[list[Hit]]:
    return await coll.search(q, 7, None, parse_filter(flt), None, with_vectors)


@pytest.fixture
async def trained(tmp_path: Path) -> AsyncIterator[Collection]:
    """An ivf_sq8 collection, trained: its candidates are re-scored with stored vectors."""
    blocking = Blocking(2)
    engine = Engine(tmp_path, blocking, Tuning(train_min=256), fsync=False)
    await engine.start()
    coll = await engine.ensure(
        CollectionSpec("t", DIM, "cosine", 2, 1, IndexSpec("ivf_sq8")), [0, 1], "u")
    await coll.write({s: [Incoming(f"d{i}", _vector(i), orjson.dumps({"i": i, "m": i % 3}),
                                   1, "n1") for i in range(s, 800, 2)] for s in (0, 1)})
    await wait_for(lambda: coll.state == "trained" and not coll.training, 60,
                   what="the index to train")
    try:
        yield coll
    finally:
        await engine.close()
        blocking.close()


@pytest.mark.parametrize("flt", [None, {"must": [{"key": "m", "match": 1}]},
                                 {"must_not": [{"key": "m", "match": 0}]}])
async def test_collection_search_answers_the_same_with_either_resolve(
    trained: Collection, monkeypatch: pytest.MonkeyPatch, flt: Any
) -> None:
    """Batches whose queries repeat (their hits are the same documents), with and without
    vectors and filters, re-scored (ivf_sq8): the same hits in the same order."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((40, DIM)).astype(np.float32)
    q[20:] = q[:20]  # every document found twice in the batch
    answers = {}
    for name, fn in (("new", resolve), ("old", reference_resolve)):
        monkeypatch.setattr(search, "resolve", fn)
        monkeypatch.setattr(filtered, "resolve", fn)
        answers[name] = [await _searched(trained, q, flt, v) for v in (False, True)]
    assert answers["new"] == answers["old"]
    assert all(answers["new"][0])  # every query found something
