"""Labels given again (issue 14, item 2): a purged tombstone's label goes back to its shard's
free labels, persisted in the purge's batch, and a new document takes a free label before a
new one is minted. The arrays over labels (the live bitmap, the IVF label → list map, a filter
key's columns) then stay bounded by the peak of the labels in use, whatever the churn; a label
given again starts clean in each of them; the free labels survive a restart and a failed
write, go with a dropped shard, and an older store opens with none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.cluster.model.digests import BUCKETS, digests
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import global_key
from aquila.node.storage.shard import Shard
from aquila.node.storage.store import LAYOUT, Store
from tests.conftest import settled, wait_for
from tests.held_training import hold_catch_up

DIM = 4
IVF = CollectionSpec("c", DIM, "l2", 1, 1, IndexSpec("ivf_flat", nlist=4))
FLAT = CollectionSpec("c", DIM, "l2", 2, 1, IndexSpec("flat"))


def vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def doc(i: int, version: int = 1, meta: dict[str, Any] | None = None) -> Incoming:
    m = {"g": i % 3} if meta is None else meta
    return Incoming(f"d{i}", vec(i), orjson.dumps(m), version, "n1")


def delete(i: int, version: int = 2) -> Incoming:
    return Incoming(f"d{i}", None, b"", version, "n1")


def labels_of(coll: Collection, s: int) -> dict[str, int]:
    return {d: r.label for d, r in coll.store.iter_docs(s)}


async def purge(coll: Collection, s: int = 0, before: int = 100) -> int:
    await coll.snapshot()  # the deletes covered: their tombstones can go
    return await coll.purge_tombstones(s, before)


async def test_labels_stay_bounded_under_churn(tmp_path: Path, blocking: Blocking) -> None:
    """A trained shard of 300 live documents, 40 cycles of 50 new ids written then deleted
    and purged, with a filtered search building the payload index and the label → list map:
    the labels given stop at the peak in use (350), and so do the arrays over them; the live
    documents, the index and the digests stay right. Without reuse 2,300 labels are given."""
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(IVF, [0], "u")
        await coll.write({0: [doc(i) for i in range(300)]})
        await settled(coll, what="training")
        flt = parse_filter({"must": [{"key": "g", "match": 1}]})
        version, sizes = 2, []
        for cycle in range(40):
            ids = range(1000 + cycle * 50, 1050 + cycle * 50)
            await coll.write({0: [doc(i, version) for i in ids]})
            await coll.search(vec(1)[None], 5, 4, predicate=flt)
            await coll.write({0: [delete(i, version + 1) for i in ids]})
            assert await purge(coll, 0, version + 2) == 50
            version += 2
            shard = coll.shards[0]
            sizes.append((shard.next_label - 1, len(shard.live), len(coll.index.lists_of(0)),
                          len(shard.payload.keys[("g",)].code)))
        shard = coll.shards[0]
        print(f"after 40 churn cycles of 50 (2,000 deleted, 300 live): labels given "
              f"{shard.next_label - 1}, free {len(shard.free)}; live bitmap {len(shard.live)} "
              f"bytes, list map {len(coll.index.lists_of(0))} slots, filter column "
              f"{len(shard.payload.keys[('g',)].code)} slots")
        assert shard.next_label - 1 == 350
        assert coll.label_figures() == {"given": 350, "free": 50, "bitmap_bytes": 64}
        assert set(sizes[1:]) == {sizes[1]}, sizes  # nothing grew after the second cycle
        assert max(max(sz[1] * 8, *sz[2:]) for sz in sizes) < 2 * 350
        assert coll.count() == coll.index.ntotal == 300
        assert shard.live_labels().tolist() == sorted(labels_of(coll, 0).values())
        assert shard.digests == [int(h, 16) for h in digests(
            ((d, r.version, r.writer) for d, r in coll.store.iter_docs(0)), BUCKETS)]
        got = await coll.count_matching([0], flt)
        assert got == {0: sum(1 for i in range(300) if i % 3 == 1)}
    finally:
        await engine.close()


async def test_a_label_given_again_starts_clean(tmp_path: Path, blocking: Blocking) -> None:
    """A document with a filtered key, in a cached match set, in the label → list map, is
    deleted and purged; a new document without the key takes its label: no filter admits it
    for the old one's value, the cached match sets and counts equal a fresh evaluation, its
    list is the one its vector is in, its bit is set."""
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(IVF, [0], "u")
        await coll.write({0: [doc(i, meta={"g": "x" if i == 7 else "y", "n": i})
                              for i in range(150)]})
        await settled(coll, what="training")
        by_value = parse_filter({"must": [{"key": "g", "match": "x"}]})
        by_range = parse_filter({"must": [{"key": "n", "range": {"gte": 7, "lte": 7}}]})
        for flt in (by_value, by_range):  # cached, with the payload index and list map
            assert await coll.count_matching([0], flt) == {0: 1}
        old = labels_of(coll, 0)["d7"]
        await coll.write({0: [delete(7)]})
        assert await purge(coll) == 1
        await coll.write({0: [Incoming("new", vec(500), b"{}", 3, "n1")]})
        shard = coll.shards[0]
        assert labels_of(coll, 0)["new"] == old, "the purged label was not given again"
        assert shard.next_label == 151
        for flt in (by_value, by_range):
            assert await coll.count_matching([0], flt) == {0: 0}
            fresh = shard.payload.mask(flt, shard.meta, shard.next_label)
            assert not fresh.any()
        assert shard.payload.keys[("g",)].code[old] == -1
        assert np.isnan(shard.payload.keys[("n",)].num[old])
        assert shard.live_labels().tolist().count(old) == 1
        _, assign = coll.index.index.quantizer.search(vec(500)[None], 1)
        assert coll.index.lists_of(0)[old] == assign[0, 0]
        hits = await coll.search(vec(500)[None], 1, 4)
        assert [h.id for h in hits[0]] == ["new"]
        hits = await coll.search(vec(7)[None], 150, 4, predicate=by_value)
        assert hits == [[]]
    finally:
        await engine.close()


@pytest.mark.parametrize("crash", [False, True])
async def test_labels_given_again_survive_a_restart(tmp_path: Path, blocking: Blocking,
                                                    crash: bool) -> None:
    """Free labels are in the store: a restart (closed, or killed: the last snapshot and the
    change log) gives the same ones, and the index holds each live document under its own
    label, never a purged one's vector under a label given again."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(10)]})
    await coll.snapshot()  # d0..d9 live in it
    await coll.write({0: [delete(i) for i in (2, 5, 8)]})
    assert await purge(coll) == 3
    await coll.write({0: [doc(20, 3)]})  # takes one of the three
    free = sorted(coll.shards[0].free.labels().tolist())
    assert len(free) == 2 and coll.shards[0].next_label == 11
    if crash:
        await coll.close(snapshot=False)
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        shard = coll.shards[0]
        assert sorted(shard.free.labels().tolist()) == free and shard.next_label == 11
        assert sorted(coll.index.all_keys().tolist()) == sorted(
            global_key(0, lab) for lab in labels_of(coll, 0).values())
        for i in (0, 1, 3, 20):
            hits = await coll.search(vec(i)[None], 1, None)
            assert [h.id for h in hits[0]] == [f"d{i}"]
        await coll.write({0: [doc(30, 3), doc(31, 3), doc(32, 3)]})
        got = labels_of(coll, 0)
        assert sorted(got[f"d{i}"] for i in (30, 31)) == free and got["d32"] == 11
        assert len(shard.free) == 0 and (await blocking.write(coll.store.free_labels, 0)).tolist() == []
    finally:
        await engine.close()


