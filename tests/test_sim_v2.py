"""Count, scroll and search by stored id through the cluster, in one process (the in-memory
network, the in-memory storage twin, a fake clock): answers against an oracle over several
nodes and replicas, missing shards (partial or 503), a paused replica hedged around, and a
scroll that every document existing throughout passes exactly once while writes go on and
shards move to a new node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.cluster.membership.table import State
from aquila.cluster.model.cursor import decode_cursor
from aquila.cluster.model.errors import NotFound, Unavailable
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.operations import CountRequest, ScrollRequest, SearchRequest
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.movement.healer import HealerConfig
from aquila.cluster.movement.rebalance import plan_moves
from aquila.cluster.replication import remote
from aquila.cluster.service import ClusterService
from tests.simcluster import SimCluster, batch, spec

SHARDS = 6
N = 120
FIRST_HALF = {"must": [{"key": "n", "range": {"lt": 60}}]}  # batch() writes {"n": row}


def counting(flt: Any = None, allow_partial: bool = True, timeout_ms: int | None = None
             ) -> CountRequest:
    return CountRequest(flt, parse_filter(flt), allow_partial, timeout_ms)


def scrolling(flt: Any = None, limit: int = 25, cursor: str | None = None,
              allow_partial: bool = False, vector: bool = False,
              timeout_ms: int | None = None) -> ScrollRequest:
    pos = None if cursor is None else decode_cursor(cursor, "c", SHARDS)
    return ScrollRequest(flt, parse_filter(flt), limit, pos, True, vector, allow_partial,
                         timeout_ms)


async def scroll_all(sim: SimCluster, svc: ClusterService, name: str = "c", **kw: Any
                     ) -> tuple[list[dict[str, Any]], list[int]]:
    docs: list[dict[str, Any]] = []
    missing: list[int] = []
    cursor = None
    while True:
        entry = svc.collections.entry(name)
        page = await sim.run(svc.reads.scroll(entry, scrolling(cursor=cursor, **kw)))
        docs += page["documents"]
        missing += page["missing_shards"]
        cursor = page["next_cursor"]
        if cursor is None:
            return docs, missing


@pytest.fixture
async def sim() -> AsyncIterator[SimCluster]:
    c = SimCluster(3, healer=HealerConfig(dead_grace_s=600, anti_entropy_interval_s=3600))
    await c.start()
    yield c
    await c.stop()


async def fill(sim: SimCluster, replication: int) -> list[str]:
    n1 = sim.node("n1")
    await sim.run(n1.svc.collections.create(spec("c", shards=SHARDS, replication=replication)))
    ids = [f"d{i:03d}" for i in range(N)]
    await sim.run(n1.svc.writes.upsert(n1.svc.collections.entry("c"), batch(ids)))
    return ids


@pytest.mark.parametrize("via", ["n1", "n2", "n3"])
async def test_count_and_scroll_through_any_node(sim: SimCluster, via: str) -> None:
    ids = await fill(sim, replication=2)
    svc = sim.node(via).svc
    entry = svc.collections.entry("c")
    assert await sim.run(svc.reads.count(entry, counting())) == \
        {"count": N, "partial": False, "missing_shards": []}
    assert (await sim.run(svc.reads.count(entry, counting(FIRST_HALF))))["count"] == 60
    docs, missing = await scroll_all(sim, svc, vector=True)
    assert missing == [] and sorted(d["id"] for d in docs) == ids
    assert [(shard_of(d["id"], SHARDS), d["id"]) for d in docs] == \
        sorted((shard_of(d["id"], SHARDS), d["id"]) for d in docs)
    want = batch(ids)
    for d in docs:
        row = int(d["id"][1:])
        assert np.asarray(d["vector"], np.float32).tobytes() == want.vectors[row].tobytes()
        assert orjson.loads(orjson.dumps(d["metadata"])) == orjson.loads(want.metadata[row])
    half, _ = await scroll_all(sim, svc, flt=FIRST_HALF, limit=7)
    assert sorted(d["id"] for d in half) == ids[:60]


async def test_search_by_stored_id_through_the_cluster(sim: SimCluster) -> None:
    ids = await fill(sim, replication=1)
    svc = sim.node("n2").svc
    entry = svc.collections.entry("c")
    x = batch(ids).vectors
    rows = [5, 77]
    req = SearchRequest(np.zeros((2, 4), np.float32), 5, None, None, None, True, False, True,
                        None, query_ids=[ids[r] for r in rows])
    out = await sim.run(svc.reads.search(entry, req))
    for r, hits in zip(rows, out["results"], strict=True):
        d = ((x - x[r]) ** 2).sum(axis=1)
        d[r] = np.inf
        assert [h["id"] for h in hits] == [ids[j] for j in np.argsort(d, kind="stable")[:5]]
    req.query_ids = ["d999"]
    with pytest.raises(NotFound):
        await sim.run(svc.reads.search(entry, req))


async def test_a_shard_without_a_live_replica_is_missing_or_a_503(sim: SimCluster) -> None:
    ids = await fill(sim, replication=1)
    await sim.kill("n3")
    await sim.until(lambda: sim.states("n1")["n3"] == State.DEAD, what="n3 dead")
    svc = sim.node("n1").svc
    entry = svc.collections.entry("c")
    lost = sorted(entry.shards_of("n3"))
    assert lost
    kept = [d for d in ids if shard_of(d, SHARDS) not in lost]
    got = await sim.run(svc.reads.count(entry, counting()))
    assert got == {"count": len(kept), "partial": True, "missing_shards": lost}
    with pytest.raises(Unavailable, match="no live replica"):
        await sim.run(svc.reads.count(entry, counting(allow_partial=False)))
    # A scroll is a walk over everything: by default a missing shard is a 503 (the same
    # cursor may be tried again); allow_partial skips it and says so.
    with pytest.raises(Unavailable, match="allow_partial"):
        await scroll_all(sim, svc)
    docs, missing = await scroll_all(sim, svc, allow_partial=True, limit=9)
    assert sorted(d["id"] for d in docs) == kept and missing == lost


async def test_a_paused_replica_is_hedged_around(sim: SimCluster) -> None:
    ids = await fill(sim, replication=2)
    sim.pause("n2")  # not suspected yet: asked first for some shards, it never answers
    svc = sim.node("n1").svc
    entry = svc.collections.entry("c")
    got = await sim.run(svc.reads.count(entry, counting(timeout_ms=8000)))
    assert got == {"count": N, "partial": False, "missing_shards": []}
    docs, missing = await scroll_all(sim, svc, limit=50, timeout_ms=8000)
    assert sorted(d["id"] for d in docs) == ids and missing == []


async def test_scroll_while_writes_go_on_and_shards_move(sim: SimCluster) -> None:
    """New documents, deletes and updates between pages, and a fourth node taking shards
    over in the middle: every document that existed throughout is returned exactly once."""
    ids = await fill(sim, replication=2)
    svc = sim.node("n1").svc
    stable = set(ids[20:])
    seen: list[str] = []
    cursor = None
    step = 0
    n4 = None
    while True:
        entry = svc.collections.entry("c")
        page = await sim.run(svc.reads.scroll(entry, scrolling(cursor=cursor, limit=8)))
        seen += [d["id"] for d in page["documents"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        step += 1
        writes = sim.node("n2").svc.writes
        e2 = sim.node("n2").svc.collections.entry("c")
        await sim.run(writes.upsert(e2, batch([f"new{step}-{j}" for j in range(5)], seed=step)))
        await sim.run(writes.upsert(e2, batch(ids[30 + step:31 + step], seed=99)))  # update
        await sim.run(writes.delete(e2, ids[step:step + 1], "quorum"))  # among the first 20
        if step == 3:
            n4 = sim.add_node()
            await sim.boot(n4, join="n1")
            await sim.until(lambda: all(sim.sees_all_alive(n) for n in sim.running()),
                            what="n4 alive")
            n1 = sim.node("n1").svc
            moves = plan_moves(n1.runtime.state, ["n1", "n2", "n3", "n4"])
            await sim.run(n1.rebalancer.run(moves))
    assert n4 is not None and sim.node("n1").svc.collections.entry("c").shards_of("n4")
    assert len(seen) == len(set(seen)), "a document came twice"
    assert stable <= set(seen)


async def test_search_by_recall_names_the_probes_of_every_node(sim: SimCluster) -> None:
    """The target travels to every node holding a shard (in the peer frame), and each node's
    plans come back with the hits, so the answer names the nprobe used for every shard."""
    await fill(sim, replication=1)
    svc = sim.node("n1").svc
    entry = svc.collections.entry("c")
    req = SearchRequest(np.zeros((1, 4), np.float32), 5, None, None, None, True, False, True,
                        None, recall=0.9)
    out = await sim.run(svc.reads.search(entry, req))
    assert len(out["results"][0]) == 5
    per = out["nprobes"]
    assert [p["shard"] for p in per] == list(range(SHARDS))
    owners = {s: reps[0] for s, reps in enumerate(entry.replicas)}
    assert {p["node"] for p in per} == set(owners.values()) and len(set(owners.values())) > 1
    assert all(p["node"] == owners[p["shard"]] and p["nprobe"] >= 1 for p in per)


@pytest.mark.parametrize("op", ["count", "scroll"])
async def test_a_malformed_answer_of_the_only_replica_is_its_failure(
    sim: SimCluster, op: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer answering a count or a page with something malformed fails as that node (the
    shard missing, or a 503), whether or not it was the only node asked: never an unhandled
    ValueError (a 500)."""
    n1 = sim.node("n1").svc
    await sim.run(n1.collections.create(spec("c", shards=1, replication=1)))
    entry = n1.collections.entry("c")
    via = next(n for n in ("n1", "n2", "n3") if n != entry.replicas[0][0])
    svc = sim.node(via).svc
    await sim.run(svc.writes.upsert(entry, batch(["a", "b"])))

    async def bad(self: object, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"counts": {"x": 1}} if op == "count" else {"docs": [["a", "[1]", None]]}

    monkeypatch.setitem(remote._OPS, op, bad)
    if op == "count":
        got = await sim.run(svc.reads.count(entry, counting()))
        assert got == {"count": 0, "partial": True, "missing_shards": [0]}
    else:
        with pytest.raises(Unavailable):
            await sim.run(svc.reads.scroll(entry, scrolling()))
