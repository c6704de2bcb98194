"""The cluster layer's counters (read by the node's /metrics) move where the events happen,
in one process: writes refused or short of their consistency, degraded writes and their
hints handed back, partial and refused searches, hedges and retries, anti-entropy repairs,
replica moves with their documents and bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from aquila.cluster.membership.table import State
from aquila.cluster.model.errors import Unavailable
from aquila.cluster.model.operations import CountRequest, SearchRequest
from aquila.cluster.movement.healer import HealerConfig
from aquila.cluster.movement.rebalance import plan_moves
from tests.simcluster import SimCluster, batch, spec


@pytest.fixture
async def sim() -> AsyncIterator[SimCluster]:
    c = SimCluster(3, healer=HealerConfig(dead_grace_s=600, anti_entropy_interval_s=3600))
    await c.start()
    yield c
    await c.stop()


def query(allow_partial: bool = True, timeout_ms: int = 2000) -> SearchRequest:
    q = np.random.default_rng(3).standard_normal((1, 4)).astype(np.float32)
    return SearchRequest(q, 5, None, None, None, True, False, allow_partial, timeout_ms)


async def test_write_counters(sim: SimCluster) -> None:
    n1, n3 = sim.node("n1"), sim.node("n3")
    await sim.run(n1.svc.collections.create(spec("c", replication=3)))
    entry = n1.svc.collections.entry("c")
    stats, hints = n1.svc.writes.stats, n1.svc.writes.hints
    await sim.run(n1.svc.writes.upsert(entry, batch(["a", "b"], consistency="all")))
    assert (dict(stats.refused), dict(stats.short), stats.degraded) == ({}, {}, 0)
    # Paused, not yet suspected: the write is sent to n3 too and waits for it in vain.
    sim.pause("n3")
    with pytest.raises(Unavailable):
        await sim.run(n1.svc.writes.upsert(entry, batch(["c"], consistency="all")))
    assert stats.short == {"all": 1}
    await sim.until(lambda: sim.states("n1")["n3"] != State.ALIVE, what="n3 suspected")
    await sim.until(lambda: sim.states("n1")["n3"] == State.DEAD, what="n3 dead")
    # Dead: consistency all is refused before anything is sent; quorum is answered, degraded.
    with pytest.raises(Unavailable):
        await sim.run(n1.svc.writes.upsert(entry, batch(["d"], consistency="all")))
    assert stats.refused == {"all": 1}
    ids = [f"q{i}" for i in range(10)]
    await sim.run(n1.svc.writes.upsert(entry, batch(ids, consistency="quorum")))
    assert stats.degraded == 1
    assert hints.added == hints.pending("n3") == 11  # "c" (short) and the quorum batch
    sim.resume("n3")
    await sim.until(lambda: hints.replayed == 11, 120, "the hints handed to n3")
    assert hints.pending() == 0 and n3.backend.live_ids("c") >= set(ids)


async def test_search_counters(sim: SimCluster) -> None:
    n1 = sim.node("n1")
    await sim.run(n1.svc.collections.create(spec("c", shards=6, replication=1)))
    entry = n1.svc.collections.entry("c")
    await sim.run(n1.svc.writes.upsert(entry, batch([f"d{i}" for i in range(40)])))
    stats = n1.svc.reads.stats
    await sim.run(n1.svc.reads.search(entry, query()))
    assert (stats.searches, stats.partial, stats.refused) == (1, 0, 0)
    await sim.kill("n3")
    await sim.until(lambda: sim.states("n1")["n3"] == State.DEAD, what="n3 dead")
    out = await sim.run(n1.svc.reads.search(entry, query()))
    assert out["partial"] and stats.partial == 1
    with pytest.raises(Unavailable):
        await sim.run(n1.svc.reads.search(entry, query(allow_partial=False)))
    assert (stats.searches, stats.partial, stats.refused) == (3, 1, 1)  # refused: not partial


async def test_hedges_and_retries_are_counted(sim: SimCluster) -> None:
    n1 = sim.node("n1")
    await sim.run(n1.svc.collections.create(spec("c", shards=6, replication=2)))
    entry = n1.svc.collections.entry("c")
    await sim.run(n1.svc.writes.upsert(entry, batch([f"d{i}" for i in range(40)])))
    # Shards n1 does not hold are asked of n2 or n3 first; a paused one is hedged.
    remote_first = [s for s, reps in enumerate(entry.replicas) if "n1" not in reps]
    assert remote_first, entry.replicas
    sim.pause("n2")
    sim.pause("n3")
    stats = n1.svc.reads.stats
    out = await sim.run(n1.svc.reads.search(entry, query(timeout_ms=2000)))
    assert out["partial"]  # both holders of those shards are silent
    assert stats.hedged >= len(remote_first)
    # A count asks the replicas as a search does: its hedges count too.
    searched = stats.hedged
    got = await sim.run(n1.svc.reads.count(entry, CountRequest(None, None, True, 2000)))
    assert got["partial"] and stats.hedged >= searched + len(remote_first)
    assert stats.searches == 1


async def test_repair_and_move_counters(sim: SimCluster) -> None:
    n1, n2 = sim.node("n1"), sim.node("n2")
    await sim.run(n1.svc.collections.create(spec("c", shards=6, replication=2)))
    entry = n1.svc.collections.entry("c")
    await sim.run(n1.svc.writes.upsert(entry, batch([f"d{i}" for i in range(30)])))
    shard, (a, b) = next((s, reps) for s, reps in enumerate(entry.replicas))
    repair = n1.svc.repair.stats
    assert await sim.run(n1.svc.repair.sync_pair(entry, shard, a, b)) == 0
    assert (repair.compared, repair.differing, repair.records) == (1, 0, 0)
    # One replica loses a document behind the cluster's back: the next comparison repairs it.
    victim = sim.node(b).backend.collections["c"].shards[shard]
    del victim[next(iter(victim))]
    assert await sim.run(n1.svc.repair.sync_pair(entry, shard, a, b)) == 1
    assert (repair.compared, repair.differing, repair.records) == (2, 1, 1)
    # A fourth node and a rebalance: moves, documents and bytes counted by their driver.
    n4 = sim.add_node()
    await sim.boot(n4, join="n1")
    await sim.until(lambda: all(sim.sees_all_alive(n) for n in sim.running()), what="n4 alive")
    moves = plan_moves(n2.svc.runtime.state, n2.svc.view.alive())
    assert moves
    run = await sim.run(n2.svc.rebalancer.run(moves))
    moved = n2.svc.rebalancer.stats
    assert moved.done == len(moves) and moved.failed == 0
    assert moved.documents == run.documents > 0
    assert moved.bytes == run.bytes > 0
