"""The replicated cluster state, in one process: collections created and deleted through any
node reach every node and its storage; a node that missed a push catches up by gossip; and
concurrent changes of one collection from two nodes converge to one outcome everywhere."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.simcluster import SimCluster, batch, spec


@pytest.fixture
async def sim() -> AsyncIterator[SimCluster]:
    c = SimCluster(3)
    await c.start()
    yield c
    await c.stop()


def storage_matches_map(sim: SimCluster, name: str) -> bool:
    """Every running node holds exactly the shards its map gives it, of that incarnation (a
    node the map gives none may keep an emptied local collection of an older one)."""
    for node in sim.running():
        entry = sim.entry(node.id, name)
        coll = node.backend.collections.get(name)
        mine = entry.shards_of(node.id) if entry is not None else []
        if not mine:
            if coll is not None and (entry is None or coll.shards):
                return False
            continue
        if coll is None or coll.uid != entry.uid or coll.spec != entry.spec:  # type: ignore[union-attr]
            return False
        if sorted(coll.shards) != mine:
            return False
    return True


async def test_create_and_delete_through_any_node_reach_every_node(sim: SimCluster) -> None:
    n1, n2, n3 = (sim.node(n) for n in ("n1", "n2", "n3"))
    desc, created = await sim.run(n1.svc.collections.create(spec("c", replication=2)))
    assert created and desc["count"] == 0 and len(desc["shard_states"]) == 6
    # Pushed before the create returned: every node has the entry, and it is the same one.
    assert sim.maps_agree("c") and all(sim.entry(n, "c") is not None for n in sim.nodes)
    held = {n for st in desc["shard_states"] for n in st["replicas"]}
    assert held == {"n1", "n2", "n3"}
    await sim.until(lambda: storage_matches_map(sim, "c"), what="shards opened everywhere")
    # Written through one node, read and counted through another.
    entry = n2.svc.collections.entry("c")
    await sim.run(n2.svc.writes.upsert(entry, batch([f"d{i}" for i in range(40)])))
    got = await sim.run(n3.svc.collections.get("c"))
    assert got["count"] == 40
    # The same create again is not an error; another spec under the name is.
    assert (await sim.run(n3.svc.collections.create(spec("c", replication=2))))[1] is False
    with pytest.raises(Exception, match="exists with other settings"):
        await sim.run(n3.svc.collections.create(spec("c", replication=1)))
    await sim.run(n3.svc.collections.delete("c"))
    assert all(sim.entry(n, "c") is None for n in sim.nodes)
    await sim.until(lambda: storage_matches_map(sim, "c"), what="storage dropped everywhere")
    assert all(not n.backend.has("c") for n in sim.running())


async def test_a_node_that_missed_the_push_catches_up_by_gossip(sim: SimCluster) -> None:
    n1, n3 = sim.node("n1"), sim.node("n3")
    sim.cut("n1", "n3")
    sim.cut("n2", "n3")
    await sim.run(n1.svc.collections.create(spec("c")))
    assert sim.entry("n3", "c") is None  # its push could not arrive
    sim.heal("n1", "n3")
    sim.heal("n2", "n3")
    await sim.until(lambda: sim.maps_agree("c") and storage_matches_map(sim, "c"), 120,
                    "n3 to learn the collection and open its shards")
    assert sim.entry("n3", "c") is not None
    assert n3.state_file and b'"c"' in n3.state_file  # persisted for a restart


async def test_restarted_node_reconciles_its_storage_with_the_map(sim: SimCluster) -> None:
    n1 = sim.node("n1")
    await sim.run(n1.svc.collections.create(spec("c", replication=3)))
    await sim.until(lambda: storage_matches_map(sim, "c"), what="shards opened")
    await sim.kill("n3")
    # While n3 is down the collection is deleted and another one created.
    await sim.run(n1.svc.collections.delete("c"))
    await sim.run(n1.svc.collections.create(spec("d", replication=3)))
    assert sim.node("n3").backend.has("c") and not sim.node("n3").backend.has("d")
    await sim.boot(sim.node("n3"), join="n1")
    await sim.until(lambda: storage_matches_map(sim, "c") and storage_matches_map(sim, "d"),
                    what="n3 to drop c and open d")
    assert not sim.node("n3").backend.has("c")


async def test_two_creates_of_one_name_at_once_converge_to_one_incarnation(
    sim: SimCluster,
) -> None:
    """n1 and n2 cannot hear each other while both create "c", with other settings: each
    answers its client, and once they can talk every node keeps the same one of the two,
    with storage of that incarnation only."""
    n1, n2 = sim.node("n1"), sim.node("n2")
    sim.cut("n1", "n2")
    sim.cut("n1", "n3")
    a, b = await sim.run(n1.svc.collections.create(spec("c", dim=4))), \
        await sim.run(n2.svc.collections.create(spec("c", dim=8)))
    assert a[1] and b[1]
    assert sim.entry("n1", "c") != sim.entry("n2", "c")
    sim.heal("n1", "n2")
    sim.heal("n1", "n3")
    await sim.until(lambda: sim.maps_agree("c") and storage_matches_map(sim, "c"), 120,
                    "one incarnation everywhere")
    winner = sim.entry("n1", "c")
    assert winner is not None
    # Last writer wins by (epoch, origin): both made epoch 1, so n2's is the one.
    assert winner.origin == "n2" and winner.spec.dim == 8


async def test_delete_on_one_node_and_recreate_on_another_at_once(sim: SimCluster) -> None:
    """"c" exists; cut off from each other, n1 deletes it while n2 deletes it and creates it
    again with other settings. The later change (n2's create) wins everywhere, and n1 holds
    the new incarnation's shards, none of the old one's documents."""
    n1, n2 = sim.node("n1"), sim.node("n2")
    await sim.run(n1.svc.collections.create(spec("c", replication=3)))
    entry = n1.svc.collections.entry("c")
    await sim.run(n1.svc.writes.upsert(entry, batch([f"old{i}" for i in range(20)])))
    await sim.until(lambda: storage_matches_map(sim, "c"), what="c everywhere")
    for other in ("n2", "n3"):
        sim.cut("n1", other)
    await sim.run(n1.svc.collections.delete("c"))
    await sim.run(n2.svc.collections.delete("c"))
    _, created = await sim.run(n2.svc.collections.create(spec("c", dim=8, replication=3)))
    assert created
    assert sim.entry("n1", "c") is None and sim.entry("n2", "c") is not None
    for other in ("n2", "n3"):
        sim.heal("n1", other)
    await sim.until(lambda: sim.maps_agree("c") and storage_matches_map(sim, "c"), 120,
                    "the recreated collection everywhere")
    new = sim.entry("n1", "c")
    assert new is not None and new.spec.dim == 8 and new.origin == "n2"
    assert all(not n.backend.live_ids("c") for n in sim.running())
