"""The replica seam: what the cluster logic asks of "a node's copies of shards", answered the
same way for this node and for a peer.

`Replicas.of(node)` is the one place that tells the two apart: this node gets its
`LocalReplica` (over its `ShardBackend`: the engine in a real node, `MemoryBackend` in the
in-process cluster), any other node a `remote.RemoteReplica` (the peer client and the wire
formats). The write and read paths, collections, rebalance, healing and repair only ever see `Replica`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aquila.cluster.model.documents import Found, Hit, Incoming
from aquila.cluster.model.errors import Unavailable
from aquila.cluster.model.operations import CountRequest, ScrollRequest, SearchRequest
from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.replication.backend import ShardBackend
from aquila.cluster.state.entries import ClusterState

# Per shard: (documents changed, live documents deleted).
WriteResult = dict[int, tuple[int, int]]


class Replica(Protocol):
    """One node's copies of shards. Every call may raise an `AquilaError`; a transient one
    (`Unavailable`: unreachable, not open yet) means another replica may answer."""

    async def write(
        self, spec: CollectionSpec, uid: str, by_shard: dict[int, list[Incoming]]
    ) -> WriteResult:
        """Durable on return. Refused (Unavailable) unless this node's map has the
        collection as `spec` and `uid` say; opens the shards the map gives the node first (a
        move's target learns of its new shard by its first write)."""
        ...

    async def get(self, spec: CollectionSpec, shard: int, doc_id: str) -> Hit | None:
        """The live document (metadata and vector), or None when absent or deleted."""
        ...

    async def search(
        self, spec: CollectionSpec, req: SearchRequest, shards: list[int], budget: float,
        plans: dict[int, dict[str, Any]] | None = None,
        *,
        inline: bool = False,
    ) -> list[list[Hit]]:
        """Per query, the best `req.k` hits over these shards, within `budget` seconds;
        `plans`, when given, receives how each shard was searched. `inline`: this node's
        storage may run a small search on the calling thread (a peer's sub-search)."""
        ...

    async def count(
        self, spec: CollectionSpec, req: CountRequest, shards: list[int], budget: float
    ) -> dict[int, int]:
        """Per shard, its live documents that the request's filter admits."""
        ...

    async def scroll(
        self, spec: CollectionSpec, req: ScrollRequest, shard: int, after: str | None,
        limit: int, budget: float,
    ) -> tuple[list[Hit], str | None]:
        """Up to `limit` live documents of the shard that the request's filter admits, with
        ids after `after`, in id order; and the id to go on after (None: the shard is done)."""
        ...

    async def stats(
        self, name: str, timeout: float | None = None  # noqa: ASYNC109 - the peer client's
    ) -> dict[int, dict[str, Any]]:
        """Per shard held: {"count", "index_state"}."""
        ...

    async def stream(
        self, spec: CollectionSpec, shard: int, after: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        """A page of the shard's records (tombstones included) in id order, and the id to
        continue after (None at the end)."""
        ...

    async def digests(self, spec: CollectionSpec, shard: int, buckets: int) -> list[str]:
        """Per hash bucket, the digest of the shard's (id, version, writer) records."""
        ...

    async def bucket_records(
        self, spec: CollectionSpec, shard: int, wanted: list[int], buckets: int
    ) -> list[Incoming]:
        """The shard's records (tombstones included) that fall in the wanted buckets."""
        ...

    async def purge(self, spec: CollectionSpec, shard: int, before: int) -> int:
        """Forget the shard's tombstones with versions below `before`; how many."""
        ...

    async def drop_shard(self, name: str, shard: int) -> None:
        """Drop the copy, unless the node's map still assigns the shard to it (Unavailable).
        A node that is gone has nothing to drop: no error."""
        ...


class LocalReplica:
    """This node's copies, over its storage."""

    def __init__(self, node_id: str, backend: ShardBackend, state: ClusterState) -> None:
        self.node_id = node_id
        self.backend = backend
        self.state = state

    async def write(
        self, spec: CollectionSpec, uid: str, by_shard: dict[int, list[Incoming]]
    ) -> WriteResult:
        # The same check a replica makes for a peer: the sender's entry may be older than
        # this node's map by now, which alone decides settings and incarnation.
        entry = self.state.entry_for_write(spec.name, uid, spec)
        # Open the shards the map gives this node (a move's target takes the shard's writes
        # before it has reconciled); others are not created here (writing to them fails
        # unless they are still open: a move's source).
        mine = set(entry.shards_of(self.node_id))
        wanted = sorted(s for s in by_shard if s in mine)
        if wanted:
            await self.backend.ensure(entry.spec, wanted, entry.uid)
        return await self.backend.write(entry.spec, by_shard)

    async def get(self, spec: CollectionSpec, shard: int, doc_id: str) -> Hit | None:
        return await self.backend.get(spec, shard, doc_id)

    async def search(
        self, spec: CollectionSpec, req: SearchRequest, shards: list[int], budget: float,
        plans: dict[int, dict[str, Any]] | None = None,
        *,
        inline: bool = False,
    ) -> list[list[Hit]]:
        return await self.backend.search(
            spec, req.vectors, req.k, req.nprobe, req.predicate, shards, req.include_vector,
            plans, req.recall, inline=inline,
        )

    async def search_found(
        self, spec: CollectionSpec, req: SearchRequest, shards: list[int], budget: float,
        plans: dict[int, dict[str, Any]] | None = None,
        *,
        inline: bool = False,
    ) -> Found:
        """`search` of an unfiltered request, its hits not read yet (`read_found` reads those
        a merge keeps)."""
        return await self.backend.search_found(
            spec, req.vectors, req.k, req.nprobe, shards, plans, req.recall, inline=inline)

    async def read_found(self, spec: CollectionSpec, found: Found, keys: list[int],
                         with_vectors: bool) -> list[Hit | None]:
        return await self.backend.read_found(spec, found, keys, with_vectors)

    async def count(
        self, spec: CollectionSpec, req: CountRequest, shards: list[int], budget: float
    ) -> dict[int, int]:
        return await self.backend.count(spec, shards, req.predicate)

    async def scroll(
        self, spec: CollectionSpec, req: ScrollRequest, shard: int, after: str | None,
        limit: int, budget: float,
    ) -> tuple[list[Hit], str | None]:
        return await self.backend.scroll(spec, shard, after, limit, req.predicate,
                                         req.include_vector)

    async def stats(
        self, name: str, timeout: float | None = None  # noqa: ASYNC109
    ) -> dict[int, dict[str, Any]]:
        return self.backend.shard_stats(name)

    async def stream(
        self, spec: CollectionSpec, shard: int, after: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        return await self.backend.stream_shard(spec, shard, after, limit)

    async def digests(self, spec: CollectionSpec, shard: int, buckets: int) -> list[str]:
        return await self.backend.shard_digests(spec, shard, buckets)

    async def bucket_records(
        self, spec: CollectionSpec, shard: int, wanted: list[int], buckets: int
    ) -> list[Incoming]:
        return await self.backend.bucket_records(spec, shard, wanted, buckets)

    async def purge(self, spec: CollectionSpec, shard: int, before: int) -> int:
        return await self.backend.purge_tombstones(spec, shard, before)

    async def drop_shard(self, name: str, shard: int) -> None:
        entry = self.state.get(name)
        if entry is not None and shard in entry.shards_of(self.node_id):
            raise Unavailable(f"shard {shard} of {name!r} is still assigned to this node")
        await self.backend.drop_shard(name, shard)


class Replicas:
    """Which `Replica` answers for a node: the one place that asks "is this node me?"."""

    def __init__(self, node_id: str, local: Replica, remote: Callable[[str], Replica]) -> None:
        self.node_id = node_id
        self.local = local
        self._remote = remote
        self._peers: dict[str, Replica] = {}

    def of(self, node: str) -> Replica:
        if node == self.node_id:
            return self.local
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = self._remote(node)
        return peer
