"""The row cache (see `store.RocksMemory`): a search's point reads are served from it, it is
part of the node's memory budget, and a dropped shard leaves nothing it could serve again
(RocksDB refuses range deletes beside a row cache: a shard is dropped key by key)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.store import doc_key, label_key
from tests.crash_points import SPEC, doc

MIB = 1 << 20


def flushed(engine: Engine) -> None:
    """Every store's memtables written out to table files (the row cache holds only what
    point reads find in table files) and waited for."""
    for coll in engine.collections.values():
        for family in (coll.store.db, coll.store.vdb, coll.store.cdb, coll.store.tdb):
            family.flush(True)


async def test_searches_read_their_hits_through_the_row_cache(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(rocksdb_memory_bytes=64 * MIB), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0, 1], "u1")
        await coll.write({0: [doc(i) for i in range(0, 40, 2)],
                          1: [doc(i) for i in range(1, 40, 2)]})
        flushed(engine)
        before = coll.store.memory_bytes()
        assert before["row_cache"] == 0
        hits = await coll.search(np.full((1, 4), 7, np.float32), 5, None)
        assert [h.id for h in hits[0]][0] == "d7"
        after = coll.store.memory_bytes()
        # Two values a hit (its id by label, its record by id), each a row now.
        assert after["row_cache"] > 0
        assert after["budget_used"] >= after["row_cache"] + after["block_cache"]
        again = await coll.search(np.full((1, 4), 7, np.float32), 5, None)
        assert [(h.id, h.metadata) for h in again[0]] == [(h.id, h.metadata) for h in hits[0]]
        assert coll.store.memory_bytes()["row_cache"] == after["row_cache"]  # hits, no insert
    finally:
        await engine.close()


async def test_a_dropped_shard_leaves_no_key_and_no_row_behind(
    tmp_path: Path, blocking: Blocking
) -> None:
    """Rows of a shard's documents cached before its drop are not served after it: taken
    back, the shard is empty, by id, by label and in a search."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0, 1], "u1")
        await coll.write({1: [doc(i) for i in range(30)]})
        flushed(engine)
        store = coll.store
        rec = await coll.get(1, "d5")  # its record now a row
        assert rec is not None
        assert store.raw_records([label_key(1, rec.label)]) == [b"d5"]  # and its label's
        assert store.memory.rows_used() > 0
        await engine.drop_shard("c", 1)
        assert store.shards_present() == set()
        assert store.raw_records([label_key(1, rec.label), doc_key(1, "d5")]) == [None, None]
        await engine.ensure(SPEC, [0, 1], "u1")
        assert coll.count() == 0 and await coll.get(1, "d5") is None
        hits = await coll.search(np.full((1, 4), 5, np.float32), 5, None)
        assert hits == [[]]
    finally:
        await engine.close()


async def test_a_drop_removes_every_key_a_batch_at_a_time(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0, 1], "u1")
        await coll.write({0: [doc(i) for i in range(10)], 1: [doc(i) for i in range(10, 60)]})
        flushed(engine)
        keys_of_0 = coll.store.raw_records([label_key(0, lab) for lab in range(10)])
        # 50 documents: C, D, L, G (one a bucket written), V and Q keys; a few keys a batch.
        removed = coll.store.drop_shard(1, chunk=7)
        assert removed > 4 * 50
        assert coll.store.shards_present() == {0}
        assert coll.store.raw_records([label_key(0, lab) for lab in range(10)]) == keys_of_0
        assert coll.store.drop_shard(1) == 0
    finally:
        await engine.close()
