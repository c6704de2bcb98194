"""Collection lifecycle in the cluster state: create (shards placed on the alive members),
delete (a tombstone entry), and describe (counts from the best reachable replica of each
shard). Each change waits until this node has applied it, so the client's next request finds
it here."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.bounds import MAX_COUNT, BoundsError, checked_int
from aquila.cluster.model.errors import AlreadyExists
from aquila.cluster.model.placement import place
from aquila.cluster.model.recall import checked_curve
from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.replication.replica import Replicas
from aquila.cluster.state.entries import CollectionEntry
from aquila.cluster.state.publish import Publisher
from aquila.cluster.state.runtime import ClusterRuntime

APPLY_TIMEOUT_S = 60.0
STATS_TIMEOUT_S = 2.0


class Collections:
    def __init__(self, node_id: str, runtime: ClusterRuntime, view: MemberView,
                 replicas: Replicas, publisher: Publisher) -> None:
        self.node_id = node_id
        self._runtime = runtime
        self._view = view
        self._replicas = replicas
        self._publisher = publisher

    def entry(self, name: str) -> CollectionEntry:
        """The live entry of `name` (BadRequest for an invalid name, NotFound if none)."""
        return self._runtime.state.entry(name)

    async def create(self, spec: CollectionSpec) -> tuple[dict[str, Any], bool]:
        """(description, created): an identical collection already there is not an error."""
        existing = self._runtime.state.get(spec.name)
        if existing is not None:
            if existing.spec != spec:
                raise AlreadyExists(f"collection {spec.name!r} exists with other settings")
            return await self.describe(existing), False
        nodes = self._view.alive() or [self.node_id]
        replicas = place(spec.shards, spec.replication, nodes, salt=spec.name)
        entry = self._runtime.state.next_entry(
            CollectionEntry(spec, (), 0, self.node_id, uid=uuid.uuid4().hex),
            self.node_id,
            replicas=tuple(tuple(r) for r in replicas),
            moving=tuple(None for _ in replicas),
        )
        await self._publisher.publish(entry)
        await self._runtime.wait_reconciled(APPLY_TIMEOUT_S)
        return await self.describe(entry), True

    async def delete(self, name: str) -> None:
        entry = self.entry(name)
        await self._publisher.publish(
            self._runtime.state.next_entry(entry, self.node_id, deleted=True)
        )
        await self._runtime.wait_reconciled(APPLY_TIMEOUT_S)

    async def list_all(self) -> list[dict[str, Any]]:
        # Concurrently: each asks the replicas for counts, and a paused one costs a timeout.
        entries = list(self._runtime.state.live().values())
        return list(await asyncio.gather(*(self.describe(e) for e in entries)))

    async def get(self, name: str) -> dict[str, Any]:
        return await self.describe(self.entry(name))

    async def describe(self, entry: CollectionEntry) -> dict[str, Any]:
        stats = await self.shard_stats(entry)
        shard_states = []
        for s, reps in enumerate(entry.replicas):
            st = stats.get(s, {})
            shard_states.append({
                "shard": s,
                "replicas": list(reps),
                "count": int(st.get("count", 0)),
                "index_state": st.get("index_state", "buffering"),
                **index_info(st.get("index")),
            })
        return {
            **entry.spec.to_json(),
            "count": sum(x["count"] for x in shard_states),
            "shard_states": shard_states,
        }

    async def shard_stats(self, entry: CollectionEntry) -> dict[int, dict[str, Any]]:
        """Per shard, the stats of its best reachable replica."""
        name = entry.spec.name
        nodes = sorted({n for reps in entry.replicas for n in self._view.ordered(reps)})
        answers = await asyncio.gather(
            *(self._replicas.of(n).stats(name, STATS_TIMEOUT_S) for n in nodes),
            return_exceptions=True,
        )
        by_node = {n: a for n, a in zip(nodes, answers, strict=True) if isinstance(a, dict)}
        out: dict[int, dict[str, Any]] = {}
        for s, reps in enumerate(entry.replicas):
            for node in self._view.ordered(reps):
                if s in by_node.get(node, {}):
                    out[s] = by_node[node][s]
                    break
        return out


def index_info(raw: Any) -> dict[str, Any]:
    """A shard's index as its replica reports it (nlist, vectors, trained-at count, recall
    curve), checked and bounded since it reaches the client; nothing when it is malformed
    or not reported (a node that predates it)."""
    if not isinstance(raw, dict):
        return {}
    try:
        info = {name: checked_int(raw.get(name), 0, MAX_COUNT, name)
                for name in ("nlist", "vectors", "trained_at", "nlist_target", "retrain_at")}
        curve = checked_curve(raw.get("recall_curve", []))
    except BoundsError:
        return {}
    return {"index": {**info, "recall_curve": [[n, r] for n, r in curve]}}
