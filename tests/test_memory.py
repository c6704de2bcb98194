"""Memory bounded by the live documents (issue 14): a document upserted and then deleted
costs nothing in the shard's Python state once the delete is durable (one bit of the live
bitmap per label given aside, a label given again once its tombstone is purged:
tests/test_label_reuse.py); its tombstone lives in RocksDB, is purged after its grace
period, and the digests stay those a scan of the records gives, before and after a restart.
Start reads no record (the persisted bookkeeping rebuilds to exactly what a full scan gives)."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import tracemalloc
from pathlib import Path

import numpy as np
import orjson
import pytest

from aquila.cluster.model.digests import BUCKETS, digests
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex, global_keys
from aquila.node.storage.store import LAYOUT, Store, label_key
from aquila.node.storage.training import compacted
from tests.conftest import settled

SHARDS = 2
DIM = 8


def docs(prefix: str, n: int, rng: np.random.Generator, version: int = 1) -> dict[int, list[Incoming]]:
    by: dict[int, list[Incoming]] = {}
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    for i in range(n):
        doc_id = f"{prefix}{i}"
        meta = orjson.dumps({"g": i % 10})
        by.setdefault(shard_of(doc_id, SHARDS), []).append(
            Incoming(doc_id, x[i], meta, version, "n"))
    return by


def deletes(prefix: str, n: int, version: int) -> dict[int, list[Incoming]]:
    by: dict[int, list[Incoming]] = {}
    for i in range(n):
        doc_id = f"{prefix}{i}"
        by.setdefault(shard_of(doc_id, SHARDS), []).append(Incoming(doc_id, None, b"", version, "n"))
    return by


def scanned_digests(coll: Collection, shard: int) -> list[int]:
    return [int(h, 16) for h in digests(
        ((d, r.version, r.writer) for d, r in coll.store.iter_docs(shard)), BUCKETS)]


def storage_bytes() -> int:
    """Bytes allocated from node/storage's code (numpy arrays included) and still held
    (garbage collected first; slow: run on a thread, not the event loop)."""
    gc.collect()
    kept = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, "*/node/storage/*")])
    return sum(stat.size for stat in kept.statistics("filename"))


async def churn(coll: Collection, rounds: int, per: int, start: int,
                rng: np.random.Generator) -> None:
    for r in range(start, start + rounds):
        # (Built on a thread: under tracemalloc it takes long enough to hold the loop up.)
        await coll.write(await asyncio.to_thread(docs, f"c{r}-", per, rng, 10))
        await coll.write(await asyncio.to_thread(deletes, f"c{r}-", per, 11))


async def test_churn_leaves_no_trace_in_memory(tmp_path: Path, blocking: Blocking) -> None:
    rng = np.random.default_rng(3)
    engine = Engine(tmp_path, blocking, Tuning(train_min=1000), fsync=False)
    await engine.start()
    spec = CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec("ivf_flat", 16, 4))
    coll = await engine.ensure(spec, range(SHARDS), "u")
    await coll.write(docs("live", 3000, rng))
    await settled(coll, what="training")
    flt = parse_filter({"must": [{"key": "g", "match": 3}]})
    assert flt is not None
    q = rng.standard_normal((4, DIM)).astype(np.float32)
    # A tracemalloc snapshot and the garbage collection before it hold the GIL for a second
    # or more on a busy machine, from a thread: the loop waits for the GIL meanwhile, which the
    # blocked-loop check would take for work done on the loop. Nothing here runs on the loop.
    loop = asyncio.get_running_loop()
    loop.slow_callback_duration = 10.0
    tracemalloc.start()
    try:
        # Warm up: the payload index, a cached match set, the structures' capacities.
        await coll.search(q, 5, None, flt)
        await churn(coll, 10, 500, 0, rng)
        before = await asyncio.to_thread(storage_bytes)
        await churn(coll, 60, 500, 10, rng)
        await coll.search(q, 5, None, flt)
        after = await asyncio.to_thread(storage_bytes)
    finally:
        tracemalloc.stop()
        loop.slow_callback_duration = 0.5
    churned = 60 * 500
    # One bit per label given stays (the live bitmap, a cached filter's bitmap: 0.4 bytes a
    # document with their growth), and what the last write and search left around; a
    # per-document dict entry (id, metadata) would be a hundred bytes or more each.
    assert after - before < churned, (before, after)
    assert coll.count() == 3000 and coll.index.ntotal == 3000
    for s, shard in coll.shards.items():
        assert len(shard.live_labels()) == shard.count
        assert shard.payload.keys[("g",)].numbers() == shard.count
        assert shard.digests == await asyncio.to_thread(scanned_digests, coll, s)
    # A restart reads the counters and digests back, not the records: the same figures.
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(train_min=1000), fsync=False)
    await engine.start()
    coll = engine.get("c")
    for s, shard in coll.shards.items():
        assert shard.digests == await asyncio.to_thread(scanned_digests, coll, s)
        assert len(shard.live_labels()) == shard.count
    assert coll.count() == 3000
    # Purging the tombstones takes their keys (label map included) and keeps digests right.
    purged = sum([await coll.purge_tombstones(s, 12) for s in range(SHARDS)])
    assert purged == 70 * 500
    for s, shard in coll.shards.items():
        assert shard.digests == await asyncio.to_thread(scanned_digests, coll, s)
        labels = [k for k, _ in coll.store._scan(label_key(s, 0)[:3])]
        assert len(labels) == shard.count
    rows = await coll.search(q, 5, None)
    assert all(len(r) == 5 and all(h.id.startswith("live") for h in r) for r in rows)
    await engine.close()


async def test_a_store_of_the_old_layout_is_upgraded_once(tmp_path: Path, blocking: Blocking
                                                           ) -> None:
    """A store written before label keys and stored digests existed: the first start writes
    them from one scan, and searches then find every document by its id."""
    rng = np.random.default_rng(5)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    spec = CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec("flat"))
    coll = await engine.ensure(spec, range(SHARDS), "u")
    await coll.write(docs("d", 300, rng))
    await coll.write(deletes("d", 100, version=2))
    want = {s: await asyncio.to_thread(scanned_digests, coll, s) for s in range(SHARDS)}
    await engine.close()
    # Back to layout 1: no L, G or F keys.
    store = Store(tmp_path / "collections" / "c" / "db", fsync=False)
    store.open()
    for tag in (b"L", b"G"):
        for key, _ in list(store._scan(tag)):
            store.db.delete(key)
    store.db.delete(b"F")
    store.close()
    (tmp_path / "collections" / "c" / "index.faiss").unlink(missing_ok=True)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = engine.get("c")
    assert coll.store.layout() == LAYOUT
    for s, shard in coll.shards.items():
        assert shard.digests == want[s]
    rows = await coll.search(rng.standard_normal((3, DIM)).astype(np.float32), 200, None)
    assert all(len(r) == 200 for r in rows)
    assert {h.id for h in rows[0]} == {f"d{i}" for i in range(100, 300)}
    await engine.close()


def live_by_scan(coll: Collection, shard: int) -> list[int]:
    return sorted(r.label for _, r in coll.store.iter_docs(shard) if not r.tombstone)


@pytest.mark.parametrize("damage", ["none", "stale", "staged", "flipped", "truncated", "missing"])
async def test_start_rebuilds_what_a_scan_gives(tmp_path: Path, blocking: Blocking,
                                                damage: str) -> None:
    """Whatever the snapshot (current, older than the change log, damaged, cut short, gone),
    a start gives each shard the live labels, counts and digests a full scan of the records
    gives, and searches find every live document by its id."""
    rng = np.random.default_rng(9)
    tuning = Tuning(train_min=500)
    engine = Engine(tmp_path, blocking, tuning, fsync=False)
    await engine.start()
    spec = CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec("ivf_flat", 8, 8))
    coll = await engine.ensure(spec, range(SHARDS), "u")
    await coll.write(docs("a", 800, rng))
    await settled(coll, what="training")
    await coll.snapshot()
    snap = coll.snap_path.read_bytes()
    await coll.write(docs("b", 300, rng))
    await coll.write(deletes("a", 200, version=2))
    await coll.write(docs("a", 100, rng, version=3))  # some deleted ones come back
    await engine.close()  # writes a current snapshot
    path = tmp_path / "collections" / "c" / "index.faiss"
    if damage == "stale":
        path.write_bytes(snap)
    elif damage == "staged":  # killed between a snapshot's write and its rename
        (path.parent / f".{path.name}.x1y2z3.tmp").write_bytes(path.read_bytes())
        path.write_bytes(snap)
    elif damage == "flipped":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: len(snap) // 2])
    elif damage == "missing":
        path.unlink()
    engine = Engine(tmp_path, blocking, tuning, fsync=False)
    await engine.start()
    coll = engine.get("c")
    assert not list(path.parent.glob("*.tmp"))
    assert coll.count() == 800 - 200 + 100 + 300
    for s, shard in coll.shards.items():
        assert shard.live_labels().tolist() == await asyncio.to_thread(live_by_scan, coll, s)
        assert shard.digests == await asyncio.to_thread(scanned_digests, coll, s)
    rows = await coll.search(rng.standard_normal((2, DIM)).astype(np.float32), 1000, 8)
    want = {f"a{i}" for i in (*range(100), *range(200, 800))} | {f"b{i}" for i in range(300)}
    assert {h.id for h in rows[0]} == want
    await engine.close()


async def test_counters_of_a_group_commit_survive_a_restart(tmp_path: Path, blocking: Blocking
                                                             ) -> None:
    """Writes queued together are made durable in one batch: a shard written by several of
    them stores the counters and digests of all of them, not of the last alone."""
    rng = np.random.default_rng(11)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    spec = CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec("flat"))
    coll = await engine.ensure(spec, range(SHARDS), "u")
    await asyncio.gather(*(coll.write(docs(f"g{w}-", 50, rng)) for w in range(5)))
    assert coll.count() == 250
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = engine.get("c")
    assert coll.count() == 250
    for s, shard in coll.shards.items():
        assert shard.count == len(await asyncio.to_thread(live_by_scan, coll, s))
        assert shard.digests == await asyncio.to_thread(scanned_digests, coll, s)
    await engine.close()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def test_a_trained_index_is_compacted_to_its_size(tmp_path: Path) -> None:
    """Added to chunk by chunk, each inverted list grows by doubling and holds a third or so
    more than its vectors (what a restart from the snapshot never has); the compacted index
    answers the same and holds no more than its vectors, ids and id map, and the scratch
    file is gone."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc's mallinfo2 is needed to count the heap")
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        m = libc.mallinfo2()
        return int(m.uordblks + m.hblkhd)

    dim, n = 32, 60_000
    spec = CollectionSpec("c", dim, "l2", 1, 1, IndexSpec("ivf_flat"))
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    index = VectorIndex.new_ivf(spec, 64, n)
    index.index.train(x[: 64 * 64])
    gc.collect()
    base = in_use()
    for lo in range(0, n, 500):
        index.add(x[lo:lo + 500], global_keys(0, np.arange(lo, lo + 500)))
    grown = in_use() - base
    scores, keys = index.search(x[:50], 10, 8)
    out = compacted(index, tmp_path / ".compact.tmp")
    gc.collect()
    held = in_use() - base
    raw = n * (dim * 4 + 8)  # codes and ids
    assert grown > 1.2 * raw  # the doubling's slack (besides the id map's ~40 B a vector)
    assert held < grown - 0.15 * raw, (grown, held, raw)
    s2, k2 = out.search(x[:50], 10, 8)
    assert (k2 == keys).all() and np.allclose(s2, scores)
    assert list(tmp_path.iterdir()) == []
    assert np.allclose(out.vectors_of(global_keys(0, np.arange(5))), x[:5])  # the id map
    out.remove(global_keys(0, np.arange(5)))
    assert out.ntotal == n - 5


