"""A collection's local part on this node: its store, its local shards, their indexes, the
search batcher, and the background work (training, snapshots) that keeps them fast.

Concurrency: writes are serialised by `_write_mutex` (durable write, then index update);
index updates and swaps take `_rw.write()`, searches `_rw.read()`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson

from cluster.antientropy import bucket_of, digests
from cluster.docs import Hit, Incoming
from cluster.errors import Unavailable
from cluster.merge import merge_label_arrays
from cluster.spec import CollectionSpec
from node.batcher import SearchBatcher
from node.blocking import Blocking
from node.index import prepare
from node.locks import RWLock
from node.shard import IndexOps, Shard
from node.store import Record, Store, WriteBatch

log = logging.getLogger(__name__)

# Global key of a label within the node: shard in the high bits, label below.
_LABEL_BITS = 40
# A filtered search over at most this many matching documents is exact, by brute force.
_EXACT_FILTER_MAX = 50_000


@dataclass(frozen=True)
class Tuning:
    train_min: int = 4096
    retrain_growth: float = 4.0
    search_batch_rows: int = 512
    search_parallel: int = 2


class Collection:
    def __init__(
        self, spec: CollectionSpec, root: Path, blocking: Blocking, tuning: Tuning, fsync: bool
    ) -> None:
        self.spec = spec
        self.root = root
        self.store = Store(root / "db", fsync=fsync)
        self.blocking = blocking
        self.tuning = tuning
        self.shards: dict[int, Shard] = {}
        self._rw = RWLock()
        self._write_mutex = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._batcher: SearchBatcher[list[Hit]] = SearchBatcher(
            self._run_batch, max_rows=tuning.search_batch_rows, parallel=tuning.search_parallel
        )
        self.closed = False

    @property
    def larger_is_better(self) -> bool:
        return self.spec.metric != "l2"

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self, local_shards: Iterable[int]) -> None:
        (self.root / "index").mkdir(parents=True, exist_ok=True)
        await self.blocking.write(self._open_sync, sorted(set(local_shards)))
        self._maybe_train()

    def _open_sync(self, shards: list[int]) -> None:
        self.store.open()
        if self.store.get_meta() is None:
            self.store.put_meta(orjson.dumps(self.spec.to_json()))
        for s in shards:
            shard = Shard(self.spec, s, self.store, self.root / "index")
            shard.load()
            self.shards[s] = shard

    async def add_shard(self, s: int) -> None:
        if s in self.shards:
            return
        shard = Shard(self.spec, s, self.store, self.root / "index")
        await self.blocking.write(shard.load)
        async with self._rw.write():
            self.shards[s] = shard

    async def drop_shard(self, s: int) -> None:
        async with self._write_mutex, self._rw.write():
            shard = self.shards.pop(s, None)
            if shard is not None:
                await self.blocking.write(self.store.drop_shard, s)
                shard.snap_path.unlink(missing_ok=True)

    async def close(self, *, snapshot: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._write_mutex, self._rw.write():
            if snapshot:
                await self.blocking.write(self._snapshot_all)
            await self.blocking.write(self.store.close)

    def _snapshot_all(self) -> None:
        for shard in self.shards.values():
            if shard.applied_seq > shard.snapshot_seq:
                shard.snapshot()

    async def destroy(self) -> None:
        await self.close(snapshot=False)
        await self.blocking.write(shutil.rmtree, self.root, True)

    # -- writes ---------------------------------------------------------------------------
    async def write(self, by_shard: dict[int, list[Incoming]]) -> dict[int, tuple[int, int]]:
        """Upserts and deletes, durable on return; per shard (documents changed, live
        documents deleted)."""
        missing = [s for s in by_shard if s not in self.shards]
        if missing:
            raise Unavailable(f"shard(s) {missing} of {self.spec.name!r} are not on this node")
        async with self._write_mutex:
            ops = await self.blocking.write(self._write_sync, by_shard)
            async with self._rw.write():
                await self.blocking.write(self._apply_sync, ops)
        self._maybe_train()
        return {s: (o.applied, o.deleted) for s, o in ops.items()}

    def _write_sync(self, by_shard: dict[int, list[Incoming]]) -> dict[int, IndexOps]:
        batch = WriteBatch()
        before = {s: (self.shards[s].next_seq, self.shards[s].next_label) for s in by_shard}
        try:
            ops = {s: self.shards[s].prepare_writes(docs, batch) for s, docs in by_shard.items()}
            self.store.write(batch)
        except BaseException:
            for s, (seq, label) in before.items():
                self.shards[s].rollback(seq, label)
            raise
        return ops

    def _apply_sync(self, ops: dict[int, IndexOps]) -> None:
        for s, o in ops.items():
            self.shards[s].apply(o)

    # -- reads ----------------------------------------------------------------------------
    async def get(self, shard: int, doc_id: str) -> Record | None:
        recs = await self.blocking.search(self.store.get_records, shard, [doc_id])
        rec = recs[0]
        return None if rec is None or rec.tombstone else rec

    async def stream_shard(
        self, shard: int, after: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        """A page of the shard's records, tombstones included, in id order (for transfers
        and anti-entropy); the id to continue after, None at the end."""
        return await self.blocking.search(self._stream_sync, shard, after, limit)

    def _stream_sync(
        self, shard: int, after: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        out: list[Incoming] = []
        for doc_id, rec in self.store.iter_docs(shard, after):
            vec = None if rec.tombstone else rec.vector_array()
            out.append(Incoming(doc_id, vec, rec.metadata, rec.version, rec.writer))
            if len(out) >= limit:
                return out, doc_id
        return out, None

    async def digests(self, shard: int, buckets: int) -> list[str]:
        return await self.blocking.search(self._digests_sync, shard, buckets)

    def _digests_sync(self, shard: int, buckets: int) -> list[str]:
        return digests(
            ((doc_id, rec.version, rec.writer) for doc_id, rec in self.store.iter_docs(shard)),
            buckets,
        )

    async def bucket_records(self, shard: int, wanted: list[int], buckets: int) -> list[Incoming]:
        return await self.blocking.search(self._bucket_sync, shard, set(wanted), buckets)

    def _bucket_sync(self, shard: int, wanted: set[int], buckets: int) -> list[Incoming]:
        return [
            Incoming(doc_id, None if rec.tombstone else rec.vector_array(), rec.metadata,
                     rec.version, rec.writer)
            for doc_id, rec in self.store.iter_docs(shard)
            if bucket_of(doc_id, buckets) in wanted
        ]

    def count(self) -> int:
        return sum(s.count for s in self.shards.values())

    def shard_states(self) -> dict[int, dict[str, Any]]:
        return {
            n: {"shard": n, "count": s.count, "index_state": s.state.value}
            for n, s in sorted(self.shards.items())
        }

    async def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None,
        predicate: Callable[[Any], bool] | None = None,
        shards: Iterable[int] | None = None,
    ) -> list[list[Hit]]:
        """The best `k` hits per query over the given local shards (all when None)."""
        q = prepare(queries, self.spec.metric)
        probe = nprobe or self.spec.index.nprobe
        wanted = tuple(sorted(self.shards if shards is None else shards))
        if predicate is None:
            rows = await self._batcher.submit((probe, wanted), q, k)
            return [row[:k] for row in rows]
        async with self._rw.read():
            return await self.blocking.search(self._filtered_sync, q, k, probe, predicate, wanted)

    async def _run_batch(self, key: Hashable, q: np.ndarray, k: int) -> list[list[Hit]]:
        probe, wanted = cast(tuple[int, tuple[int, ...]], key)
        async with self._rw.read():
            return await self.blocking.search(self._search_sync, q, k, probe, wanted)

    def _search_sync(
        self, q: np.ndarray, k: int, nprobe: int, wanted: tuple[int, ...]
    ) -> list[list[Hit]]:
        parts = []
        for s in wanted:
            shard = self.shards.get(s)
            if shard is None or shard.count == 0:
                continue
            d, lab = shard.index.search(q, k, nprobe)
            parts.append((d, _global(s, lab)))
        return self._resolve(q, k, parts)

    def _filtered_sync(
        self,
        q: np.ndarray,
        k: int,
        nprobe: int,
        predicate: Callable[[Any], bool],
        wanted: tuple[int, ...],
    ) -> list[list[Hit]]:
        """The k best matching documents: exact over the matches when they are few enough,
        else an IVF search restricted to them, falling back to exact if it finds too few."""
        parts = []
        for s in wanted:
            shard = self.shards.get(s)
            if shard is None:
                continue
            labels: list[int] = []
            vecs: list[bytes] = []
            for _, rec in self.store.iter_docs(s):
                if not rec.tombstone and predicate(rec.metadata_obj()):
                    labels.append(rec.label)
                    vecs.append(rec.vector)
            if not labels:
                continue
            lab_arr = np.asarray(labels, dtype=np.int64)
            kk = min(k, len(labels))
            if len(labels) > _EXACT_FILTER_MAX and shard.index.trained:
                d, lab = shard.index.search(q, kk, nprobe, allowed=lab_arr)
                if (lab >= 0).sum(axis=1).min() >= kk:
                    parts.append((d, _global(s, lab)))
                    continue
            x = np.frombuffer(b"".join(vecs), dtype="<f4").reshape(len(labels), self.spec.dim)
            d, pos = _exact(prepare(x, self.spec.metric), q, kk, self.spec.metric)
            lab = np.where(pos >= 0, lab_arr[np.maximum(pos, 0)], -1)
            parts.append((d, _global(s, lab)))
        return self._resolve(q, k, parts)

    def _resolve(
        self, q: np.ndarray, k: int, parts: list[tuple[np.ndarray, np.ndarray]]
    ) -> list[list[Hit]]:
        """Merge the shards' answers and fetch the documents of the final hits."""
        if not parts:
            return [[] for _ in range(len(q))]
        scores, keys = merge_label_arrays(parts, k, larger_is_better=self.larger_is_better)
        mask = (1 << _LABEL_BITS) - 1
        rows: list[list[tuple[float, int, str]]] = []
        want: list[tuple[int, str]] = []
        for srow, krow in zip(scores.tolist(), keys.tolist(), strict=True):
            row = []
            for score, key in zip(srow, krow, strict=True):
                if key < 0:
                    break
                s = key >> _LABEL_BITS
                doc_id = self.shards[s].labels.get(key & mask)
                if doc_id is None:
                    continue
                row.append((score, s, doc_id))
                want.append((s, doc_id))
            rows.append(row)
        recs = dict(zip(want, self.store.get_records_multi(want), strict=True))
        out: list[list[Hit]] = []
        for row in rows:
            hits = []
            for score, s, doc_id in row:
                rec = recs[(s, doc_id)]
                if rec is not None and not rec.tombstone:
                    hits.append(Hit(doc_id, score, rec.metadata, rec.vector))
            out.append(hits)
        return out

    # -- background -----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _maybe_train(self) -> None:
        if self.closed:
            return
        for shard in self.shards.values():
            if shard.wants_training(self.tuning.train_min, self.tuning.retrain_growth):
                shard.training = True
                self._spawn(self._train(shard))

    async def _train(self, shard: Shard) -> None:
        """Train in the background while the current index serves; swap it in under the
        write mutex after replaying the writes that came meanwhile."""
        try:
            upto = shard.applied_seq
            log.info("%s/%d: training on %d vectors", self.spec.name, shard.shard, shard.count)
            new = await self.blocking.background(shard.train, upto)
            async with self._write_mutex, self._rw.write():
                if self.shards.get(shard.shard) is not shard:
                    return
                await self.blocking.write(shard.swap_in, new, upto)
            log.info("%s/%d: trained (nlist=%d)", self.spec.name, shard.shard, new.index.nlist)
        except Exception:
            log.exception("%s/%d: training failed", self.spec.name, shard.shard)
        finally:
            shard.training = False
        await self.snapshot(shard)
        self._maybe_train()

    async def snapshot(self, shard: Shard) -> None:
        if shard.applied_seq <= shard.snapshot_seq or self.closed:
            return
        async with self._write_mutex:
            await self.blocking.background(shard.snapshot)

    async def snapshot_dirty(self) -> None:
        for shard in list(self.shards.values()):
            if not shard.training:
                await self.snapshot(shard)


def _global(shard: int, labels: np.ndarray) -> np.ndarray:
    return np.where(labels >= 0, labels + (shard << _LABEL_BITS), -1)


def _exact(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    from node.index import faiss_metric

    d, i = faiss.knn(q, x, k, metric=faiss_metric(metric))
    return d, i