async def test_no_label_is_given_again_before_a_snapshot_covers_its_delete(
    tmp_path: Path, blocking: Blocking
) -> None:
    """A document live in the last snapshot, deleted since: its tombstone (and label) stay
    until a snapshot covers the delete, so a restart from that snapshot, replaying the change
    log, never finds the deleted vector under a label a new document took."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(4)]})
    await coll.snapshot()
    await coll.write({0: [delete(1)]})
    assert await coll._purge(0, 100) == (0, 1)  # waits for a snapshot
    await coll.write({0: [doc(9, 3)]})
    assert labels_of(coll, 0)["d9"] == 5
    await coll.close(snapshot=False)  # killed: the snapshot holds d1's vector at label 2
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        assert coll.count() == coll.index.ntotal == 4
        hits = await coll.search(vec(1)[None], 4, None)
        assert sorted(h.id for h in hits[0]) == ["d0", "d2", "d3", "d9"]
    finally:
        await engine.close()


async def test_a_failed_write_gives_its_free_labels_back(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails after taking free labels (its batch refused by the store: a full
    disk) takes none: the next write gets the same ones, in either staging path (a batch
    that names an id twice is staged apart)."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(FLAT, [0], "u")
        await coll.write({0: [doc(i) for i in range(6)]})
        await coll.write({0: [delete(i) for i in range(4)]})
        assert await purge(coll) == 4
        real = coll.store.write

        def refused(batch: Any) -> None:
            raise OSError("no space left on device")

        for batch in ([doc(10), doc(11)], [doc(10), doc(11), doc(11, 2)]):
            monkeypatch.setattr(coll.store, "write", refused)
            with pytest.raises(OSError):
                await coll.write({0: batch})
            monkeypatch.setattr(coll.store, "write", real)
            assert len(coll.shards[0].free) == 4 and coll.shards[0].next_label == 7
        await coll.write({0: [doc(10), doc(11), doc(11, 2)]})
        got = labels_of(coll, 0)
        assert sorted([got["d10"], got["d11"]]) == [1, 2]
        assert sorted(coll.shards[0].free.labels().tolist()) == [3, 4]
        assert (await blocking.write(coll.store.free_labels, 0)).tolist() == [3, 4]
    finally:
        await engine.close()


async def test_a_dropped_shard_takes_its_free_labels_with_it(tmp_path: Path,
                                                             blocking: Blocking) -> None:
    """Dropped (moved away), a shard leaves no free label keys; taken again, it starts from
    label 1 with none free."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(FLAT, [0, 1], "u")
        await coll.write({1: [doc(i) for i in range(5)]})
        await coll.write({1: [delete(i) for i in range(3)]})
        assert await purge(coll, 1) == 3
        await coll.drop_shard(1)
        assert await blocking.write(coll.store.has_shard, 1) is False
        await coll.add_shards([1])
        assert len(coll.shards[1].free) == 0 and coll.shards[1].next_label == 1
        await coll.write({1: [doc(7)]})
        assert labels_of(coll, 1) == {"d7": 1}
    finally:
        await engine.close()


