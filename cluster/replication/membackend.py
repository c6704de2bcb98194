"""A node's shards in memory: the in-process twin of the engine (`node.storage.backend.EngineBackend`)
behind the same `ShardBackend` protocol, so that `LocalReplica`, the write and read paths,
rebalance, healing and repair run unchanged over many nodes in one process.

Real semantics, small scale: documents per shard with last-writer-wins versions and
tombstones, digests over the records, exact (brute-force) search with the index's scores
(squared L2 ascending; inner product or cosine similarity descending). Nothing is durable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.digests import bucket_of, digests, newer
from aquila.cluster.model.documents import Found, Hit, Incoming, StaleFound
from aquila.cluster.model.errors import Unavailable
from aquila.cluster.model.spec import CollectionSpec


@dataclass
class _Collection:
    spec: CollectionSpec
    uid: str
    shards: dict[int, dict[str, Incoming]] = field(default_factory=dict)
    # Shards dropped or taken on (the engine's `Collection.relabelled`): a `Found` taken
    # before is not read after.
    relabelled: int = 0


def _admits(d: Incoming, predicate: Callable[[Any], bool] | None) -> bool:
    return d.vector is not None and (predicate is None or predicate(orjson.loads(d.metadata)))


class MemoryBackend:
    def __init__(self, scan_limit: int = 20_000) -> None:
        self.collections: dict[str, _Collection] = {}
        # Records one scroll page may look at (the engine's paging.SCAN_LIMIT).
        self.scan_limit = scan_limit

    def _open(self, name: str, shards: Iterable[int] = ()) -> _Collection:
        coll = self.collections.get(name)
        if coll is None:
            raise Unavailable(f"collection {name!r} is not open on this node yet")
        absent = [s for s in shards if s not in coll.shards]
        if absent:
            raise Unavailable(f"shard(s) {absent} of {name!r} are not on this node")
        return coll

    def has(self, name: str) -> bool:
        return name in self.collections

    def local_shards(self, name: str) -> list[int]:
        coll = self.collections.get(name)
        return sorted(coll.shards) if coll is not None else []

    async def ensure(self, spec: CollectionSpec, shards: Iterable[int], uid: str) -> None:
        coll = self.collections.get(spec.name)
        if coll is not None and (coll.spec != spec or coll.uid != uid):
            coll = None  # another incarnation of the name: its data goes
        if coll is None:
            coll = self.collections[spec.name] = _Collection(spec, uid)
        for s in shards:
            if s not in coll.shards:
                coll.shards[s] = {}
                coll.relabelled += 1

    async def drop_collection(self, name: str) -> None:
        self.collections.pop(name, None)

    async def drop_shard(self, name: str, shard: int) -> None:
        coll = self.collections.get(name)
        if coll is not None and coll.shards.pop(shard, None) is not None:
            coll.relabelled += 1

    async def write(
        self, spec: CollectionSpec, by_shard: dict[int, list[Incoming]]
    ) -> dict[int, tuple[int, int]]:
        coll = self._open(spec.name, by_shard)
        out = {}
        for shard, docs in by_shard.items():
            held = coll.shards[shard]
            applied = deleted = 0
            for d in docs:
                old = held.get(d.id)
                if not newer(d, old):
                    continue
                was_live = old is not None and old.vector is not None
                held[d.id] = d
                # As the engine counts: a tombstone of nothing live changes no document.
                applied += int(d.vector is not None or was_live)
                deleted += int(d.vector is None and was_live)
            out[shard] = (applied, deleted)
        return out

    async def get(self, spec: CollectionSpec, shard: int, doc_id: str) -> Hit | None:
        d = self._open(spec.name, [shard]).shards[shard].get(doc_id)
        if d is None or d.vector is None:
            return None
        return Hit(doc_id, 0.0, d.metadata, d.vector.astype("<f4").tobytes())

    async def search(
        self,
        spec: CollectionSpec,
        queries: np.ndarray,
        k: int,
        nprobe: int | None,
        predicate: Callable[[Any], bool] | None,
        shards: Iterable[int],
        with_vectors: bool = False,
        plans: dict[int, dict[str, Any]] | None = None,
        recall: float | None = None,
        *,
        inline: bool = False,  # every search here is on the calling thread
    ) -> list[list[Hit]]:
        wanted = sorted(shards)
        coll = self._open(spec.name, wanted)
        docs: list[tuple[int, Incoming, np.ndarray]] = [
            (s, d, d.vector) for s in wanted for d in coll.shards[s].values()
            if d.vector is not None
            and (predicate is None or predicate(orjson.loads(d.metadata)))
        ]
        if plans is not None:  # every search here is brute force over the matches
            for s in wanted:
                live = sum(1 for d in coll.shards[s].values() if d.vector is not None)
                plans[s] = {"shard": s, "documents": live, "path": "unfiltered"}
                if predicate is not None:
                    plans[s] |= {"path": "exact", "matches": sum(1 for x, _, _ in docs if x == s)}
        if not docs:
            return [[] for _ in range(len(queries))]
        x = np.vstack([v for _, _, v in docs]).astype(np.float32)
        q = np.asarray(queries, dtype=np.float32)
        if spec.metric == "l2":
            scores = (q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None, :]
        else:
            if spec.metric == "cosine":
                x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
                q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
            scores = -(q @ x.T)  # negated: ascending order is best first
        sign = 1.0 if spec.metric == "l2" else -1.0
        out = []
        for row in scores.tolist():
            order = sorted(range(len(docs)), key=lambda i: (row[i], docs[i][1].id))[:k]
            out.append([
                Hit(docs[i][1].id, sign * row[i], docs[i][1].metadata,
                    docs[i][2].astype("<f4").tobytes() if with_vectors else b"", docs[i][0])
                for i in order
            ])
        return out

    async def search_found(
        self,
        spec: CollectionSpec,
        queries: np.ndarray,
        k: int,
        nprobe: int | None,
        shards: Iterable[int],
        plans: dict[int, dict[str, Any]] | None = None,
        recall: float | None = None,
        *,
        inline: bool = False,
    ) -> Found:
        """`search`'s hits as keys: positions in a table of (shard, id) the `Found` carries as
        its token, so that `read_found` reads each as the engine does, as it is then: None
        once deleted, as written since when written again (the engine's document keeps its
        label when written again)."""
        rows = await self.search(spec, queries, k, nprobe, None, shards, False, plans, recall)
        coll = self._open(spec.name)
        table: list[tuple[int, str]] = []
        keys: list[list[int]] = []
        for row in rows:
            keys.append(list(range(len(table), len(table) + len(row))))
            table.extend((h.shard, h.id) for h in row)
        return Found([[h.score for h in row] for row in rows], keys,
                     [[h.shard for h in row] for row in rows], (coll, coll.relabelled, table))

    async def read_found(
        self, spec: CollectionSpec, found: Found, keys: list[int], with_vectors: bool
    ) -> list[Hit | None]:
        coll = self._open(spec.name)
        token = found.token
        assert isinstance(token, tuple)
        table: list[tuple[int, str]] = token[2]
        if token[0] is not coll:
            raise StaleFound(f"{spec.name!r} was created again since the search")
        if token[1] != coll.relabelled:
            raise StaleFound(f"shards of {spec.name!r} were dropped or taken on since")
        out: list[Hit | None] = []
        for key in keys:
            shard, doc_id = table[key]
            d = coll.shards.get(shard, {}).get(doc_id)
            if d is None or d.vector is None:
                out.append(None)
                continue
            out.append(Hit(doc_id, 0.0, d.metadata,
                           d.vector.astype("<f4").tobytes() if with_vectors else b"", shard))
        return out

    async def count(
        self, spec: CollectionSpec, shards: Iterable[int],
        predicate: Callable[[Any], bool] | None,
    ) -> dict[int, int]:
        wanted = sorted(shards)
        coll = self._open(spec.name, wanted)
        return {s: sum(1 for d in coll.shards[s].values() if _admits(d, predicate))
                for s in wanted}

    async def scroll(
        self, spec: CollectionSpec, shard: int, after: str | None, limit: int,
        predicate: Callable[[Any], bool] | None, with_vectors: bool,
    ) -> tuple[list[Hit], str | None]:
        held = self._open(spec.name, [shard]).shards[shard]
        out: list[Hit] = []
        # Live documents only, as the engine's scroll reads them (tombstones apart).
        ids = sorted(i for i, d in held.items()
                     if d.vector is not None and (after is None or i > after))
        for looked, doc_id in enumerate(ids, 1):
            d = held[doc_id]
            if _admits(d, predicate):
                assert d.vector is not None
                out.append(Hit(doc_id, 0.0, d.metadata,
                               d.vector.astype("<f4").tobytes() if with_vectors else b"", shard))
                if len(out) >= limit:
                    return out, doc_id
            if looked >= self.scan_limit:
                return out, doc_id
        return out, None

    def shard_stats(self, name: str) -> dict[int, dict[str, Any]]:
        coll = self.collections.get(name)
        if coll is None:
            return {}
        # Brute force: one list, as an engine's exact (flat) index reports it.
        index = {"nlist": 1, "trained_at": 0, "recall_curve": [], "nlist_target": 1,
                 "retrain_at": 0,
                 "vectors": sum(d.vector is not None for ds in coll.shards.values()
                                for d in ds.values())}
        return {
            s: {"shard": s, "count": sum(1 for d in docs.values() if d.vector is not None),
                "index_state": "trained", "index": index}
            for s, docs in sorted(coll.shards.items())
        }

    async def stream_shard(
        self, spec: CollectionSpec, shard: int, after_key: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        held = self._open(spec.name, [shard]).shards[shard]
        ids = sorted(i for i in held if after_key is None or i > after_key)
        page = ids[:limit]
        return [held[i] for i in page], (page[-1] if len(page) >= limit else None)

    async def shard_digests(self, spec: CollectionSpec, shard: int, buckets: int) -> list[str]:
        held = self._open(spec.name, [shard]).shards[shard]
        return digests(((d.id, d.version, d.writer) for d in held.values()), buckets)

    async def purge_tombstones(self, spec: CollectionSpec, shard: int, before: int) -> int:
        coll = self.collections.get(spec.name)
        if coll is None or shard not in coll.shards:
            return 0
        held = coll.shards[shard]
        gone = [i for i, d in held.items() if d.vector is None and d.version < before]
        for i in gone:
            del held[i]
        return len(gone)

    async def bucket_records(
        self, spec: CollectionSpec, shard: int, wanted: list[int], buckets: int
    ) -> list[Incoming]:
        held = self._open(spec.name, [shard]).shards[shard]
        want = set(wanted)
        return [d for i, d in sorted(held.items()) if bucket_of(i, buckets) in want]

    # -- for tests ------------------------------------------------------------------------
    def live_ids(self, name: str, shard: int | None = None) -> set[str]:
        coll = self.collections.get(name)
        if coll is None:
            return set()
        return {i for s, docs in coll.shards.items() if shard is None or s == shard
                for i, d in docs.items() if d.vector is not None}

    def tombstones(self, name: str) -> int:
        coll = self.collections.get(name)
        return 0 if coll is None else sum(
            1 for docs in coll.shards.values() for d in docs.values() if d.vector is None)