async def test_a_replay_goes_around_the_block_cache(tmp_path: Path, blocking: Blocking) -> None:
    """The records a replay reads (the writes made during a training, the tail a start
    replays) are read once: they do not take the block cache, which keeps what searches
    read (a training's catch-up filled all 128 MiB of it after a bulk load)."""
    engine = Engine(tmp_path, blocking, Tuning(train_min=10**9), fsync=False)
    await engine.start()
    coll = await engine.ensure(CollectionSpec("c", 64, "l2", 1, 1, IndexSpec("ivf_flat")),
                               [0], "u")
    x = np.random.default_rng(3).standard_normal((20_000, 64)).astype(np.float32)
    for lo in range(0, len(x), 2000):
        await coll.write({0: [Incoming(f"d{i}", x[i], b"{}", 1, "n")
                              for i in range(lo, lo + 2000)]})
    await asyncio.to_thread(coll.store.db.flush)
    await asyncio.to_thread(coll.store.vdb.flush)  # the vectors' column family
    before = coll.store.memory_bytes()["block_cache"]
    ops = await asyncio.to_thread(lambda: list(coll.shards[0].replay(0)))
    assert sum(len(o.add_keys) for o in ops) == len(x)
    assert coll.store.memory_bytes()["block_cache"] - before < 1 << 20
    # A cached read of the same records fills it.
    await asyncio.to_thread(coll.store.get_records, 0, [f"d{i}" for i in range(len(x))])
    assert coll.store.memory_bytes()["block_cache"] - before > 4 << 20
    await engine.close()
