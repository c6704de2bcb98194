"""RocksDB's memory on a node is one budget (issue 14: RSS bounded whatever the churn): one
block cache shared by every collection's store, with the memtables charged to it by a write
buffer manager; and the tombstone purge of every anti-entropy pass does not read every record
of a shard when nothing can be old enough."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rocksdict

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.config import load_config
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.store import (
    DEFAULT_MEMORY_BYTES,
    MIN_MEMORY_BYTES,
    RocksMemory,
    Store,
    cache_entry_bytes,
    doc_key,
)
from tests.conftest import wait_for

MIB = 1 << 20
SPEC = CollectionSpec("c", 4, "l2", 1, 1, IndexSpec("flat"))


def doc(i: int, version: int = 1) -> Incoming:
    return Incoming(f"d{i}", np.full(4, float(i), np.float32), b"{}", version, "n1")


def tombstone(i: int, version: int) -> Incoming:
    return Incoming(f"d{i}", None, b"", version, "n1")


def fill(store: Store, first: int, n: int, size: int = 1000) -> None:
    """n records of `size` bytes written, none read (nothing enters the cache by a read)."""
    wb = rocksdict.WriteBatch(raw_mode=True)
    for i in range(first, first + n):
        wb.put(doc_key(0, f"k{i}"), i.to_bytes(8, "big") * (size // 8))
    store.db.write(wb)


async def test_every_collection_of_a_node_shares_one_cache_that_holds_their_memtables(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(rocksdb_memory_bytes=64 * MIB), fsync=False)
    await engine.start()
    try:
        a = await engine.ensure(SPEC, [0], "u1")
        b = await engine.ensure(CollectionSpec("b", 4, "l2", 1, 1, IndexSpec("flat")), [0], "u2")
        assert a.store.memory is engine.memory and b.store.memory is engine.memory
        assert engine.memory.write_buffers.enabled()
        assert engine.memory.write_buffers.get_buffer_size() == 8 * MIB  # an eighth
        for coll in (a, b):  # RocksDB's own view of each store's cache: the node's one,
            # seven eighths of the budget (the row cache is the other eighth)
            assert coll.store.db.property_int_value("rocksdb.block-cache-capacity") == 56 * MIB
        assert engine.memory.row_capacity == 8 * MIB
        fill(a.store, 0, 2000)
        fill(b.store, 0, 3000)
        fa, fb = a.store.memory_bytes(), b.store.memory_bytes()
        memtables = fa["memtables"] + fb["memtables"]
        assert memtables > 4 * MIB
        # Nothing was read: what the cache holds is the memtables, charged to it.
        assert fa["budget_used"] == fb["budget_used"] >= memtables
        assert fa["block_cache"] < MIB
        assert fa["budget"] == 64 * MIB
    finally:
        await engine.close()


async def test_memtables_of_all_stores_stay_within_their_share_of_the_budget(
    tmp_path: Path,
) -> None:
    """Two stores under a 32 MiB budget: their memtables together flush at 8 MiB (checked
    before each write: the last one may go past it by its size, 0.5 MiB), where each alone
    (an 8 MiB memtable) would have kept its 6 MiB."""
    memory = RocksMemory(32 * MIB)
    stores = [Store(tmp_path / n, fsync=False, memory=memory) for n in ("a", "b")]
    for s in stores:
        s.open()
    try:
        for s in stores:
            for lo in range(0, 6000, 500):
                fill(s, lo, 500)

        def within() -> bool:
            # What is charged to the cache follows the memtables with a lag (the write
            # buffer manager gives its reservation back in steps, after a flush).
            return (sum(s.memory_bytes()["memtables"] for s in stores) <= 9 * MIB
                    and memory.memtables() <= 10 * MIB)

        await wait_for(within, timeout_s=20,
                       what="memtables, and what is charged for them, within 8 MiB and a write")
    finally:
        for s in stores:
            s.close()


def test_a_store_alone_has_a_budget_of_its_own() -> None:
    store = Store(Path("unused"))
    assert store.memory.capacity == DEFAULT_MEMORY_BYTES


@pytest.mark.parametrize("mib", [0, 8, 31, (1 << 20) + 1])
def test_a_budget_out_of_bounds_is_refused(mib: int) -> None:
    with pytest.raises(ValueError, match="rocksdb_memory_mib"):
        load_config(environ={"AQUILA_ROCKSDB_MEMORY_MIB": str(mib)})
    with pytest.raises(ValueError, match="RocksDB memory"):
        RocksMemory(mib * MIB)


def test_the_budget_setting() -> None:
    assert load_config(environ={}).rocksdb_memory_mib == DEFAULT_MEMORY_BYTES // MIB
    assert load_config(environ={"AQUILA_ROCKSDB_MEMORY_MIB": "64"}).rocksdb_memory_mib == 64
    assert load_config(environ={"AQUILA_ROCKSDB_MEMORY_MIB": "32"}).rocksdb_memory_mib == 32


def count_scans(coll: Collection) -> list[int]:
    calls: list[int] = []
    scan = coll.store.old_tombstones

    def counted(shard: int, before: int, **kw: Any) -> Any:
        calls.append(before)
        return scan(shard, before, **kw)

    coll.store.old_tombstones = counted  # type: ignore[method-assign]
    return calls


async def test_a_purge_scans_again_only_when_a_tombstone_may_be_old_enough(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        scans = count_scans(coll)
        await coll.write({0: [doc(1, 5), doc(2, 5), doc(3, 5)]})
        await coll.write({0: [tombstone(1, 100), tombstone(2, 120)]})
        await coll.snapshot()
        assert await coll.purge_tombstones(0, 50) == 0
        assert len(scans) == 1
        # No tombstone is below 100: passes up to it read nothing.
        assert await coll.purge_tombstones(0, 60) == 0
        assert await coll.purge_tombstones(0, 100) == 0
        assert len(scans) == 1
        # A delete (a replica's late one) older than the floor lowers it.
        await coll.write({0: [tombstone(3, 40)]})
        await coll.snapshot()
        assert await coll.purge_tombstones(0, 60) == 1
        assert len(scans) == 2
        assert await coll.purge_tombstones(0, 110) == 1  # d1, found by a scan
        assert len(scans) == 3
        page, _ = await coll.stream_shard(0, None, 100)
        assert [d.id for d in page] == ["d2"]
        # The floor is d2's now: nothing more below 120, however often asked.
        assert await coll.purge_tombstones(0, 115) == 0
        assert len(scans) == 3
    finally:
        await engine.close()


async def test_a_purge_scans_again_when_its_last_scan_is_old(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that bypass `write` (none today) or a clock gone wrong: at worst the purge
    waits for the next scan, due within PURGE_RESCAN_S."""
    monkeypatch.setattr("aquila.node.storage.collection.PURGE_RESCAN_S", 0.0)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        scans = count_scans(coll)
        await coll.write({0: [doc(1, 5)]})
        await coll.purge_tombstones(0, 50)
        await coll.purge_tombstones(0, 50)
        assert len(scans) == 2
    finally:
        await engine.close()


