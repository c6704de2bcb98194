"""Review of t-arena's storage changes: a shard's digests in numpy (`DigestTable`), a write's
index rows as views of its batch's array, the replay's smaller chunk.

- The digests in memory, the stored ones (key G, 16 big-endian bytes) and the ones computed
  from the records agree after writes, deletes, a release, a purge, a restart and a shard
  moved out and back in; the digest exchange answers the same from memory as from a scan.
- A write the store refuses changes neither the digests in memory nor the stored ones.
- Whatever the parse path of the batch (documents fast and general, columnar fast and
  general), the index holds exactly the vectors stored (prepared for the metric), and the
  batch's array is left as it was (cosine normalises a copy).
- A replay in chunks of any size leaves the index a replay in one would.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.cluster.model.digests import BUCKETS, digests
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.operations import DocBatch
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.http.columnar import parse_columnar, parse_columnar_fast
from aquila.node.http.fastparse import parse_documents_fast
from aquila.node.http.parse import parse_documents
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex, global_key, prepare

DIM = 8
SPEC = CollectionSpec("c", DIM, "l2", 2, 1, IndexSpec("flat"))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[Engine, Blocking]]:
    blocking = Blocking(2)
    eng = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await eng.start()
    try:
        yield eng, blocking
    finally:
        await eng.close()
        blocking.close()


def docs(ids: range, version: int, seed: int) -> list[Incoming]:
    x = np.random.default_rng(seed).standard_normal((len(ids), DIM)).astype(np.float32)
    return [Incoming(f"d{i}", x[j], orjson.dumps({"i": i}), version, "n1")
            for j, i in enumerate(ids)]


def deletes(ids: range, version: int) -> list[Incoming]:
    return [Incoming(f"d{i}", None, b"", version, "n1") for i in ids]


def scanned(coll: Collection, s: int) -> list[int]:
    return [int(h, 16) for h in digests(
        ((d, r.version, r.writer) for d, r in coll.store.iter_docs(s)), BUCKETS)]


async def agree(coll: Collection, blocking: Blocking) -> None:
    """Memory, store and records agree on every shard's digests, and the exchange says so."""
    for s, shard in coll.shards.items():
        scan = await blocking.write(scanned, coll, s)
        stored = await blocking.write(coll.store.digests, s, BUCKETS)
        assert shard.digests.tolist() == stored == scan
        assert await coll.digests(s, BUCKETS) == [format(v, "032x") for v in scan]
        assert await coll.digests(s, 16) == await blocking.write(coll._digests_sync, s, 16)
    # Both 64-bit words of some bucket past 2**63: the unsigned halves are exercised.
    words = np.concatenate([sh.digests._words for sh in coll.shards.values()])
    assert (words[:, 0] >= 1 << 63).any() and (words[:, 1] >= 1 << 63).any()


async def test_digests_agree_in_memory_store_and_records_through_every_path(
        engine: tuple[Engine, Blocking], tmp_path: Path) -> None:
    eng, blocking = engine
    coll = await eng.ensure(SPEC, [0, 1], "u1")
    await coll.write({0: docs(range(0, 40), 1, 1), 1: docs(range(40, 80), 1, 2)})
    # Writes of one shard queued together: one group commit, their changes added up.
    await asyncio.gather(coll.write({0: docs(range(0, 10), 2, 3), 1: deletes(range(40, 50), 2)}),
                         coll.write({0: docs(range(80, 90), 1, 6)}),
                         coll.write({0: deletes(range(20, 25), 2)}))
    await agree(coll, blocking)
    await coll._save()
    await coll.release_labels()
    await coll.write({1: docs(range(40, 45), 3, 4)})  # revived: free labels taken
    await agree(coll, blocking)
    await coll._save()
    assert await coll.purge_tombstones(1, 10) == 5
    await agree(coll, blocking)
    # Restart: the digests are read back from the store.
    await eng.close()
    eng2 = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await eng2.start()
    try:
        coll2 = eng2.get("c")
        assert coll2 is not None
        await agree(coll2, blocking)
        kept = coll2.shards[1].digests.tolist()
        await eng2.drop_shard("c", 1)
        await coll2.add_shards([1])  # moved back in: nothing of it left, all zeros
        assert coll2.shards[1].digests.tolist() == [0] * BUCKETS != kept
        await coll2.write({1: docs(range(40, 80), 9, 5)})
        await agree(coll2, blocking)
    finally:
        await eng2.close()


