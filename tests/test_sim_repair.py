"""Keeping replicas whole, in one process: hinted hand-off to a replica that was away, and
anti-entropy between replicas that diverged (deletes included, tombstones purged once every
replica has them)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from aquila.cluster.membership.table import State
from aquila.cluster.model.digests import BUCKETS
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.movement.healer import HealerConfig
from tests.simcluster import SimCluster, SimNode, batch, records, spec


@pytest.fixture
async def sim() -> AsyncIterator[SimCluster]:
    c = SimCluster(3, healer=HealerConfig(dead_grace_s=600, anti_entropy_interval_s=3600))
    await c.start()
    yield c
    await c.stop()


def ids_of(node: SimNode, name: str = "c") -> set[str]:
    return node.backend.live_ids(name)


async def test_writes_missed_by_a_paused_replica_are_handed_to_it_when_it_is_back(
    sim: SimCluster,
) -> None:
    n1, n3 = sim.node("n1"), sim.node("n3")
    await sim.run(n1.svc.collections.create(spec("c", replication=3)))
    entry = n1.svc.collections.entry("c")
    sim.pause("n3")  # not yet suspected: the write is tried, and times out
    ids = [f"d{i}" for i in range(30)]
    out = await sim.run(n1.svc.writes.upsert(entry, batch(ids, consistency="quorum")))
    assert out == {"ids": ids, "upserted": 30}
    assert ids_of(sim.node("n2")) == set(ids) and ids_of(n3) == set()
    await sim.until(lambda: n1.svc.writes.hints.pending("n3") == 30, what="n3's writes hinted")
    sim.resume("n3")
    await sim.until(lambda: ids_of(n3) == set(ids), 60, "the hints handed to n3")
    assert n1.svc.writes.hints.pending() == 0


async def test_writes_for_a_dead_replica_are_hinted_at_once_and_replayed_on_return(
    sim: SimCluster,
) -> None:
    n1, n2 = sim.node("n1"), sim.node("n2")
    await sim.run(n1.svc.collections.create(spec("c", replication=3)))
    await sim.kill("n3")
    await sim.until(lambda: sim.states("n1")["n3"] == State.DEAD, what="n3 dead")
    entry = n2.svc.collections.entry("c")
    ids = [f"d{i}" for i in range(25)]
    await sim.run(n2.svc.writes.upsert(entry, batch(ids, consistency="quorum")))
    await sim.run(n2.svc.writes.delete(entry, ids[:5], "quorum"))
    # Not even tried: a dead replica is hinted before the write is sent (newest write per id).
    assert n2.svc.writes.hints.pending("n3") == 25
    await sim.boot(sim.node("n3"), join="n1")
    await sim.until(lambda: ids_of(sim.node("n3")) == set(ids[5:]), 60, "replayed to n3")
    assert sim.node("n3").backend.tombstones("c") == 5
    assert n2.svc.writes.hints.pending() == 0


async def test_anti_entropy_repairs_writes_and_deletes_a_replica_missed(sim: SimCluster) -> None:
    n1 = sim.node("n1")
    await sim.run(n1.svc.collections.create(spec("c", shards=2, replication=3)))
    entry = n1.svc.collections.entry("c")
    ids = [f"d{i}" for i in range(60)]
    await sim.run(n1.svc.writes.upsert(entry, batch(ids)))
    # Divergence no hint can repair (a coordinator restarted): n3 missed a delete and two
    # writes, n2 has a write nobody else has.
    hlc = n1.svc.writes.hlc
    n2, n3 = sim.node("n2"), sim.node("n3")
    gone = ids[0]
    shard_gone = next(s for s in range(2) if gone in records(n1, "c", s))
    tomb = Incoming(gone, None, b"", hlc.next(), "n1")
    for node in (n1, n2):
        await node.backend.write(entry.spec, {shard_gone: [tomb]})
    fresh = batch(["x1", "x2", "x3"], seed=9)
    for i, doc_id in enumerate(fresh.ids):
        d = Incoming(doc_id, fresh.vectors[i], fresh.metadata[i], hlc.next(), "n1")
        targets = (n2,) if doc_id == "x3" else (n1, n2)
        for node in targets:
            await node.backend.write(entry.spec, {shard_of(doc_id, 2): [d]})
    before = [await sim.run(n.svc.replicas.local.digests(entry.spec, 0, BUCKETS))
              for n in (n1, n2, n3)]
    assert len({tuple(d) for d in before}) > 1
    sent = await sim.run(n1.svc.repair.sync_led_shards())
    assert sent > 0
    want = (set(ids) - {gone}) | {"x1", "x2", "x3"}
    for node in (n1, n2, n3):
        assert ids_of(node) == want, node.id
    for s in range(2):
        digests = [await sim.run(n.svc.replicas.local.digests(entry.spec, s, BUCKETS))
                   for n in (n1, n2, n3)]
        assert digests[0] == digests[1] == digests[2]
    assert await sim.run(n1.svc.repair.sync_led_shards()) == 0  # nothing left to send
    assert n3.backend.tombstones("c") == 1


async def test_tombstones_are_purged_everywhere_after_a_complete_pass_and_the_grace(
    sim: SimCluster,
) -> None:
    n1 = sim.node("n1")
    await sim.run(n1.svc.collections.create(spec("c", shards=2, replication=3)))
    entry = n1.svc.collections.entry("c")
    ids = [f"d{i}" for i in range(20)]
    await sim.run(n1.svc.writes.upsert(entry, batch(ids)))
    await sim.run(n1.svc.writes.delete(entry, ids[:4], "all"))
    assert all(n.backend.tombstones("c") == 4 for n in sim.running())
    await sim.wait(20)
    # A pass that cannot reach every replica purges nothing, whatever the age.
    sim.pause("n3")
    await sim.until(lambda: sim.states("n1")["n3"] != State.ALIVE, what="n3 suspected")
    await sim.run(n1.svc.repair.sync_led_shards(tombstone_grace_s=10))
    assert n1.backend.tombstones("c") == 4
    sim.resume("n3")
    await sim.until(lambda: sim.states("n1")["n3"] == State.ALIVE, what="n3 back")
    # Younger than the grace: kept.
    await sim.run(n1.svc.repair.sync_led_shards(tombstone_grace_s=3600))
    assert n1.backend.tombstones("c") == 4
    await sim.run(n1.svc.repair.sync_led_shards(tombstone_grace_s=10))
    assert [n.backend.tombstones("c") for n in sim.running()] == [0, 0, 0]
    assert all(ids_of(n) == set(ids[4:]) for n in sim.running())


async def test_the_healer_runs_anti_entropy_on_its_interval() -> None:
    sim = SimCluster(3, healer=HealerConfig(dead_grace_s=600, anti_entropy_interval_s=5))
    await sim.start()
    try:
        n1 = sim.node("n1")
        await sim.run(n1.svc.collections.create(spec("c", shards=3, replication=2)))
        entry = n1.svc.collections.entry("c")
        lone = [f"only-{i}" for i in range(6)]
        # Straight into the last replica's storage: only anti-entropy copies them.
        for i, doc_id in enumerate(lone):
            shard = shard_of(doc_id, 3)
            d = Incoming(doc_id, batch([doc_id], seed=i).vectors[0], b"{}",
                         n1.svc.writes.hlc.next(), "n1")
            await sim.node(entry.replicas[shard][-1]).backend.write(entry.spec, {shard: [d]})

        def everywhere() -> bool:
            return all(doc_id in records(sim.node(n), "c", shard_of(doc_id, 3))
                       for doc_id in lone for n in entry.replicas[shard_of(doc_id, 3)])

        assert not everywhere()
        t0 = sim.clock.now()
        await sim.until(everywhere, 30, "anti-entropy to copy every lone record")
        assert sim.clock.now() - t0 <= 5 + 1  # one interval (and a healer round)
    finally:
        await sim.stop()