async def test_a_candidate_written_again_after_the_scan_is_not_purged(
    tmp_path: Path, blocking: Blocking
) -> None:
    """The scan runs outside the write locks: what it found is read again under them."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(1, 5), doc(2, 5)]})
        await coll.write({0: [tombstone(1, 6), tombstone(2, 6)]})
        await coll.snapshot()
        ids, least = coll.store.old_tombstones(0, 8)()
        assert sorted(ids) == ["d1", "d2"] and least == float("inf")
        await coll.write({0: [doc(1, 7)]})  # d1 lives again before the purge takes it
        await coll.snapshot()
        assert await blocking.write(coll._purge_sync, 0, 8, ids) == (1, 0)
        page, _ = await coll.stream_shard(0, None, 100)
        assert [(d.id, d.vector is None) for d in page] == [("d1", False)]
        assert coll.count() == 1
    finally:
        await engine.close()


async def test_a_delete_written_while_a_scan_runs_lowers_the_floor(
    tmp_path: Path, blocking: Blocking
) -> None:
    """The scan reads the store as it was when it began: a delete made meanwhile is not in
    it, and must not be left below a floor that would skip it until the next hourly scan."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    loop = asyncio.get_running_loop()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(1, 5), doc(5, 5)]})
        await coll.write({0: [tombstone(1, 100)]})
        make_scan = coll.store.old_tombstones

        def racing(shard: int, before: int, **kw: Any) -> Any:
            scan = make_scan(shard, before, **kw)

            def run() -> Any:  # on a write thread, the scan's iterator already made
                asyncio.run_coroutine_threadsafe(
                    coll.write({0: [tombstone(5, 30)]}), loop).result(10)
                return scan()

            return run

        coll.store.old_tombstones = racing  # type: ignore[method-assign]
        assert await coll.purge_tombstones(0, 20) == 0
        coll.store.old_tombstones = make_scan  # type: ignore[method-assign]
        await coll.snapshot()
        assert await coll.purge_tombstones(0, 50) == 1  # d5, below the floor noted
        page, _ = await coll.stream_shard(0, None, 100)
        assert [d.id for d in page] == ["d1"]
    finally:
        await engine.close()