async def test_a_write_the_store_refuses_changes_no_digest(
        engine: tuple[Engine, Blocking], monkeypatch: pytest.MonkeyPatch) -> None:
    eng, blocking = engine
    coll = await eng.ensure(SPEC, [0, 1], "u1")
    await coll.write({0: docs(range(0, 30), 1, 1)})
    before = {s: sh.digests.tolist() for s, sh in coll.shards.items()}
    real = coll.store.write

    def refuse(batch: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(coll.store, "write", refuse)
    with pytest.raises(OSError):
        await coll.write({0: docs(range(0, 60), 2, 2), 1: deletes(range(0, 5), 2)})
    monkeypatch.setattr(coll.store, "write", real)
    for s, sh in coll.shards.items():
        assert sh.digests.tolist() == before[s]
        assert await blocking.write(coll.store.digests, s, BUCKETS) == before[s]
    await coll.write({0: docs(range(0, 60), 3, 3), 1: docs(range(100, 120), 1, 4)})
    await agree(coll, blocking)


def _bodies(x: np.ndarray) -> dict[str, Callable[[], DocBatch | None]]:
    n = len(x)
    ids = [f"d{i}" for i in range(n)]
    documents = {"documents": [{"id": i, "vector": v.tolist(), "metadata": {"i": j}}
                               for j, (i, v) in enumerate(zip(ids, x, strict=True))]}
    columnar = {"ids": ids, "vectors_b64": base64.b64encode(x.astype("<f4").tobytes()).decode(),
                "metadata": [{"i": j} for j in range(n)]}
    return {
        "documents_fast": lambda: parse_documents_fast(orjson.dumps(documents), DIM),
        "documents": lambda: parse_documents(documents, DIM),
        "columnar_fast": lambda: parse_columnar_fast(orjson.dumps(columnar), DIM),
        "columnar": lambda: parse_columnar(columnar, DIM),
    }


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize("path", ["documents_fast", "documents", "columnar_fast", "columnar"])
async def test_the_index_holds_the_stored_vectors_whatever_the_parse_path(
        engine: tuple[Engine, Blocking], metric: str, path: str) -> None:
    eng, blocking = engine
    spec = CollectionSpec("c", DIM, metric, 1, 1, IndexSpec("flat"))
    coll = await eng.ensure(spec, [0], "u1")
    x = np.random.default_rng(7).standard_normal((50, DIM)).astype(np.float32) * 3
    batch = _bodies(x)[path]()
    assert batch is not None
    sent = batch.vectors.copy()
    incoming = [Incoming(i, batch.vectors[j], m, 1, "n1")
                for j, (i, m) in enumerate(zip(batch.ids, batch.metadata, strict=True))]
    assert np.shares_memory(incoming[0].vector, batch.vectors)  # views of the batch
    await coll.write({0: incoming})
    np.testing.assert_array_equal(batch.vectors, sent)  # left as it was
    recs = await blocking.write(coll.store.get_records, 0, batch.ids)
    stored = np.stack([r.vector_array() for r in recs if r is not None])
    np.testing.assert_array_equal(stored, x)
    keys = np.array([global_key(0, r.label) for r in recs if r is not None], np.int64)
    held = await blocking.write(coll.index.vectors_of, keys)
    np.testing.assert_array_equal(held, prepare(stored, metric))


@pytest.mark.parametrize("chunk", [1, 3, 2048])
async def test_a_replay_in_chunks_is_a_replay_in_one(
        engine: tuple[Engine, Blocking], chunk: int) -> None:
    eng, blocking = engine
    coll = await eng.ensure(SPEC, [0, 1], "u1")
    await coll.write({0: docs(range(0, 20), 1, 1)})
    await coll._save()
    await coll.write({0: docs(range(10, 30), 2, 2)})
    await coll.write({0: deletes(range(0, 5), 3)})
    await coll._save()
    await coll.release_labels()
    await coll.write({0: docs(range(0, 3), 4, 3) + docs(range(30, 33), 4, 4)})  # labels reused
    shard = coll.shards[0]

    def replayed(size: int | None) -> tuple[list[int], np.ndarray]:
        new = VectorIndex.flat(DIM, "l2", SPEC.shards)
        if size is None:
            coll._apply_sync(shard.changes_after(0), new)
        else:
            for ops in shard.replay(0, size):
                coll._apply_sync(ops, new)
        keys = np.sort(new.all_keys())
        return keys.tolist(), new.vectors_of(keys)

    whole = await blocking.write(replayed, None)
    parts = await blocking.write(replayed, chunk)
    assert parts[0] == whole[0] == sorted(coll.index.all_keys().tolist())
    np.testing.assert_array_equal(parts[1], whole[1])


class _SyncFails:
    """A store's database whose WAL fsync fails `times` times (the batch itself is written:
    RocksDB wrote it to the WAL and the memtable before the fsync, and reads see it)."""

    def __init__(self, db: Any, times: int = 1) -> None:
        self._db, self.times = db, times

    def flush_wal(self, sync: bool) -> None:
        if self.times:
            self.times -= 1
            raise OSError("fsync of the WAL failed")
        self._db.flush_wal(sync)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


async def _whole(coll: Collection, blocking: Blocking) -> None:
    """Labels and change-log positions are each one record's; memory's count, digests and
    index follow the store's records."""
    for s, shard in coll.shards.items():
        recs = dict(await blocking.write(lambda s=s: list(coll.store.iter_docs(s))))
        labels = [r.label for r in recs.values() if r.label]
        assert len(labels) == len(set(labels)), recs
        seqs = sorted(r.seq for r in recs.values())
        assert len(seqs) == len(set(seqs)) and seqs[-1] < shard.next_seq
        assert [q for q, _ in await blocking.write(
            lambda s=s: list(coll.store.iter_changes(s, 0)))] == seqs
        live = sorted(global_key(s, r.label) for r in recs.values() if not r.tombstone)
        assert shard.count == len(live)
        assert sorted(k for k in coll.index.all_keys().tolist() if k >> 40 == s) == live
    await agree(coll, blocking)


async def test_a_write_whose_wal_fsync_fails_is_followed_by_memory(tmp_path: Path) -> None:
    """The batch is in the store (readable, kept by a restart unless the machine fails) when
    the WAL's fsync fails: the writers hear of the failure, but the counters, digests and
    index follow the store, or the next write takes the same labels and change-log positions
    (two documents on one label: one's vector lost, the other's deleted with it) and writes
    digests that leave the failed write's changes out."""
    blocking = Blocking(2)
    eng = Engine(tmp_path, blocking, Tuning(), fsync=True)
    await eng.start()
    try:
        coll = await eng.ensure(SPEC, [0, 1], "u1")
        await coll.write({0: docs(range(0, 20), 1, 1), 1: docs(range(20, 40), 1, 2)})
        failing = _SyncFails(coll.store._db)
        coll.store._db = failing  # type: ignore[assignment]
        with pytest.raises(Exception, match="fsync"):
            await coll.write({0: docs(range(40, 50), 1, 3) + deletes(range(0, 3), 2),
                              1: docs(range(20, 25), 2, 4)})
        await coll.write({0: docs(range(50, 60), 1, 5), 1: docs(range(60, 70), 1, 6)})
        await _whole(coll, blocking)
        # A purge whose fsync fails: the digests in memory follow its batch too.
        await coll._save()
        failing.times = 1
        with pytest.raises(Exception, match="fsync"):
            await coll.purge_tombstones(0, 10)
        await coll.write({0: docs(range(0, 3), 5, 7)})
        await _whole(coll, blocking)
        coll.store._db = failing._db
    finally:
        await eng.close()
        blocking.close()
