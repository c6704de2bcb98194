"""Labels released before the purge (issue 14, item 2): a tombstone's label goes to its shard's
free labels as soon as the snapshot on disk (and any training in progress) covers its delete,
its record rewritten with label 0 ("no label"), its label key deleted, the change log read
past a position kept per shard; not after the grace period. A write reviving such a tombstone
takes a free label, a delete of an unknown id takes none, the purge of a tombstone of no label
frees nothing, and a search running meanwhile never resolves a released label to another
document."""

from __future__ import annotations

import asyncio
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
from aquila.node.storage.store import Store, label_key
from tests.conftest import settled

DIM = 4
FLAT = CollectionSpec("c", DIM, "l2", 1, 1, IndexSpec("flat"))
IVF = CollectionSpec("c", DIM, "l2", 1, 1, IndexSpec("ivf_flat", nlist=4))


def vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def doc(i: int, version: int = 1) -> Incoming:
    return Incoming(f"d{i}", vec(i), orjson.dumps({"i": i}), version, "n1")


def delete(i: int, version: int = 2) -> Incoming:
    return Incoming(f"d{i}", None, b"", version, "n1")


def labels_of(coll: Collection, s: int = 0) -> dict[str, int]:
    return {d: r.label for d, r in coll.store.iter_docs(s)}


def label_keys(store: Store, s: int = 0) -> dict[int, str]:
    prefix = label_key(s, 0)[:3]
    return {int.from_bytes(k[3:], "big"): v.decode() for k, v in store._scan(prefix)}


def check(coll: Collection, s: int = 0) -> None:
    """Each label below the next is a record's or free, never both; the label keys are the
    records' that hold one; the index holds the live ones; the digests are the records'."""
    recs = {d: r for d, r in coll.store.iter_docs(s)}
    shard = coll.shards[s]
    held = {r.label: d for d, r in recs.items() if r.label}
    assert all(r.tombstone for r in recs.values() if not r.label)
    free = coll.store.free_labels(s).tolist()
    assert sorted([*held, *free]) == list(range(1, shard.next_label))
    assert sorted(shard.free.labels().tolist()) == sorted(free)
    assert label_keys(coll.store, s) == held
    assert sorted(coll.index.all_keys().tolist()) == sorted(
        global_key(s, r.label) for r in recs.values() if not r.tombstone)
    assert shard.live_labels().tolist() == sorted(r.label for r in recs.values()
                                                  if not r.tombstone)
    assert shard.digests == [int(x, 16) for x in digests(
        ((d, r.version, r.writer) for d, r in recs.items()), BUCKETS)]


async def write_delete_snapshot(coll: Collection, ids: range, version: int) -> None:
    """One churn cycle: `ids` written at `version`, deleted at the next, then a snapshot
    (which releases their labels)."""
    await coll.write({0: [doc(i, version) for i in ids]})
    await coll.write({0: [delete(i, version + 1) for i in ids]})
    await coll.snapshot()


@pytest.fixture
async def engine(tmp_path: Path, blocking: Blocking) -> Any:
    e = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await e.start()
    yield e
    await e.close()


async def test_a_snapshot_releases_the_labels_of_the_deletes_it_covers(engine: Engine) -> None:
    """No purge (the grace period not over): the snapshot after the deletes releases their
    labels, which the next new documents take; no label is minted meanwhile."""
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(6)]})
    before = labels_of(coll)
    await coll.write({0: [delete(1), delete(4)]})
    assert labels_of(coll)["d1"] == before["d1"]  # not before a snapshot covers the delete
    await coll.snapshot()
    got = labels_of(coll)
    assert got["d1"] == got["d4"] == 0
    assert sorted(coll.shards[0].free.labels().tolist()) == [before["d1"], before["d4"]]
    check(coll)
    await coll.write({0: [doc(10), doc(11), doc(12)]})
    got = labels_of(coll)
    assert sorted([got["d10"], got["d11"]]) == [before["d1"], before["d4"]]
    assert got["d12"] == 7 and coll.shards[0].next_label == 8
    check(coll)
    for i in (10, 11, 12, 0):
        hits = await coll.search(vec(i)[None], 1, None)
        assert [h.id for h in hits[0]] == [f"d{i}"]


async def test_no_release_past_what_the_snapshot_and_a_training_cover(engine: Engine) -> None:
    """A delete after the snapshot keeps its label; so does one a training in progress has
    still to replay into its new index (its change after the training's start)."""
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(6)]})
    await coll.snapshot()
    await coll.write({0: [delete(1)]})
    assert await coll.release_labels() == 0
    assert labels_of(coll)["d1"] != 0
    coll._training_upto = {0: coll.shards[0].applied_seq}  # a training started here
    await coll.write({0: [delete(2)]})
    await coll.snapshot()  # covers both deletes; the training only d1's
    got = labels_of(coll)
    assert got["d1"] == 0 and got["d2"] != 0
    coll._training_upto = None
    assert await coll.release_labels() == 1
    assert labels_of(coll)["d2"] == 0
    check(coll)


