"""Data movement, in one process: a rebalance carries every move through its stages (announce,
copy, switch, drop) with writes arriving throughout; a driver that dies at any stage leaves
nothing half-switched, its moves are cleared by the leader and a new rebalance finishes the
job; and the leader re-replicates the shards of a node dead past the grace period, then drops
its stale copies when it returns."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np
import pytest

from aquila.cluster.membership.table import State
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.operations import SearchRequest
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.movement.healer import HealerConfig
from aquila.cluster.movement.rebalance import Stage, Transfer, plan_moves
from aquila.cluster.state.entries import CollectionEntry
from tests.simcluster import SimCluster, SimNode, batch, records, spec

N_DOCS = 240
SHARDS = 12


def balanced(sim: SimCluster, name: str, nodes: list[str]) -> bool:
    e = sim.entry(nodes[0], name)
    assert e is not None
    counts = Counter(n for reps in e.replicas for n in reps)
    values = [counts.get(n, 0) for n in nodes]
    return max(values) - min(values) <= 1


def holds_only_assigned(sim: SimCluster, name: str) -> bool:
    for node in sim.running():
        e = sim.entry(node.id, name)
        assert e is not None
        if sorted(node.backend.local_shards(name)) != e.shards_of(node.id):
            return False
    return True


def shard_ids(ids: list[str], shard: int) -> set[str]:
    return {d for d in ids if shard_of(d, SHARDS) == shard}


async def fill(sim: SimCluster, replication: int = 1) -> list[str]:
    n1 = sim.node("n1")
    await sim.run(n1.svc.collections.create(spec("c", shards=SHARDS, replication=replication)))
    ids = [f"d{i}" for i in range(N_DOCS)]
    await sim.run(n1.svc.writes.upsert(n1.svc.collections.entry("c"), batch(ids)))
    return ids


async def grow(sim: SimCluster) -> SimNode:
    n4 = sim.add_node()
    await sim.boot(n4, join="n1")
    await sim.until(lambda: all(sim.sees_all_alive(n) for n in sim.running()), what="n4 alive")
    return n4


async def readable(sim: SimCluster, via: str, ids: list[str]) -> list[str]:
    """The ids that cannot be read back through `via`."""
    svc = sim.node(via).svc
    entry = svc.collections.entry("c")
    missing = []
    for d in ids:
        try:
            await svc.reads.get_document(entry, d, False)
        except Exception:
            missing.append(d)
    return missing


async def test_a_rebalance_carries_each_move_through_every_stage() -> None:
    sim = await SimCluster(3).start()
    try:
        ids = await fill(sim)
        n4 = await grow(sim)
        n1, n2 = sim.node("n1"), sim.node("n2")
        moves = plan_moves(n1.svc.runtime.state, n1.svc.view.alive())
        assert moves and all(m.to_node == "n4" for m in moves)
        log: dict[int, list[tuple[Stage, dict[str, Any]]]] = {m.shard: [] for m in moves}
        written: list[str] = []
        writers: list[asyncio.Task[Any]] = []

        stale: dict[int, CollectionEntry] = {}

        def doc_of(tag: str, shard: int) -> str:
            doc = next(f"{tag}-{shard}-{i}" for i in range(10_000)
                       if shard_of(f"{tag}-{shard}-{i}", SHARDS) == shard)
            written.append(doc)
            return doc

        def write_now(tag: str, shard: int) -> None:
            # A write of the moving shard through another node, racing the stage.
            entry = n2.svc.collections.entry("c")
            writers.append(asyncio.ensure_future(
                n2.svc.writes.upsert(entry, batch([doc_of(tag, shard)]))))

        async def late_write(shard: int) -> None:
            # Routed with the map from before the announce (to the source only), it lands
            # once the copy has read past it: only the catch-up brings it to the target.
            doc = doc_of("late", shard)
            await sim.clock.sleep(0.01)
            d = batch([doc], seed=7)
            incoming = Incoming(doc, d.vectors[0], d.metadata[0], n2.svc.writes.hlc.next(), "n2")
            await n2.svc.writes.route_writes(stale[shard], {shard: [incoming]}, "all")

        def on_stage(t: Transfer) -> None:
            m = t.move
            maps = {n.id: (e.replicas[m.shard], e.move_of(m.shard))
                    for n in sim.running() if (e := sim.entry(n.id, "c")) is not None}
            log[m.shard].append((t.stage, {
                "maps": maps,
                "target": set(records(n4, "c", m.shard)),
                "source": set(records(sim.node(m.from_node), "c", m.shard))
                if m.from_node else set(),
                "source_has_shard": m.from_node is not None
                and m.shard in sim.node(m.from_node).backend.local_shards("c"),
            }))
            if t.stage == Stage.ANNOUNCE:
                stale[m.shard] = n2.svc.collections.entry("c")
            if t.stage in (Stage.ANNOUNCE, Stage.COPY):
                write_now(t.stage.value, m.shard)
            if t.stage == Stage.COPY:
                writers.append(asyncio.ensure_future(late_write(m.shard)))

        n1.svc.rebalancer.on_stage = on_stage
        n1.svc.rebalancer.docs_per_s = 100  # the copy of a shard then lasts ~0.2 s
        stats = await sim.run(n1.svc.rebalancer.run(moves))
        await sim.run(asyncio.gather(*writers))
        assert [t.error for t in stats.transfers] == [""] * len(moves)
        assert stats.documents >= N_DOCS // SHARDS * len(moves) // 2
        for m in moves:
            stages = [s for s, _ in log[m.shard]]
            assert stages == [Stage.ANNOUNCE, Stage.COPY, Stage.SWITCH, Stage.DROP, Stage.DONE]
            snap = dict(log[m.shard])
            # ANNOUNCE: nothing in the map yet.
            assert all(mv is None for _, mv in snap[Stage.ANNOUNCE]["maps"].values())
            # COPY: every node's map marks the move (so every coordinator writes to n4 too).
            for reps, mv in snap[Stage.COPY]["maps"].values():
                assert mv is not None and (mv.from_node, mv.to_node, mv.driver) == \
                    (m.from_node, "n4", "n1")
                assert m.from_node in reps and "n4" not in reps
            # SWITCH: the copy is complete and caught up; the map still names the source.
            assert shard_ids(ids, m.shard) <= snap[Stage.SWITCH]["target"]
            assert snap[Stage.SWITCH]["target"] == snap[Stage.SWITCH]["source"]
            # DROP: every node's map has n4 in the source's place and no move.
            for reps, mv in snap[Stage.DROP]["maps"].values():
                assert mv is None and "n4" in reps and m.from_node not in reps
            assert snap[Stage.DROP]["source_has_shard"]
            # DONE: the old copy is gone.
            assert not snap[Stage.DONE]["source_has_shard"]
        assert balanced(sim, "c", ["n1", "n2", "n3", "n4"]) and sim.maps_agree("c")
        assert holds_only_assigned(sim, "c")
        everything = ids + written
        for via in ("n1", "n3", "n4"):
            assert await sim.run(readable(sim, via, everything)) == []
        desc = await sim.run(n4.svc.collections.get("c"))
        assert desc["count"] == len(everything)
        # Searches through any node still see every document, as one exact index would.
        q = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
        req = SearchRequest(q, 10, None, None, None, True, False, False, None)
        want = await sim.run(n1.svc.reads.search(n1.svc.collections.entry("c"), req))
        got = await sim.run(n4.svc.reads.search(n4.svc.collections.entry("c"), req))
        assert not want["partial"] and [[h["id"] for h in r] for r in got["results"]] == \
            [[h["id"] for h in r] for r in want["results"]]
    finally:
        await sim.stop()


@pytest.mark.parametrize("stage", [Stage.ANNOUNCE, Stage.COPY, Stage.SWITCH, Stage.DROP])
async def test_a_driver_dying_at_any_stage_leaves_nothing_half_done(stage: Stage) -> None:
    """n3 drives a rebalance onto the new n4 and is killed as one of its moves enters
    `stage`. The leader clears its moves, nothing is lost or half-switched, and a rebalance
    after n3's return finishes the job."""
    sim = await SimCluster(3).start()
    try:
        ids = await fill(sim)
        await grow(sim)
        n1, n3 = sim.node("n1"), sim.node("n3")
        moves = plan_moves(n3.svc.runtime.state, n3.svc.view.alive())
        assert len(moves) == 3
        died: list[Transfer] = []

        def on_stage(t: Transfer) -> None:
            if t.stage == stage and not died:
                died.append(t)
                sim.pause("n3")  # from this instant, nothing more leaves n3

        n3.svc.rebalancer.on_stage = on_stage
        n3.svc.spawn(n3.svc.rebalancer.run(moves))
        await sim.until(lambda: bool(died), what=f"a move to reach {stage}")
        await sim.kill("n3")
        survivors = ["n1", "n2", "n4"]
        await sim.until(lambda: all(sim.states(n)["n3"] == State.DEAD for n in survivors),
                        what="n3 dead")
        await sim.until(lambda: not any(sim.moving(n, "c") for n in survivors)
                        and sim.maps_agree("c"), what="the abandoned moves cleared")
        # Nothing half-switched: every shard's replicas that are up hold all its documents.
        entry = sim.entry("n1", "c")
        assert entry is not None
        for s, reps in enumerate(entry.replicas):
            for n in reps:
                if n != "n3":
                    assert shard_ids(ids, s) <= set(records(sim.node(n), "c", s)), (s, n)
        held_by_n3 = [s for s, reps in enumerate(entry.replicas) if "n3" in reps]
        readable_now = [d for d in ids if shard_of(d, SHARDS) not in held_by_n3]
        assert await sim.run(readable(sim, "n2", readable_now)) == []

        await sim.boot(n3, join="n1")
        await sim.until(lambda: all(sim.sees_all_alive(n) for n in sim.running()),
                        what="n3 back")
        redo = plan_moves(n1.svc.runtime.state, n1.svc.view.alive())
        stats = await sim.run(n1.svc.rebalancer.run(redo))
        assert all(not t.error for t in stats.transfers)
        assert balanced(sim, "c", ["n1", "n2", "n3", "n4"])
        assert await sim.run(readable(sim, "n4", ids)) == []
        assert (await sim.run(sim.node("n2").svc.collections.get("c")))["count"] == N_DOCS
        await sim.until(lambda: holds_only_assigned(sim, "c"), what="orphaned copies dropped")
    finally:
        await sim.stop()


