"""The node's implementation of `cluster.replication.backend.ShardBackend` over its engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from aquila.cluster.model.documents import Found, Hit, Incoming
from aquila.cluster.model.errors import Unavailable
from aquila.cluster.model.spec import CollectionSpec
from aquila.node.storage.collection import Collection
from aquila.node.storage.engine import Engine


class EngineBackend:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _open(self, name: str) -> Collection:
        """The local collection; Unavailable (so the coordinator tries another replica) when
        the cluster state has it but this node has not opened it yet."""
        coll = self.engine.collections.get(name)
        if coll is None:
            raise Unavailable(f"collection {name!r} is not open on this node yet")
        return coll

    def has(self, name: str) -> bool:
        return name in self.engine.collections

    def local_shards(self, name: str) -> list[int]:
        coll = self.engine.collections.get(name)
        return sorted(coll.shards) if coll is not None else []

    async def ensure(self, spec: CollectionSpec, shards: Iterable[int], uid: str) -> None:
        coll = self.engine.collections.get(spec.name)
        wanted = set(shards)
        if (coll is None or coll.spec != spec or coll.uid != uid
                or not wanted <= set(coll.shards)):
            await self.engine.ensure(spec, wanted, uid)

    async def drop_collection(self, name: str) -> None:
        if name in self.engine.collections:
            await self.engine.drop(name)

    async def drop_shard(self, name: str, shard: int) -> None:
        await self.engine.drop_shard(name, shard)

    async def write(
        self, spec: CollectionSpec, by_shard: dict[int, list[Incoming]]
    ) -> dict[int, tuple[int, int]]:
        return await self._open(spec.name).write(by_shard)

    async def get(self, spec: CollectionSpec, shard: int, doc_id: str) -> Hit | None:
        rec = await self._open(spec.name).get(shard, doc_id)
        if rec is None:
            return None
        return Hit(doc_id, 0.0, rec.metadata, rec.vector)

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
        inline: bool = False,
    ) -> list[list[Hit]]:
        return await self._open(spec.name).search(
            queries, k, nprobe, predicate, shards, with_vectors, plans, recall, inline=inline
        )

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
        return await self._open(spec.name).search_found(
            queries, k, nprobe, shards, plans, recall, inline=inline)

    async def read_found(
        self, spec: CollectionSpec, found: Found, keys: list[int], with_vectors: bool
    ) -> list[Hit | None]:
        return await self._open(spec.name).read_found(found, keys, with_vectors)

    async def count(
        self, spec: CollectionSpec, shards: Iterable[int],
        predicate: Callable[[Any], bool] | None,
    ) -> dict[int, int]:
        return await self._open(spec.name).count_matching(list(shards), predicate)

    async def scroll(
        self, spec: CollectionSpec, shard: int, after: str | None, limit: int,
        predicate: Callable[[Any], bool] | None, with_vectors: bool,
    ) -> tuple[list[Hit], str | None]:
        return await self._open(spec.name).scroll(shard, after, limit, predicate, with_vectors)

    def shard_stats(self, name: str) -> dict[int, dict[str, Any]]:
        coll = self.engine.collections.get(name)
        return coll.shard_states() if coll is not None else {}

    async def stream_shard(
        self, spec: CollectionSpec, shard: int, after_key: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        return await self._open(spec.name).stream_shard(shard, after_key, limit)

    async def shard_digests(self, spec: CollectionSpec, shard: int, buckets: int) -> list[str]:
        return await self._open(spec.name).digests(shard, buckets)

    async def purge_tombstones(self, spec: CollectionSpec, shard: int, before: int) -> int:
        return await self._open(spec.name).purge_tombstones(shard, before)

    async def bucket_records(
        self, spec: CollectionSpec, shard: int, wanted: list[int], buckets: int
    ) -> list[Incoming]:
        return await self._open(spec.name).bucket_records(shard, wanted, buckets)
