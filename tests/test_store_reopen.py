"""A store reopened keeps the options it is opened with (the node's block cache above all).
Structural checks: RocksDB's own properties, never timings."""

from __future__ import annotations

from pathlib import Path

import rocksdict

from aquila.node.storage.store import RocksMemory, Store, doc_key

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
        # The node's block cache: its budget but the row cache's eighth.
        assert store.db.property_int_value("rocksdb.block-cache-capacity") == 42 * MIB
        before = memory.used()
        got = store.raw_records([doc_key(0, f"k{i}") for i in range(0, 3000, 3)])
        assert all(r is not None for r in got)
        # The blocks read are in the node's cache (1,000 records of 1 KB: more than 0.5 MiB).
        assert memory.used() - before > MIB // 2
    finally:
        store.close()