async def test_a_store_of_layout_2_opens_without_a_scan(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store written before free labels were kept (layout 2: the labels it purged are
    not in it) opens without reading its records, and gives the labels purged from then on
    again."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(6)]})
    await coll.write({0: [delete(i) for i in range(2)]})
    assert await purge(coll) == 2
    await engine.close()
    store = Store(tmp_path / "collections" / "c" / "db", fsync=False)
    store.open()
    for key, _ in list(store._scan(b"R")):  # as layout 2 left it
        store.db.delete(key)
    store.put_layout(2)
    store.close()

    def no_scan(*_: Any) -> None:
        raise AssertionError("a layout 2 store was scanned")

    monkeypatch.setattr(Shard, "upgrade", staticmethod(no_scan))
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        assert coll.store.layout() == LAYOUT
        assert len(coll.shards[0].free) == 0 and coll.count() == 4
        await coll.write({0: [doc(10)]})
        assert labels_of(coll, 0)["d10"] == 7  # labels 1 and 2 were purged before
        await coll.write({0: [delete(3)]})
        assert await purge(coll) == 1
        await coll.write({0: [doc(11)]})
        assert labels_of(coll, 0)["d11"] == 4
        hits = await coll.search(vec(11)[None], 1, None)
        assert [h.id for h in hits[0]] == ["d11"]
    finally:
        await engine.close()


async def test_a_purge_while_training_frees_no_label_the_new_index_may_hold(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletes made while an index trains keep their labels until the training is in (its
    catch-up replays them); then they are purged and given again, and the new index holds
    each live document under its own label."""
    reached, go_on = hold_catch_up(monkeypatch)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(IVF, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        try:
            await wait_for(reached.is_set, 30, what="the training's catch-up")
            await coll.write({0: [delete(i) for i in range(10)]})
            assert await purge(coll) == 0
            await coll.write({0: [doc(i) for i in range(200, 210)]})
            assert min(labels_of(coll, 0)[f"d{i}"] for i in range(200, 210)) == 151
        finally:
            go_on.set()
        await settled(coll, what="training")
        assert await purge(coll) == 10
        await coll.write({0: [doc(i) for i in range(300, 310)]})
        got = labels_of(coll, 0)
        assert sorted(got[f"d{i}"] for i in range(300, 310)) == list(range(1, 11))
        assert sorted(coll.index.all_keys().tolist()) == sorted(got.values())
        for i in (300, 305, 20):
            hits = await coll.search(vec(i)[None], 1, 4)
            assert [h.id for h in hits[0]] == [f"d{i}"]
    finally:
        await engine.close()


def test_rollback_restores_the_free_labels() -> None:
    from aquila.node.storage.label_arrays import FreeLabels

    free = FreeLabels(np.array([3, 5, 9], np.int64))
    assert free.take() == 3
    mark = free.mark()
    assert [free.take(), free.take()] == [5, 9] and not free
    free.restore(mark)
    assert len(free) == 2
    free.put(np.arange(100, 200, dtype=np.int64))
    assert len(free) == 102 and free.take() == 100  # the lowest of those put first