def test_blocks_of_table_files_compacted_away_leave_the_cache(tmp_path: Path) -> None:
    """A flush or a compaction that makes a table file obsolete takes its blocks out of the
    cache (RocksDB's `uncache_aggressiveness`): every new file's filter and index partitions
    are read into the cache when it is opened, and left there the blocks of files compacted
    away filled the cache to its capacity under churn (RSS growing with the deletes for
    minutes). Rounds of new keys, each looked up first as a write does, each round flushed
    (a file, compacted with the others every 4) and read again (its data blocks cached),
    then all compacted into one: without it the cache held 14.6 MiB of blocks after them,
    with it 1.4."""
    store = Store(tmp_path / "s", fsync=False, memory=RocksMemory(MIN_MEMORY_BYTES))
    store.open()
    try:
        db = store.db
        for r in range(24):
            wb = rocksdict.WriteBatch(raw_mode=True)
            for i in range(8000):
                key = doc_key(0, f"c{r}-{i}")
                db.get(key)  # a write's look-up: misses, through the filters
                wb.put(key, b"x" * 60)
            db.write(wb)
            db.flush()
            for i in range(8000):  # and read again, as a delete reads its record
                db.get(doc_key(0, f"c{r}-{i}"))
        db.compact_range(None, None)  # every file but the one it writes made obsolete
        # (The row cache keeps rows of files compacted away until they are evicted, as any
        # LRU cache does: within its share of the budget.)
        blocks = store.memory.blocks_used() - store.memory.memtables()
        assert blocks < 5 * MIB, blocks / MIB
    finally:
        store.close()


# RocksDB 9's text for a cache of data, filter and index blocks (captured from rocksdict).
ENTRY_STATS = (
    "Block cache LRUCache@0x55ad306d1460#8589 capacity: 8.00 MB seed: 1177849269 usage: 7.95 MB "
    "table_size: 2048 occupancy: 1918 collections: 2 last_copies: 0 last_secs: 0.000358 "
    "secs_since: 0\nBlock cache entry stats(count,size,portion): DataBlock(1915,7.45 MB,"
    "93.133%) FilterBlock(1,244.22 KB,2.98125%) IndexBlock(1,103.65 KB,1.26525%) "
    "Misc(1,0.00 KB,0%)\n")


def test_the_cache_by_role_is_read_from_rocksdbs_entry_stats() -> None:
    assert cache_entry_bytes(ENTRY_STATS) == {
        "cache_data": int(7.45 * MIB), "cache_filter": int(244.22 * 1024),
        "cache_index": int(103.65 * 1024)}
    # A cache holding none of a role (just opened) and text RocksDB might print otherwise.
    empty = {"cache_data": 0, "cache_filter": 0, "cache_index": 0}
    assert cache_entry_bytes("Block cache entry stats(count,size,portion): Misc(1,0.00 KB,0%)"
                             ) == empty
    assert cache_entry_bytes("") == empty
    assert cache_entry_bytes("DataBlock(1915,7.45 MB,93%)") == empty  # not the stats' part


def test_a_stores_figures_hold_the_cache_by_role(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", fsync=False)
    store.open()
    try:
        figures = store.memory_bytes()
        assert {"cache_data", "cache_filter", "cache_index"} <= figures.keys()
        assert all(figures[k] >= 0 for k in ("cache_data", "cache_filter", "cache_index"))
    finally:
        store.close()