async def test_a_revived_tombstone_takes_a_label_and_an_unknown_delete_none(
    engine: Engine,
) -> None:
    """A document written again after its label was released takes a free label (its label
    key put); deleted again, its tombstone of no label stays so; a delete of an unknown id is
    stored with no label and mints none. Both the one-pass and the general (an id twice in a
    batch) paths."""
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(4)]})
    await coll.write({0: [delete(1), delete(2)]})
    await coll.snapshot()
    freed = sorted(coll.shards[0].free.labels().tolist())
    await coll.write({0: [doc(1, 3), delete(2, 3), Incoming("ghost", None, b"", 1, "n1")]})
    got = labels_of(coll)
    assert got["d1"] in freed and got["d2"] == 0 and got["ghost"] == 0
    assert coll.shards[0].next_label == 5
    check(coll)
    hits = await coll.search(vec(1)[None], 1, None)
    assert [h.id for h in hits[0]] == ["d1"]
    # An id twice in one batch: a tombstone of no label revived, deleted, revived.
    await coll.write({0: [doc(2, 4), delete(2, 5), doc(2, 6), Incoming("g2", None, b"", 1, "n1")]})
    got = labels_of(coll)
    assert got["d2"] in freed and got["g2"] == 0 and coll.shards[0].next_label == 5
    check(coll)
    hits = await coll.search(vec(2)[None], 1, None)
    assert [h.id for h in hits[0]] == ["d2"]


async def test_a_purge_of_tombstones_of_no_label_frees_nothing(engine: Engine) -> None:
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(4)]})
    await coll.write({0: [delete(0), delete(3), Incoming("ghost", None, b"", 1, "n1")]})
    await coll.snapshot()
    free = sorted(coll.shards[0].free.labels().tolist())
    assert len(free) == 2
    assert await coll.purge_tombstones(0, 100) == 3
    assert sorted(coll.shards[0].free.labels().tolist()) == free
    assert set(labels_of(coll)) == {"d1", "d2"}
    check(coll)


@pytest.mark.parametrize("crash", [False, True])
async def test_released_labels_and_the_position_survive_a_restart(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch, crash: bool
) -> None:
    """The free labels and the released position are in the store: a restart (closed, or
    killed after writes the snapshot does not cover) gives the same, the index holds no
    released vector, and the next release reads the change log from the position on."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(10)]})
    await coll.write({0: [delete(i) for i in (2, 5, 8)]})
    await coll.snapshot()
    position = coll.shards[0].released_seq
    assert position == coll.shards[0].applied_seq
    await coll.write({0: [doc(20), doc(3, 3)]})  # one takes a released label
    free = sorted(coll.shards[0].free.labels().tolist())
    assert len(free) == 2
    if crash:
        await coll.close(snapshot=False)
    await engine.close()
    reads: list[tuple[int, int]] = []
    orig = Store.labelled_tombstones

    def spy(self: Store, shard: int, after: int, upto: int, limit: int, stop: Any = None
            ) -> tuple[list[str], int]:
        reads.append((after, upto))
        return orig(self, shard, after, upto, limit, stop)

    monkeypatch.setattr(Store, "labelled_tombstones", spy)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        shard = coll.shards[0]
        assert shard.released_seq == position
        assert sorted(shard.free.labels().tolist()) == free
        check(coll)
        for i in (0, 3, 20):
            hits = await coll.search(vec(i)[None], 1, None)
            assert [h.id for h in hits[0]] == [f"d{i}"]
        await coll.write({0: [delete(0, 5)]})
        await coll.snapshot()
        assert reads and reads[0][0] == position
        assert labels_of(coll)["d0"] == 0
        check(coll)
    finally:
        await engine.close()


async def test_labels_stay_bounded_under_churn_without_a_purge(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 live documents, 30 cycles of 50 new ids written then deleted, a snapshot after
    each, no purge (the default grace of a day): the labels given stop at 350, the peak in
    use, and the tombstones hold none (released 7 a batch). Without the release they follow
    the deletes (1,800)."""
    monkeypatch.setattr("aquila.node.storage.collection.RELEASE_CHUNK", 7)
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(300)]})
    version = 2
    for cycle in range(30):
        ids = range(1000 + cycle * 50, 1050 + cycle * 50)
        await write_delete_snapshot(coll, ids, version)
        labels = labels_of(coll)  # once a cycle: a scan of every record, on the loop
        assert all(labels[f"d{i}"] == 0 for i in ids)
        version += 2
    shard = coll.shards[0]
    assert shard.released_seq == shard.applied_seq == coll.snapshot_seqs[0]
    assert coll.store.released(0) == shard.released_seq
    assert shard.next_label - 1 == 350 and len(shard.free) == 50
    assert shard.count == 300 and len(labels_of(coll)) == 300 + 1500
    assert len(shard.live) <= 64  # bytes of the live bitmap: ~350 bits
    check(coll)


