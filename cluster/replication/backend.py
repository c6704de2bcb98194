"""What the cluster layer needs from the node's local storage (implemented in node/)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import numpy as np

from aquila.cluster.model.documents import Found, Hit, Incoming
from aquila.cluster.model.spec import CollectionSpec


class ShardBackend(Protocol):
    def has(self, name: str) -> bool: ...

    def local_shards(self, name: str) -> list[int]: ...

    async def ensure(self, spec: CollectionSpec, shards: Iterable[int], uid: str) -> None:
        """Open (creating when new) these local shards of the collection incarnation `uid`;
        a local collection of that name from another incarnation is dropped first."""
        ...

    async def drop_collection(self, name: str) -> None: ...

    async def drop_shard(self, name: str, shard: int) -> None: ...

    async def write(
        self, spec: CollectionSpec, by_shard: dict[int, list[Incoming]]
    ) -> dict[int, tuple[int, int]]:
        """Durable on return; per shard (documents changed, live documents deleted)."""
        ...

    async def get(self, spec: CollectionSpec, shard: int, doc_id: str) -> Hit | None: ...

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
        """Per query, the best k hits over these local shards. `plans`, when given, receives
        per shard how it was searched ({"shard", "path", "nprobe", ...}). `recall`: in place
        of `nprobe`, the target recall the node picks its probes for. `inline`: a small
        search may run on the calling thread (a peer's sub-search, see `Collection.search`)."""
        ...

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
        """`search` without a filter, before any document is read: per query, at least the
        best k hits over these local shards as keys (fewer where the shards hold fewer)."""
        ...

    async def read_found(
        self, spec: CollectionSpec, found: Found, keys: list[int], with_vectors: bool
    ) -> list[Hit | None]:
        """The documents of these keys of `found` (id, metadata, the vector when asked,
        shard; score 0), None for one deleted since; StaleFound when the keys may name
        other documents by now."""
        ...

    async def count(
        self, spec: CollectionSpec, shards: Iterable[int],
        predicate: Callable[[Any], bool] | None,
    ) -> dict[int, int]:
        """Per shard, its live documents that `predicate` admits (every one without)."""
        ...

    async def scroll(
        self, spec: CollectionSpec, shard: int, after: str | None, limit: int,
        predicate: Callable[[Any], bool] | None, with_vectors: bool,
    ) -> tuple[list[Hit], str | None]:
        """Up to `limit` live documents of the shard that `predicate` admits, ids after
        `after`, in id order (the store's key order: UTF-8 bytes, the same as code points);
        and the id to go on after, None once the shard is done. A page may hold fewer than
        `limit` documents and still not be the last (the work per call is bounded)."""
        ...

    def shard_stats(self, name: str) -> dict[int, dict[str, Any]]:
        """Per local shard: {"count", "index_state"}."""
        ...

    def stream_shard(
        self, spec: CollectionSpec, shard: int, after_key: str | None, limit: int
    ) -> Awaitable[tuple[list[Incoming], str | None]]:
        """A page of the shard's records (tombstones included) in id order, for transfers."""
        ...

    async def shard_digests(self, spec: CollectionSpec, shard: int, buckets: int) -> list[str]:
        """Per hash bucket, a digest of the shard's (id, version, writer) records."""
        ...

    async def purge_tombstones(self, spec: CollectionSpec, shard: int, before: int) -> int:
        """Forget the shard's tombstones with versions below `before`; how many."""
        ...

    async def bucket_records(
        self, spec: CollectionSpec, shard: int, wanted: list[int], buckets: int
    ) -> list[Incoming]:
        """The shard's records (tombstones included) that fall in the wanted buckets."""
        ...