async def test_the_leader_re_replicates_a_dead_nodes_shards_and_drops_them_on_its_return() -> None:
    sim = await SimCluster(3, healer=HealerConfig(dead_grace_s=10, orphan_interval_s=2)).start()
    try:
        ids = await fill(sim, replication=2)
        n1, n2, n3 = (sim.node(n) for n in ("n1", "n2", "n3"))
        before = sim.entry("n1", "c")
        assert before is not None and any("n3" in reps for reps in before.replicas)
        await sim.kill("n3")
        t_dead = sim.clock.now()

        def healed() -> bool:
            e = sim.entry("n1", "c")
            assert e is not None
            return (not sim.moving("n1", "c") and sim.maps_agree("c")
                    and all(len(r) == 2 and "n3" not in r for r in e.replicas))

        await sim.until(healed, 120, "replication factor restored on n1, n2")
        assert sim.clock.now() - t_dead >= 10  # not before the grace period
        for s in range(SHARDS):
            assert set(records(n1, "c", s)) == set(records(n2, "c", s)) == shard_ids(ids, s)
        assert await sim.run(readable(sim, "n2", ids)) == []
        # n3 returns with its old copies: they are orphans now, and the leader drops them.
        assert n3.backend.local_shards("c")
        await sim.boot(n3, join="n1")
        await sim.until(lambda: sim.states("n1")["n3"] == State.ALIVE, what="n3 back")
        await sim.until(lambda: not n3.backend.local_shards("c"), 60, "n3's stale copies dropped")
        assert healed()
    finally:
        await sim.stop()
