"""Anti-entropy: replicas of a shard compare digests of key ranges and exchange only the
documents of ranges that differ, then only the versions that are newer on one side
(Dynamo/Cassandra-style repair, with hash buckets as the ranges).

Documents keep their versions, and every write is last-writer-wins by (version, writer), so
applying the other side's newer records in any order converges; tombstones travel like any
other record, so a delete missed by a replica is repaired too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.digests import BUCKETS, newer
from aquila.cluster.model.hlc import HybridClock
from aquila.cluster.replication.replica import Replicas
from aquila.cluster.state.entries import ClusterState, CollectionEntry

log = logging.getLogger(__name__)

# Records sent to a replica in requests of at most this many.
SEND_BATCH = 1000


@dataclass
class RepairStats:
    """Anti-entropy counters (read by the node's /metrics)."""

    compared: int = 0  # replica pairs whose digests were compared
    differing: int = 0  # of those, pairs that differed
    records: int = 0  # records sent to repair a replica
    failures: int = 0  # comparisons that failed (a replica unreachable)


class Repair:
    def __init__(self, state: ClusterState, view: MemberView, replicas: Replicas,
                 hlc: HybridClock) -> None:
        self.stats = RepairStats()
        self._state = state
        self._view = view
        self._replicas = replicas
        self._hlc = hlc

    async def sync_pair(self, entry: CollectionEntry, shard: int, a: str, b: str) -> int:
        """Make replicas `a` and `b` of a shard hold the same documents; returns records
        sent."""
        spec = entry.spec
        rep_a, rep_b = self._replicas.of(a), self._replicas.of(b)
        da = await rep_a.digests(spec, shard, BUCKETS)
        db = await rep_b.digests(spec, shard, BUCKETS)
        differ = [i for i, (x, y) in enumerate(zip(da, db, strict=True)) if x != y]
        self.stats.compared += 1
        if not differ:
            return 0
        self.stats.differing += 1
        ra = {d.id: d for d in await rep_a.bucket_records(spec, shard, differ, BUCKETS)}
        rb = {d.id: d for d in await rep_b.bucket_records(spec, shard, differ, BUCKETS)}
        to_b = [d for i, d in ra.items() if newer(d, rb.get(i))]
        to_a = [d for i, d in rb.items() if newer(d, ra.get(i))]
        for rep, docs in ((rep_a, to_a), (rep_b, to_b)):
            for i in range(0, len(docs), SEND_BATCH):
                await rep.write(spec, entry.uid, {shard: docs[i : i + SEND_BATCH]})
                self.stats.records += len(docs[i : i + SEND_BATCH])
        if to_a or to_b:
            log.info("anti-entropy %s/%d: %d → %s, %d → %s", spec.name, shard,
                     len(to_a), a, len(to_b), b,
                     extra={"event": "anti_entropy", "collection": spec.name, "shard": shard,
                            "records": len(to_a) + len(to_b)})
        return len(to_a) + len(to_b)

    async def sync_led_shards(self, tombstone_grace_s: float = 0.0) -> int:
        """One pass over the shards this node leads (it is their first usable replica).

        Tombstones are kept until every replica has them: only after a pass that reached
        every replica of a shard (all alive, no move under way) are tombstones older than the
        grace period purged, on every replica at once. A write delayed longer than the grace
        period (a hint, a partitioned replica) could then resurrect a deleted document, as in
        Cassandra; the default grace is a day."""
        sent = 0
        for entry in self._state.live().values():
            for shard, reps in enumerate(entry.replicas):
                if not self._view.leads(reps):
                    continue
                live = self._view.ordered(reps)  # this node first
                complete = (all(self._view.is_alive(n) for n in reps)
                            and entry.move_of(shard) is None)
                for other in live[1:]:
                    try:
                        sent += await self.sync_pair(entry, shard, live[0], other)
                    except Exception as exc:  # one unreachable replica must not stop the pass
                        complete = False
                        self.stats.failures += 1
                        log.debug("anti-entropy %s/%d with %s: %s", entry.spec.name, shard,
                                  other, exc)
                if complete and tombstone_grace_s > 0:
                    before = self._hlc.version_before(tombstone_grace_s)
                    for node in live:
                        try:
                            await self._replicas.of(node).purge(entry.spec, shard, before)
                        except Exception as exc:
                            log.debug("purge %s/%d on %s: %s", entry.spec.name, shard, node, exc)
        return sent
