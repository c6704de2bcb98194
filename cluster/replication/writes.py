"""The write path: version each document (hybrid logical clock), route it to every replica of
its shard (a move's target too) with one request per node, and answer once each shard has the
acknowledgements its consistency asks for. A replica that misses a write gets it later by
hinted hand-off (`hints`), or from anti-entropy."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aquila.cluster.clock import consume
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.errors import AquilaError, BadRequest, NotFound, Unavailable
from aquila.cluster.model.hlc import HybridClock
from aquila.cluster.model.operations import CONSISTENCY, DocBatch
from aquila.cluster.model.sharding import shard_of, shards_of
from aquila.cluster.replication.hints import Hints
from aquila.cluster.replication.replica import Replicas, WriteResult
from aquila.cluster.state.entries import ClusterState, CollectionEntry

log = logging.getLogger(__name__)

# Hinted writes are handed to a replica that is back in requests of at most this many.
REPLAY_BATCH = 1000


def needed_acks(consistency: str, replicas: int) -> int:
    if consistency == "one":
        return 1
    if consistency == "all":
        return replicas
    return replicas // 2 + 1


def write_targets(entry: CollectionEntry, shard: int) -> list[str]:
    """Every replica that should receive a write of this shard, a move's target too."""
    nodes = list(entry.replicas[shard])
    mv = entry.move_of(shard)
    if mv is not None and mv.to_node not in nodes:
        nodes.append(mv.to_node)
    return nodes


@dataclass
class WriteStats:
    """Counters of the writes this node coordinated (read by the node's /metrics)."""

    # By consistency: refused before anything was sent (too few live replicas), and sent but
    # short of the acknowledgements the consistency asks for (503 after a replica failed).
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    short: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Answered, but some replica missed the write (kept as a hint for it).
    degraded: int = 0


