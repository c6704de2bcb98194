"""Anti-entropy: replicas of a shard compare digests of key ranges and exchange only the
documents of ranges that differ, then only the versions that are newer on one side
(Dynamo/Cassandra-style repair, with hash buckets as the ranges).

Documents keep their versions, and every write is last-writer-wins by (version, writer), so
applying the other side's newer records in any order converges; tombstones travel like any
other record, so a delete missed by a replica is repaired too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cluster.digests import BUCKETS, newer
from cluster.membership import State
from cluster.state import CollectionEntry

if TYPE_CHECKING:
    from cluster.coordinator import Coordinator

log = logging.getLogger(__name__)


async def sync_pair(coord: Coordinator, entry: CollectionEntry, shard: int, a: str, b: str) -> int:
    """Make replicas `a` and `b` of a shard hold the same documents; returns records sent."""
    ra_, rb_ = coord.replicas.of(a), coord.replicas.of(b)
    da = await ra_.digests(entry.spec, shard, BUCKETS)
    db = await rb_.digests(entry.spec, shard, BUCKETS)
    differ = [i for i, (x, y) in enumerate(zip(da, db, strict=True)) if x != y]
    if not differ:
        return 0
    ra = {d.id: d for d in await ra_.bucket_records(entry.spec, shard, differ, BUCKETS)}
    rb = {d.id: d for d in await rb_.bucket_records(entry.spec, shard, differ, BUCKETS)}
    to_b = [d for i, d in ra.items() if newer(d, rb.get(i))]
    to_a = [d for i, d in rb.items() if newer(d, ra.get(i))]
    for node, docs in ((a, to_a), (b, to_b)):
        for i in range(0, len(docs), 1000):
            await coord.write_to_node(node, entry, {shard: docs[i : i + 1000]})
    if to_a or to_b:
        log.info("anti-entropy %s/%d: %d → %s, %d → %s", entry.spec.name, shard,
                 len(to_a), a, len(to_b), b)
    return len(to_a) + len(to_b)


async def sync_node_shards(coord: Coordinator, tombstone_grace_s: float = 0.0) -> int:
    """One pass over the shards this node leads (it is their first live replica).

    Tombstones are kept until every replica has them: only after a pass that reached every
    replica of a shard (all alive, no move under way) are tombstones older than the grace
    period purged, on every replica at once. A write delayed longer than the grace period
    (a hint, a partitioned replica) could then resurrect a deleted document, as in Cassandra;
    the default grace is a day."""
    sent = 0
    alive = {m.id for m in coord.view.members() if m.state == State.ALIVE} | {coord.node_id}
    for entry in coord.runtime.state.live().values():
        for shard, reps in enumerate(entry.replicas):
            live = coord.ordered_replicas(reps)
            if not live or live[0] != coord.node_id:
                continue
            complete = set(reps) <= alive and entry.move_of(shard) is None
            for other in live[1:]:
                try:
                    sent += await sync_pair(coord, entry, shard, coord.node_id, other)
                except Exception as exc:  # one unreachable replica must not stop the pass
                    complete = False
                    log.debug("anti-entropy %s/%d with %s: %s", entry.spec.name, shard, other, exc)
            if complete and tombstone_grace_s > 0:
                before = coord.hlc.version_before(tombstone_grace_s)
                for node in live:
                    try:
                        await coord.replicas.of(node).purge(entry.spec, shard, before)
                    except Exception as exc:
                        log.debug("purge %s/%d on %s: %s", entry.spec.name, shard, node, exc)
    return sent
