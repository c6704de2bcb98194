"""A store reopened keeps the options it is opened with (the node's block cache above all),
and a store whose writes have settled is left with one sorted run to read, not the level-0
files a bulk load and a training's flush leave (each a look-up more for every key a search
reads). Structural checks: RocksDB's own properties, never timings."""

from __future__ import annotations

from pathlib import Path

import rocksdict

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.store import RocksMemory, Store, WriteBatch, doc_key
from tests.conftest import wait_for
from tests.datasets import load_sample

MIB = 1 << 20


def fill(store: Store, first: int, n: int, size: int = 1000) -> None:
    wb = rocksdict.WriteBatch(raw_mode=True)
    for i in range(first, first + n):
        wb.put(doc_key(0, f"k{i}"), i.to_bytes(8, "big") * (size // 8))
    store.db.write(wb)


def test_a_reopened_store_reads_through_the_nodes_cache(tmp_path: Path) -> None:
    """rocksdict opens an existing database with the column family's options of its OPTIONS
    file unless they are passed again: the table options' block cache was then a new 8 MiB
    one per store, outside the node's budget, too small to hold a search's records (3.5 µs a
    record read became 11.6 µs after a restart, in process, WordNet 50k)."""
    first = Store(tmp_path / "s", fsync=False, memory=RocksMemory(32 * MIB))
    first.open()
    fill(first, 0, 3000)
    first.db.flush(True)
    first.close()
    memory = RocksMemory(48 * MIB)
    store = Store(tmp_path / "s", fsync=False, memory=memory)
    store.open()
    try:
        assert store.db.property_int_value("rocksdb.block-cache-capacity") == 48 * MIB
        before = memory.used()
        got = store.raw_records([doc_key(0, f"k{i}") for i in range(0, 3000, 3)])
        assert all(r is not None for r in got)
        # The blocks read are in the node's cache (1,000 records of 1 KB: more than 0.5 MiB).
        assert memory.used() - before > MIB // 2
    finally:
        store.close()


def flushed_files(store: Store, batches: int, first: int = 0) -> None:
    """`batches` level-0 files (one flush each), of keys overlapping one another."""
    for b in range(batches):
        fill(store, first + b, 400 * 7, size=200)  # the same key range each time
        store.db.flush(True)


def test_a_settled_store_has_no_file_left_at_level_0(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", fsync=False)
    store.open()
    try:
        flushed_files(store, 3)
        assert store.level0_files() == 3  # below the trigger: left there by RocksDB
        fill(store, 10_000, 500, size=200)  # in the memtable: flushed by the settle too
        store.settle(timeout_s=60)
        assert store.level0_files() == 0
        assert store.db.property_int_value("rocksdb.num-immutable-mem-table") == 0
        assert store.raw_records([doc_key(0, "k10000"), doc_key(0, "k2")]) != [None, None]
        # The trigger is back at its default: writes go on flushing without a compaction
        # each time.
        flushed_files(store, 2, first=20_000)
        assert store.level0_files() == 2
    finally:
        store.close()


def test_a_settle_ends_when_the_store_is_closed(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", fsync=False)
    store.open()
    store.close()
    store.settle(timeout_s=60)  # nothing to do, no error
    assert store._db is None


async def test_after_a_training_the_store_settles_to_no_file_at_level_0(tmp_path: Path) -> None:
    """A bulk load then its training: the training's end flushes the memtables and compacts
    level 0 (what the load's flushes and its own left there) into the level below."""
    smp = load_sample()
    blocking = Blocking(2)
    engine = Engine(tmp_path, blocking, Tuning(train_min=1000), fsync=False)
    await engine.start()
    try:
        spec = CollectionSpec("c", smp.dim, "cosine", 4, 1, IndexSpec("ivf_flat"))
        coll = await engine.ensure(spec, range(4), "u")
        store = coll.store
        for lo in range(0, 3000, 500):
            by: dict[int, list[Incoming]] = {}
            for i in range(lo, lo + 500):
                by.setdefault(shard_of(str(i), 4), []).append(
                    Incoming(str(i), smp.base[i], b"{}", 1, "n"))
            await coll.write(by)
            store.db.flush(True)  # as a long load's memtables fill: a level-0 file each
        assert store.level0_files() >= 2
        await wait_for(lambda: coll.state == "trained", 60, what="the index to train")
        await wait_for(lambda: store.level0_files() == 0
                       and not store.db.property_int_value("rocksdb.num-immutable-mem-table"),
                       60, what="level 0 to be compacted")
        rows = await coll.search(smp.queries[:5], 10, 8)
        assert all(len(r) == 10 for r in rows)
    finally:
        await engine.close()
        blocking.close()


def test_a_settle_ends_when_writes_resume(tmp_path: Path) -> None:
    """A write while level 0 is being compacted ends the settle and sets the trigger back:
    writes that go on are not compacted at every flush."""
    store = Store(tmp_path / "s", fsync=False)
    store.open()
    try:
        flushed_files(store, 3)
        real = store.level0_files
        polls: list[int] = []

        def written_meanwhile() -> int:
            polls.append(1)
            if len(polls) == 2:  # after the trigger was lowered: a write comes
                wb = WriteBatch()
                wb.put_label(0, 1, b"x")
                store.write(wb)
            return real() + 1  # never empty: only the write can end the settle

        store.level0_files = written_meanwhile  # type: ignore[method-assign]
        store.settle(timeout_s=60)
        assert len(polls) == 2  # the write seen at the next poll, the settle over
        store.level0_files = real  # type: ignore[method-assign]
        # The trigger is back at its default: two more flushes stay at level 0.
        store.db.compact_range(None, None)
        flushed_files(store, 2, first=20_000)
        assert store.level0_files() == 2
    finally:
        store.close()