class WritePath:
    def __init__(self, node_id: str, state: ClusterState, view: MemberView, replicas: Replicas,
                 hlc: HybridClock, hints: Hints | None = None) -> None:
        self.stats = WriteStats()
        self.node_id = node_id
        self._state = state
        self._view = view
        self._replicas = replicas
        self.hlc = hlc
        self.hints = hints or Hints()
        self._background: set[asyncio.Task[Any]] = set()

    async def upsert(self, entry: CollectionEntry, batch: DocBatch) -> dict[str, Any]:
        """Version and route a validated batch."""
        by_shard: dict[int, list[Incoming]] = defaultdict(list)
        shards, node = entry.spec.shards, self.node_id
        version = self.hlc.next_many(len(batch.ids))
        for doc_id, shard, vec, meta, v in zip(
                batch.ids, shards_of(batch.ids, shards), batch.vectors, batch.metadata,
                range(version, version + len(batch.ids)), strict=True):
            by_shard[shard].append(Incoming(doc_id, vec, meta, v, node))
        await self.route_writes(entry, dict(by_shard), batch.consistency)
        # An id given twice is one document, its last occurrence (the later version): the
        # count is of documents, `ids` follows the batch (its generated ids in place).
        return {"ids": batch.ids, "upserted": len(set(batch.ids))}

    async def delete(self, entry: CollectionEntry, ids: list[str], consistency: str) -> int:
        """Tombstones for these ids; how many live documents they deleted."""
        if consistency not in CONSISTENCY:
            raise BadRequest("'consistency' must be one of one, quorum, all")
        by_shard: dict[int, list[Incoming]] = defaultdict(list)
        for doc_id in ids:
            by_shard[shard_of(doc_id, entry.spec.shards)].append(
                Incoming(doc_id, None, b"", self.hlc.next(), self.node_id)
            )
        results = await self.route_writes(entry, dict(by_shard), consistency)
        return sum(deleted for _, deleted in results.values())

    async def delete_one(self, entry: CollectionEntry, doc_id: str) -> None:
        if await self.delete(entry, [doc_id], "quorum") == 0:
            raise NotFound(f"document {doc_id!r} does not exist in {entry.spec.name!r}")

    async def route_writes(
        self, entry: CollectionEntry, by_shard: dict[int, list[Incoming]], consistency: str
    ) -> WriteResult:
        """Send each node one request with its shards' documents; return once every shard
        has the acknowledgements the consistency asks for, else 503."""
        need: dict[int, int] = {}
        per_node: dict[str, dict[int, list[Incoming]]] = defaultdict(dict)
        for shard, docs in by_shard.items():
            replicas = entry.replicas[shard]
            need[shard] = needed_acks(consistency, len(replicas))
            usable = self._view.ordered(write_targets(entry, shard))
            if sum(1 for n in usable if n in replicas) < need[shard]:
                self.stats.refused[consistency] += 1
                raise Unavailable(
                    f"shard {shard} has {len(usable)} live replica(s) of {len(replicas)}; "
                    f"consistency {consistency!r} needs {need[shard]}"
                )
            for node in usable:
                per_node[node][shard] = docs
        # Only now that no shard refuses the write: a refused write leaves nothing behind.
        missed = False
        for shard, docs in by_shard.items():
            reached = {n for n, shards in per_node.items() if shard in shards}
            for node in set(write_targets(entry, shard)) - reached:
                self.hints.add(node, entry.spec.name, shard, docs)
                missed = True
        acks: dict[int, int] = defaultdict(int)
        results: WriteResult = {}
        tasks = {
            asyncio.ensure_future(self._write_to(node, entry, shards)): node
            for node, shards in per_node.items()
        }
        errors: list[str] = []
        pending = set(tasks)
        try:
            while pending and any(acks[s] < need[s] for s in need):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    node = tasks[t]
                    if t.exception() is not None:
                        exc = t.exception()
                        if isinstance(exc, AquilaError) and not exc.transient:
                            raise exc
                        errors.append(f"{node}: {exc}")
                        self._hint_all(node, entry, per_node[node])
                        continue
                    for shard, (applied, deleted) in t.result().items():
                        if shard in need and node in entry.replicas[shard]:
                            acks[shard] += 1
                            prev = results.get(shard, (0, 0))
                            results[shard] = (max(prev[0], applied), max(prev[1], deleted))
        finally:
            for t in tasks:  # those not looked at above (an error raised first) included
                t.add_done_callback(consume)
            for t in pending:  # slower replicas finish in the background
                self._background.add(t)
                t.add_done_callback(self._background.discard)
                t.add_done_callback(
                    functools.partial(self._hint_on_failure, tasks[t], entry, per_node[tasks[t]])
                )
        short = [s for s in need if acks[s] < need[s]]
        if short:
            self.stats.short[consistency] += 1
            raise Unavailable(
                f"shard(s) {short} did not reach consistency {consistency!r}: {'; '.join(errors)}"
            )
        if missed or errors:
            self.stats.degraded += 1
        return results

    async def _write_to(
        self, node: str, entry: CollectionEntry, by_shard: dict[int, list[Incoming]]
    ) -> WriteResult:
        return await self._replicas.of(node).write(entry.spec, entry.uid, by_shard)

    def _hint_on_failure(
        self,
        node: str,
        entry: CollectionEntry,
        by_shard: dict[int, list[Incoming]],
        task: asyncio.Future[Any],
    ) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._hint_all(node, entry, by_shard)

    def _hint_all(
        self, node: str, entry: CollectionEntry, by_shard: dict[int, list[Incoming]]
    ) -> None:
        for shard, docs in by_shard.items():
            self.hints.add(node, entry.spec.name, shard, docs)

    async def replay_hints(self, node: str) -> int:
        """Deliver what `node` missed; what fails is kept for the next try."""
        delivered = 0
        for (name, shard), docs in self.hints.take(node).items():
            entry = self._state.get(name)
            if entry is None or node not in write_targets(entry, shard):
                continue  # deleted, or the shard moved away: nothing to hand off
            try:
                for i in range(0, len(docs), REPLAY_BATCH):
                    part = docs[i : i + REPLAY_BATCH]
                    await self._write_to(node, entry, {shard: part})
                    delivered += len(part)
            except AquilaError:
                self.hints.add(node, name, shard, docs)
        self.hints.replayed += delivered
        if delivered:
            log.info("handed %d hinted write(s) to %s", delivered, node,
                     extra={"event": "hints_replayed", "peer": node, "documents": delivered})
        return delivered

    async def finish_background(self) -> None:
        """Wait for the writes still running after their request was answered."""
        await asyncio.gather(*list(self._background), return_exceptions=True)