async def test_a_search_during_releases_never_resolves_a_label_to_another_document(
    tmp_path: Path, blocking: Blocking,
) -> None:
    """Searches run while documents are written, deleted, snapshotted (their labels released)
    and written anew under the released labels: every hit's score is its own stored vector's
    distance to the query, so no hit is another document's vector under a label given again
    (an IVF index: the label → list map reused too)."""
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(IVF, [0], "u")
        await coll.write({0: [doc(i) for i in range(200)]})
        await settled(coll, what="training")
        done = asyncio.Event()
        checked = 0

        async def churn() -> None:
            version = 2
            for cycle in range(15):
                await write_delete_snapshot(coll, range(1000 + cycle * 20, 1020 + cycle * 20),
                                            version)
                version += 2
            done.set()

        async def search() -> None:
            nonlocal checked
            n = 0
            while not done.is_set():
                n += 1
                q = vec(1000 + n % 300)
                hits = await coll.search(q[None], 10, 4, with_vectors=True)
                for h in hits[0]:
                    own = int(h.id[1:])
                    assert np.array_equal(np.frombuffer(h.vector, "<f4"), vec(own)), h.id
                    assert h.score == pytest.approx(float(((q - vec(own)) ** 2).sum()),
                                                    rel=1e-4, abs=1e-4), h.id
                    checked += 1

        await asyncio.gather(churn(), search())
        assert checked > 0
        assert coll.shards[0].next_label - 1 <= 240
        check(coll)
    finally:
        await engine.close()


async def test_reads_and_a_transfer_of_tombstones_of_no_label(
    tmp_path: Path, blocking: Blocking
) -> None:
    """A shard holding released tombstones and a revived document: get by id, count and
    scroll (with a filter, by the match set over labels) see exactly the live documents; a
    transfer of its records (tombstones too) to another node's shard gives the same records
    and digests there, and the receiving shard gives the tombstones no label."""
    engine = Engine(tmp_path / "a", blocking, Tuning(), fsync=False)
    other = Engine(tmp_path / "b", blocking, Tuning(), fsync=False)
    await engine.start()
    await other.start()
    try:
        coll = await engine.ensure(FLAT, [0], "u")
        await coll.write({0: [doc(i) for i in range(8)]})
        await coll.write({0: [delete(i) for i in (1, 3, 5)]})
        await coll.snapshot()
        await coll.write({0: [doc(3, 3), doc(20)]})  # d3 revived, d20 new: released labels
        live = {"d0", "d2", "d3", "d4", "d6", "d7", "d20"}
        assert await coll.get(0, "d1") is None and await coll.get(0, "d3") is not None
        assert await coll.count_matching([0], None) == {0: len(live)}
        flt = parse_filter({"must": [{"key": "i", "range": {"gte": 3}}]})
        assert await coll.count_matching([0], flt) == {0: 5}
        page, _ = await coll.scroll(0, None, 100, flt, False)
        assert sorted(h.id for h in page) == ["d20", "d3", "d4", "d6", "d7"]
        page, _ = await coll.scroll(0, None, 100, None, False)
        assert {h.id for h in page} == live
        check(coll)
        recs, after = await coll.stream_shard(0, None, 1000)
        assert after is None and len(recs) == 9
        dest = await other.ensure(FLAT, [0], "u")
        await dest.write({0: recs})
        assert labels_of(dest)["d1"] == 0 and labels_of(dest)["d5"] == 0
        assert dest.shards[0].next_label == len(live) + 1
        assert dest.shards[0].digests == coll.shards[0].digests
        assert await dest.count_matching([0], None) == {0: len(live)}
        check(dest)
    finally:
        await engine.close()
        await other.close()


async def test_a_look_for_tombstones_reads_a_bounded_stretch_of_the_change_log(
    engine: Engine,
) -> None:
    """It runs on the write thread: after a bulk load of upserts (no tombstone among them)
    one call reads at most `limit` × 8 changes and says how far it read; calls from there on
    find every tombstone."""
    coll = await engine.ensure(FLAT, [0], "u")
    await coll.write({0: [doc(i) for i in range(200)]})
    await coll.write({0: [delete(i) for i in (3, 150, 190)]})
    store, upto = coll.store, coll.shards[0].next_seq - 1
    ids, reached = await engine.blocking.write(store.labelled_tombstones, 0, 0, upto, 2)
    assert ids == [] and 0 < reached < upto
    found, after, calls = [], 0, 0
    while after < upto:
        ids, after = await engine.blocking.write(store.labelled_tombstones, 0, after, upto, 2)
        found += ids
        calls += 1
    assert sorted(found) == ["d150", "d190", "d3"] and calls >= 200 // 16
