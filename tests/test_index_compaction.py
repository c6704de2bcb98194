"""A trained index's lists compacted once writes pause (`Collection._compact`): adds grew each
list by doubling, and a bulk load that ends long after its last training left that slack in
memory (1.6× the raw vectors for `ivf_flat` at 1M against 1.4× restarted).

- The copy (`VectorIndex.compact_copy`) holds the same entries as the index, in the same
  lists, and is independent of it, for every IVF type.
- A compaction waits for writes to pause, starts then, runs once, and starts again only after
  as many vectors more were added; it shows on /metrics.
- Writes, overwrites and deletes made while it runs (between its copy and its swap, a
  snapshot and a release of labels among them, and others racing the swap) are seen by
  searches meanwhile and are all in the index it swaps in: the index holds exactly the live
  stored vectors, and a restart finds the same.
- A close during its copy waits for it and leaves the index whole.
- Writes that resumed while it ran drop its copy (not swapped in); the next pause compacts.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.metrics import Metrics
from aquila.node.storage import collection as collection_module
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex, global_key, prepare
from tests.conftest import settled, wait_for

DIM = 8
SPEC = CollectionSpec("k", DIM, "l2", 2, 1, IndexSpec("ivf_flat", nlist=4))
# Writes "pause" only when a test says so (`pause`): no compaction starts on its own.
TUNING = Tuning(train_min=100, retrain_growth=10, retrain_quiet_s=3600, compact_min=10,
                compact_quiet_s=3600)


def vec(i: int, version: int = 1) -> np.ndarray:
    return np.random.default_rng(i * 7919 + version).standard_normal(DIM).astype(np.float32)


def docs(ids: range | list[int], version: int = 1) -> dict[int, list[Incoming]]:
    """Documents d<i>, even ids on shard 0, odd on shard 1."""
    out: dict[int, list[Incoming]] = {0: [], 1: []}
    for i in ids:
        out[i % 2].append(Incoming(f"d{i}", vec(i, version), b"{}", version, "n1"))
    return {s: ds for s, ds in out.items() if ds}


def deletes(ids: range | list[int], version: int) -> dict[int, list[Incoming]]:
    out: dict[int, list[Incoming]] = {0: [], 1: []}
    for i in ids:
        out[i % 2].append(Incoming(f"d{i}", None, b"", version, "n1"))
    return {s: ds for s, ds in out.items() if ds}


def pause(coll: Collection) -> None:
    """As if the last write were an hour old: what the deferred look finds then."""
    coll._last_write -= 7200
    if coll._recheck is not None:
        coll._recheck.cancel()
    coll._look_again()


def stored(coll: Collection) -> tuple[np.ndarray, np.ndarray]:
    """The global keys and vectors of every live stored document (sorted by key)."""
    keys, vectors = [], []
    for s in sorted(coll.shards):
        for _, rec in coll.store.iter_docs(s):
            if not rec.tombstone:
                keys.append(global_key(s, rec.label))
                vectors.append(rec.vector_array())
    order = np.argsort(keys)
    return np.asarray(keys, np.int64)[order], np.stack(vectors)[order]


def holds_exactly_the_stored(coll: Collection) -> None:
    """The index holds exactly the live stored documents, each under its own label with its
    stored vector (call on a thread, with no write running)."""
    keys, vectors = stored(coll)
    held = np.sort(coll.index.all_keys())
    assert held.tolist() == keys.tolist()
    assert coll.index.ntotal == coll.count() == len(keys)
    np.testing.assert_array_equal(coll.index.vectors_of(keys), prepare(vectors, SPEC.metric))


async def loaded(engine: Engine, n: int, more: int) -> Collection:
    """The collection trained on `n` documents, then `more` written (no retraining due)."""
    coll = await engine.ensure(SPEC, [0, 1], "u")
    await coll.write(docs(range(n)))
    await settled(coll, what="the first training")
    await coll.write(docs(range(n, n + more)))
    assert not coll.wants_training()
    return coll


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_sq8", "ivf_pq"])
def test_the_copy_holds_what_the_index_does_and_is_its_own(kind: str) -> None:
    spec = CollectionSpec("c", 16, "l2", 2, 1, IndexSpec(kind, nlist=8))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    keys = np.concatenate([global_key(0, 1) + np.arange(1500),
                           global_key(1, 1) + np.arange(1500)]).astype(np.int64)
    index = VectorIndex.new_ivf(spec, 8, len(x))
    index.index.train(x)
    for at in range(0, len(x), 100):  # in chunks, as writes add: every list grew by doubling
        index.add(x[at:at + 100], keys[at:at + 100])
    index.calibrate(x, keys, "l2", queries=50)
    index.lists_of(0)
    assert index.added == len(x)
    copy = index.compact_copy()
    assert copy.added == 0 and copy.index is not index.index
    assert copy.curve == index.curve and copy.trained_at == index.trained_at
    assert np.sort(copy.all_keys()).tolist() == np.sort(keys).tolist()
    for s in (0, 1):
        np.testing.assert_array_equal(copy.lists_of(s), index.lists_of(s))
    np.testing.assert_array_equal(copy.vectors_of(keys), index.vectors_of(keys))
    q = rng.standard_normal((20, 16)).astype(np.float32)
    for a, b in zip(copy.search(q, 10, 3), index.search(q, 10, 3), strict=True):
        np.testing.assert_array_equal(a, b)
    # Changes to the copy leave the index as it was.
    before, lists = index.vectors_of(keys), index.lists_of(0).copy()
    copy.remove(keys[:500])
    copy.add(x[:10] + 1, keys[:10])
    assert copy.ntotal == 2510 and index.ntotal == 3000
    assert np.sort(index.all_keys()).tolist() == np.sort(keys).tolist()
    np.testing.assert_array_equal(index.vectors_of(keys), before)
    np.testing.assert_array_equal(index.lists_of(0), lists)



async def reopened_holds_exactly_the_stored(tmp_path: Path, blocking: Blocking) -> None:
    """A node started again on the data holds in its index exactly the stored vectors."""
    again = Engine(tmp_path, blocking, TUNING, fsync=False)
    await again.start()
    try:
        await blocking.write(holds_exactly_the_stored, again.get("k"))
    finally:
        await again.close()

async def test_a_compaction_waits_for_writes_to_pause_and_runs_once(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0, 1], "u")
        await coll.write(docs(range(200)))
        await settled(coll, what="the first training")
        assert coll.index.added == 0  # the training's index is compacted already
        # Below a quarter of the index added: nothing due, nothing waiting.
        await coll.write(docs(range(200, 240)))
        assert coll.index.added == 40 and not coll._compaction_due()
        assert coll._recheck is None and not coll.compacting
        # Past it, writes not paused: a look is set for when they may have, no compaction.
        await coll.write(docs(range(240, 300)))
        assert coll._compaction_due() and coll._recheck is not None
        assert not coll.compacting and coll.compactions == 0
        first = weakref.ref(coll.index)
        pause(coll)
        assert coll.compacting
        await wait_for(lambda: coll.compactions == 1 and not coll.compacting, 30,
                       what="the compaction")
        assert first() is None, "the replaced index outlived the swap"
        # Once: nothing due after it, and no look set (its end looked again).
        assert coll.index.added == 0 and not coll._compaction_due()
        assert coll._recheck is None
        await blocking.write(holds_exactly_the_stored, coll)
        # A few more added, a pause: still nothing due.
        await coll.write(docs(range(300, 320)))
        pause(coll)
        assert not coll.compacting and coll.compactions == 1
        # As many again as a quarter of the index: the next one.
        await coll.write(docs(range(320, 420)))
        pause(coll)
        await wait_for(lambda: coll.compactions == 2 and not coll.compacting, 30,
                       what="the second compaction")
        await blocking.write(holds_exactly_the_stored, coll)
        metrics = Metrics()
        metrics.watch_storage(lambda: {"k": coll.figures()})
        text = metrics.render()[0].decode()
        assert 'aquila_index_compactions_total{collection="k"} 2.0' in text
        assert 'aquila_index_added_since_compaction{collection="k"} 0.0' in text
    finally:
        await engine.close()


async def test_writes_racing_a_compaction_are_in_the_index_it_swaps_in(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied, go_on = threading.Event(), threading.Event()
    caught_up, swap = threading.Event(), threading.Event()
    real = Collection._catch_up_sync

    def held(self: Collection, new: VectorIndex, upto: dict[int, int],
             *more: Any) -> dict[int, int] | None:
        """The compaction's catch-up (its copy made, no lock held) held until the test has
        written, and again once it has replayed, before the swap."""
        first = self.compacting and not copied.is_set()
        if first:
            copied.set()
            go_on.wait(10)
        out = real(self, new, upto, *more)
        if first:
            caught_up.set()
            swap.wait(10)
        return out

    monkeypatch.setattr(Collection, "_catch_up_sync", held)
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    try:
        coll = await loaded(engine, 200, 150)
        await coll.snapshot()
        shards = coll.shards
        free = {s: len(sh.free) for s, sh in shards.items()}
        pause(coll)
        try:
            await wait_for(copied.is_set, 30, what="the compaction's copy")
            # Overwrites, new documents, deletes, while the copy waits to catch up.
            await coll.write(docs(range(0, 40), version=2))
            await coll.write(docs(range(350, 380)))
            await coll.write(deletes(range(100, 130), version=2))
            # Searches see each of them (four lists, all probed: exact).
            q = np.stack([vec(i, 2) for i in range(0, 40)] + [vec(i) for i in range(350, 380)])
            rows = await coll.search(q, 1, 4)
            assert [r[0].id for r in rows] == [f"d{i}" for i in [*range(0, 40), *range(350, 380)]]
            rows = await coll.search(np.stack([vec(i) for i in range(100, 130)]), 1, 4)
            assert not {r[0].id for r in rows} & {f"d{i}" for i in range(100, 130)}
            # A snapshot covers the deletes: their labels stay taken while the copy has
            # still to replay them (given again now, the copy would keep the deleted vectors
            # of those not taken again).
            await coll.snapshot()
            assert {s: len(sh.free) for s, sh in shards.items()} == free
            await coll.write(docs(range(380, 385)))
        finally:
            go_on.set()
        # Caught up, before the swap: what comes now only the swap's replay brings.
        await wait_for(caught_up.is_set, 30, what="the catch-up")
        try:
            await coll.write(docs(range(60, 70), version=4))
            await coll.write(deletes(range(140, 150), version=2))
            await coll.write(docs(range(400, 410)))
        finally:
            swap.set()
        # More writes and deletes racing the swap.
        await asyncio.gather(
            coll.write(docs(range(385, 400))), coll.write(deletes(range(130, 140), version=2)),
            coll.write(docs(range(40, 60), version=3)),
            wait_for(lambda: coll.compactions == 1 and not coll.compacting, 30,
                     what="the compaction"))
        await wait_for(lambda: not coll.compacting, 30, what="the compaction's end")
        assert coll.compactions == 1
        await blocking.write(holds_exactly_the_stored, coll)
        q = np.stack([vec(i, 3) for i in range(40, 60)])
        assert [r[0].id for r in await coll.search(q, 1, 4)] == [f"d{i}" for i in range(40, 60)]
        # The labels of the deletes are released by the next snapshot.
        await coll.snapshot()
        assert sum(len(sh.free) for sh in shards.values()) >= sum(free.values()) + 45
        await blocking.write(holds_exactly_the_stored, coll)
    finally:
        go_on.set()
        swap.set()
        await engine.close()
    # A restart (from the snapshot the compaction's swap carried over, or a later one)
    # finds the same.
    again = Engine(tmp_path, blocking, TUNING, fsync=False)
    await again.start()
    try:
        coll = again.get("k")
        await blocking.write(holds_exactly_the_stored, coll)
    finally:
        await again.close()


async def test_a_compaction_without_writes_leaves_the_snapshot_current(
    tmp_path: Path, blocking: Blocking
) -> None:
    """The copy holds what the saved index did: no snapshot is due for it alone, and a
    restart from that snapshot finds every document."""
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    try:
        coll = await loaded(engine, 200, 150)
        await coll.snapshot()
        assert not coll._dirty()
        pause(coll)
        await wait_for(lambda: coll.compactions == 1 and not coll.compacting, 30,
                       what="the compaction")
        assert not coll._dirty()
    finally:
        await engine.close()
    await reopened_holds_exactly_the_stored(tmp_path, blocking)


async def test_a_close_during_the_copy_waits_for_it(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    copying, go_on = threading.Event(), threading.Event()
    real = VectorIndex.compact_copy

    def held(self: VectorIndex) -> Any:
        copying.set()
        go_on.wait(10)
        return real(self)

    monkeypatch.setattr(VectorIndex, "compact_copy", held)
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    try:
        coll = await loaded(engine, 200, 150)
        pause(coll)
        await wait_for(copying.is_set, 30, what="the copy")
        closing = asyncio.ensure_future(engine.close())
        await wait_for(lambda: coll.closed, 10, what="the close")
        assert not closing.done()  # waiting for the copy (under the read lock)
        go_on.set()
        await closing
        assert coll.compactions == 0
    finally:
        go_on.set()
        await engine.close()
    await reopened_holds_exactly_the_stored(tmp_path, blocking)


async def test_a_compaction_that_writes_outran_is_dropped_and_tried_again(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that resumed during a compaction (a bulk load's, after a gap) drop its copy:
    no swap, the index whole; the next pause compacts."""
    copied, go_on = threading.Event(), threading.Event()
    real = Collection._catch_up_sync

    def held(self: Collection, new: VectorIndex, upto: dict[int, int],
             *more: Any) -> dict[int, int] | None:
        if self.compacting and not copied.is_set():
            copied.set()
            go_on.wait(10)
        return real(self, new, upto, *more)

    monkeypatch.setattr(Collection, "_catch_up_sync", held)
    monkeypatch.setattr(collection_module, "COMPACT_TAIL", 20)
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    try:
        coll = await loaded(engine, 200, 150)
        pause(coll)
        try:
            await wait_for(copied.is_set, 30, what="the compaction's copy")
            await coll.write(docs(range(350, 400)))
            await coll.write(deletes(range(0, 10), version=2))
        finally:
            go_on.set()
        await wait_for(lambda: not coll.compacting, 30, what="the compaction's end")
        assert coll.compactions == 0 and coll._compaction_due()
        await blocking.write(holds_exactly_the_stored, coll)
        pause(coll)  # writes paused this time: swapped in
        await wait_for(lambda: coll.compactions == 1 and not coll.compacting, 30,
                       what="the next compaction")
        assert not coll._compaction_due()
        await blocking.write(holds_exactly_the_stored, coll)
    finally:
        go_on.set()
        await engine.close()


def test_a_fast_scan_copy_decodes_by_its_own_codebooks_once_the_index_is_freed() -> None:
    """ivf_pq (FAISS's fast scan): FAISS's clone of the index keeps the pointer decoding
    follows (`fine_quantizer`) at the original's product quantizer; the copy swapped in, the
    original freed, `vectors_of` (a filtered search's exact scoring) would read freed memory."""
    spec = CollectionSpec("c", 16, "l2", 1, 1, IndexSpec("ivf_pq", nlist=8))
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    keys = global_key(0, 1) + np.arange(len(x), dtype=np.int64)
    index = VectorIndex.new_ivf(spec, 8, len(x))
    index.index.train(x)
    index.add(x, keys)
    want = index.vectors_of(keys)
    copy = index.compact_copy()
    fine = copy.index.fine_quantizer
    assert fine is not None and int(fine.this) == int(copy.index.pq.this)
    del index
    gc.collect()
    # The freed codebooks' memory taken again by others.
    taken = [faiss.ProductQuantizer(16, 4, 4) for _ in range(64)]
    for pq in taken:
        pq.train(x[:1024])
    np.testing.assert_array_equal(copy.vectors_of(keys), want)
