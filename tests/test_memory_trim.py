"""The C heap given back to the system (node/storage/heap.py): `trim` gives back free pages inside
the heap, and a collection calls it after a training's swap and after a snapshot, each time
on a worker thread, never on the event loop (it walks every arena under its lock)."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import pytest

from aquila.node.blocking import BACKGROUND_THREADS, Blocking
from aquila.node.storage import collection as collection_module
from aquila.node.storage import heap
from aquila.node.storage.engine import Engine
from aquila.node.storage.store import RocksMemory, Store, doc_key
from tests.conftest import settled, wait_for
from tests.small_ivf import SPEC, doc
from tests.test_rocks_memory import MIB, fill
from tests.test_training_memory import TUNING

glibc = pytest.mark.skipif(not hasattr(heap._libc(), "mallinfo2"), reason="glibc 2.33 on")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


@glibc
def test_trim_gives_back_free_pages_inside_the_heap() -> None:
    """Blocks freed below one still in use are not given back by free() (only the heap's top
    is): they stay resident until a trim."""
    libc = heap._libc()
    assert libc is not None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 32 << 10, 2048  # 64 MiB in blocks under the mmap threshold: from the heap
    heap.limit_arenas()
    blocks = [libc.malloc(size) for _ in range(count)]
    pin = libc.malloc(size)  # above them: the heap's top cannot shrink past it
    try:
        for b in blocks:
            ctypes.memset(b, 1, size)  # resident
        for b in blocks:
            libc.free(b)
        free = heap.malloc_figures()["free"]
        assert free >= count * size * 0.9, "the freed blocks are not held by the heap"
        before = _rss()
        assert heap.trim()
        assert before - _rss() >= count * size // 2, "the trim gave back less than half"
    finally:
        libc.free(pin)


@glibc
def test_malloc_figures_count_a_mapped_block() -> None:
    libc = heap._libc()
    assert libc is not None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = heap.malloc_figures()
    block = libc.malloc(64 << 20)  # over the mmap threshold: mapped apart
    try:
        after = heap.malloc_figures()
        assert after["mapped"] - before["mapped"] >= 64 << 20
        assert after["in_use"] - before["in_use"] < 1 << 20  # the arenas' own, not mapped ones
    finally:
        libc.free(block)


async def test_trims_and_sheds_after_a_swap_and_trims_after_a_snapshot_off_the_loop(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    calls: list[tuple[int, str, int]] = []  # (thread, its name, the index's trained_at)
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")

        def trim() -> bool:
            me = threading.current_thread()
            calls.append((me.ident or 0, me.name, coll.index.trained_at))
            return False

        def shed_blocks(mem: RocksMemory) -> None:
            me = threading.current_thread()
            shed.append((me.ident or 0, me.name, coll.index.trained_at))

        shed: list[tuple[int, str, int]] = []
        monkeypatch.setattr(collection_module, "trim", trim)
        monkeypatch.setattr(collection_module, "shed_blocks", shed_blocks)
        await coll.write({0: [doc(i) for i in range(150)]})
        await settled(coll)
        # After the swap, on the training's thread: the trained index serves by then.
        await wait_for(lambda: any(name.startswith(BACKGROUND_THREADS) and at == 150
                                   for _, name, at in calls), 30, what="a trim after the swap")
        # The blocks the load left in RocksDB's cache dropped after it, off the loop too.
        assert [(name[:len(BACKGROUND_THREADS)], at) for _, name, at in shed] == \
            [(BACKGROUND_THREADS, 150)]
        calls.clear()
        await coll.write({0: [doc(150)]})
        await coll.snapshot()
        assert calls, "no trim after the snapshot"
        assert all(t != loop_thread for t, _, _ in calls), "a trim ran on the event loop"
    finally:
        await engine.close()


def test_shed_blocks_empties_the_cache_and_keeps_its_capacity(tmp_path: Path) -> None:
    """Blocks read through the cache (table files' data, index and filter blocks) leave it,
    and the rows leave the row cache; the capacities are what they were, and reads fill
    them again."""
    mem = RocksMemory(64 * MIB)
    store = Store(tmp_path / "db", fsync=False, memory=mem)
    store.open()
    try:
        fill(store, 0, 4000)
        store.db.flush(True)  # into a table file: reads now go through the block cache
        ids = [f"k{i}" for i in range(4000)]

        def read() -> None:
            for i in ids:
                store.db.get(doc_key(0, i))

        read()
        assert mem.used() > 2 * MIB
        assert mem.rows_used() > MIB  # the values read, as rows
        heap.shed_blocks(mem)
        assert mem.used() - mem.memtables() < MIB  # the memtables' charges stay
        assert mem.rows_used() == 0
        assert store.db.property_int_value("rocksdb.block-cache-capacity") == 56 * MIB
        read()
        assert mem.used() > 2 * MIB
    finally:
        store.close()


async def test_the_trim_after_a_compaction_waits_for_rocksdbs_flush_to_end(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction's swap flushes the memtables; RocksDB's threads free what the flush (and
    the compactions it starts) allocated once it ends, after a trim made at once, and no
    snapshot follows a compaction to trim again: the trim waits for RocksDB to be idle."""
    from tests.test_index_compaction import SPEC as KSPEC
    from tests.test_index_compaction import TUNING as KTUNING
    from tests.test_index_compaction import docs, pause

    engine = Engine(tmp_path, blocking, KTUNING, fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(KSPEC, [0, 1], "u")
        await coll.write(docs(range(200)))
        await settled(coll, what="the first training")
        await coll.write(docs(range(200, 300)))
        events: list[str] = []
        busy_left = [5]  # RocksDB "busy" for the first five looks

        def busy() -> bool:
            busy_left[0] -= 1
            events.append("busy" if busy_left[0] >= 0 else "idle")
            return busy_left[0] >= 0

        def trim() -> bool:
            events.append("trim")
            return False

        monkeypatch.setattr(coll, "_rocksdb_busy", busy)
        monkeypatch.setattr(collection_module, "trim", trim)
        pause(coll)
        await wait_for(lambda: coll.compactions == 1 and not coll.compacting, 30,
                       what="the compaction")
        assert events.count("busy") == 5 and "trim" in events
        assert events.index("trim") > events.index("idle") > events.index("busy"), events
    finally:
        await engine.close()
