"""The properties scripts/simulate.py measures at 1,000 nodes, checked at 20 to 100 with the
same code (cluster/sim/: core, runs, place, fanout): in-process, under a
ManualClock, nothing sleeps."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.membership.messages import BroadcastQueue
from aquila.cluster.membership.suspicion import retransmit_limit, suspicion_timeout
from aquila.cluster.sim import place as sim_place
from aquila.cluster.sim import runs as sim_runs
from aquila.cluster.sim.core import SimCluster
from aquila.cluster.sim.fanout import fan_out_ms

pytestmark = pytest.mark.simulation


async def booted(n: int, seed: int = 1) -> SimCluster:
    sim = SimCluster(n, seed=seed)
    await sim_runs.cold_start(sim)
    await sim_runs.quiesce(sim)
    return sim


def gossip_bound(sim: SimCluster, n: int) -> float:
    """An update is piggybacked retransmit_limit times, three peers per gossip round: it has
    reached everyone long before its budget is spent twice over."""
    cfg = sim.config
    return retransmit_limit(cfg.retransmit_mult, n) * cfg.gossip_interval * 2


async def test_convergence_within_the_dissemination_bound() -> None:
    sim = SimCluster(60, seed=2)
    try:
        cold = await sim_runs.cold_start(sim, stagger=1.0)
        # Everyone joined through one seed within a second; the rest is gossip.
        assert cold["after_last_boot_s"] <= gossip_bound(sim, 60)
        await sim_runs.quiesce(sim)
        joins = [await sim_runs.one_join(sim) for _ in range(3)]
        for j in joins:
            assert j["seconds"] <= gossip_bound(sim, 63)
            # Epidemic spread: O(log n) gossip rounds, a small constant times log2 n.
            assert j["gossip_rounds"] <= 2 * math.log2(63)
    finally:
        await sim.stop()


async def test_killed_node_is_declared_dead_by_all_within_the_suspicion_bound() -> None:
    n = 80
    sim = await booted(n, seed=3)
    try:
        cfg = sim.config
        lo = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
        for victim in (sim.nodes[11], sim.nodes[47]):
            r = await sim_runs.detect_failure(sim, victim)
            # Someone probes it within a few periods (each member probes one peer a period).
            assert r["first_suspicion_s"] <= 5 * cfg.probe_interval
            # Lifeguard: independent confirmations bring the timeout to its floor (lo), far
            # below the ceiling a lone accusation waits (6·lo); then the death spreads.
            assert lo - cfg.probe_interval <= r["suspected_to_all_dead_s"]
            assert r["suspected_to_all_dead_s"] <= lo + gossip_bound(sim, n)
        # Nobody else died: the first victim was declared dead by 79, the second by 78.
        assert sim_runs.counters(sim).deaths == (n - 1) + (n - 2)
    finally:
        await sim.stop()


async def test_no_false_deaths_at_ten_percent_loss() -> None:
    sim = await booted(50, seed=4)
    try:
        sim.net.default_drop = 0.10
        r = await sim_runs.false_deaths(sim, 400 * sim.config.probe_interval)
        assert r["false_deaths"] == 0, r
        # The loss did bite: probes failed, members were suspected and refuted.
        assert r["failed_probes"] > 0 and r["refutations"] > 0
        sim.net.default_drop = 0.0
        await sim.run(30.0)
        assert sim.all_know_all()
    finally:
        await sim.stop()


async def test_no_false_deaths_with_slow_members() -> None:
    sim = await booted(40, seed=5)
    try:
        r = await sim_runs.slow_members(sim, 3, 200 * sim.config.probe_interval)
        assert r["false_deaths"] == 0, r
    finally:
        await sim.stop()


async def test_load_per_member_is_flat_from_20_to_100_nodes() -> None:
    loads = {}
    for n in (20, 100):
        sim = await booted(n, seed=6)
        try:
            loads[n] = await sim_runs.steady_load(sim, 30.0)
        finally:
            await sim.stop()
    small, big = loads[20], loads[100]
    # One ping a period and about one ack: two packets a second, whatever n is.
    assert small["packets_per_s"] == pytest.approx(2.0, rel=0.1)
    assert big["packets_per_s"] == pytest.approx(small["packets_per_s"], rel=0.1)
    assert big["bytes_per_s"] == pytest.approx(small["bytes_per_s"], rel=0.15)


async def test_state_spreads_and_push_pull_is_incremental() -> None:
    sim = await booted(30, seed=7)
    try:
        nodes = [x.id for x in sim.running()]
        small = sim_runs.new_collection(sim.nodes[0], "small", 4, 1, nodes)
        took = await sim_runs.state_spread(sim, small, 60.0)
        assert took is not None and took <= gossip_bound(sim, 30)
        sim_runs.install_state(sim, 20, 64, 3)
        sizes = sim_runs.state_sizes(sim)
        # Members in sync exchange digests: a small fraction of the full state.
        assert sizes["exchange_incremental_bytes"] * 10 < sizes["exchange_full_bytes"]
        # An entry too big for a packet reaches everyone by push-pull alone (pulls, and the
        # origin pushing its change along its next requests) within a few intervals.
        big = sim_runs.new_collection(sim.nodes[0], "big", 64, 3, nodes)
        interval = sizes["push_pull_interval_s"]
        took = await sim_runs.state_spread(sim, big, 12 * interval)
        assert took is not None
    finally:
        await sim.stop()


def test_placement_stays_balanced_stable_and_minimal() -> None:
    nodes = sim_place.node_ids(120)
    maps, factor = sim_place.balanced_maps(nodes, 12, 32, 3)
    zone = set(random.Random(1).sample(nodes, 12))
    cases = [
        nodes + sim_place.node_ids(1, "new"),
        nodes + sim_place.node_ids(10, "new"),
        nodes[1:],
        [x for x in nodes if x not in zone],
    ]
    for live in cases:
        r = sim_place.scenario("case", maps, factor, live)
        assert r["spread_after"] == {"per_collection": 1, "overall": 1}
        assert r["stable"]
        assert r["moves"] == r["lower_bound"], r
        moves = r["moves_list"]
        ex = sim_place.schedule(moves, 10_000, per_node=2, docs_per_s=10_000.0)
        into = max(sum(1 for m in moves if m.to_node == x) for x in live)
        # No node ever runs more than its 2 slots, so the busiest target sets the pace.
        assert ex["makespan_s"] >= math.ceil(into / 2) * ex["move_s"] - 1e-9


def test_fan_out_latency_grows_with_width_and_replicas_cut_it() -> None:
    samples = np.random.default_rng(0).lognormal(mean=1.0, sigma=0.6, size=5_000)
    rng = np.random.default_rng(1)

    def p(width: int, **kw: float) -> tuple[float, float]:
        lat = fan_out_ms(samples, width, rng, queries=4_000, **kw)  # type: ignore[arg-type]
        return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))

    one, ten, hundred = p(1), p(10), p(100)
    assert one[0] < ten[0] < hundred[0]
    # The slowest of 100 is, at the median, beyond one node's p95.
    assert hundred[0] > float(np.percentile(samples, 95))
    fast2, fast3 = p(100, replicas=2), p(100, replicas=3)
    hedged = p(100, replicas=2, hedge_ms=float(np.percentile(samples, 95)))
    assert fast3[1] < fast2[1] < hundred[1]
    assert hedged[1] < hundred[1]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from(["queue", "take"]), st.integers(0, 5),
                          st.integers(1, 40)), max_size=60),
       st.integers(1, 4))
def test_broadcast_queue_matches_a_sorting_reference(
    ops: list[tuple[str, int, int]], limit: int
) -> None:
    # The heap queue must pick what sorting the whole queue by (transmits, newest) picks.
    q = BroadcastQueue(lambda: limit)
    ref: list[list[object]] = []  # [key, data, seq, transmits]
    seq = 0
    for op, key, size in ops:
        if op == "queue":
            seq += 1
            data = bytes([key]) * size + seq.to_bytes(2, "big")
            q.queue(f"k{key}", data)
            ref = [b for b in ref if b[0] != f"k{key}"] + [[f"k{key}", data, seq, 0]]
        else:
            budget = size * 3
            got = q.take(budget)
            ref.sort(key=lambda b: (b[3], -b[2]))  # type: ignore[operator]
            want = []
            for b in list(ref):
                cost = len(b[1]) + 1  # type: ignore[arg-type]
                if cost > budget:
                    continue
                budget -= cost
                want.append(b[1])
                b[3] += 1  # type: ignore[operator]
                if b[3] >= limit:  # type: ignore[operator]
                    ref.remove(b)
            assert got == want
        assert len(q) == len(ref)


def test_metadata_kept_per_document_costs_its_length_not_a_buffer() -> None:
    # A shard keeps every live document's metadata bytes (node/storage/shard.py); orjson's
    # results hold a ~4 KiB buffer each, which at 100M documents is 400 GB. Every decoding
    # path that builds them (peer writes, the general upsert parser, the columnar form's
    # general parser) must keep only the bytes.
    import base64
    import tracemalloc

    import orjson

    from aquila.cluster.replication.remote import decode_writes
    from aquila.node.http.columnar import parse_columnar
    from aquila.node.http.parse import parse_documents

    n, dim = 2_000, 4
    meta = {"text": "x" * 100, "pos": "noun"}
    vec = np.ones(dim, dtype="<f4").tobytes()
    wire = [{"shard": 0, "docs": [{"id": f"d{i}", "v": base64.b64encode(vec).decode(),
                                   "m": meta, "ver": 1, "w": "n"} for i in range(n)]}]
    body = {"documents": [{"id": f"d{i}", "vector": [1.0] * dim, "metadata": meta}
                          for i in range(n)]}
    columnar = {"ids": [f"d{i}" for i in range(n)],
                "vectors_b64": base64.b64encode(vec * n).decode(), "metadata": [meta] * n}
    builds = {
        "peer writes": lambda: decode_writes(wire, dim),
        "documents": lambda: parse_documents(body, dim),
        "columnar": lambda: parse_columnar(columnar, dim),
    }
    for what, build in builds.items():
        tracemalloc.start()
        kept = build()
        used, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert kept
        assert used / n < 1_000, f"{what}: {used / n:.0f} bytes a document"
    assert len(orjson.dumps(meta)) < 200


async def test_a_storm_of_suspicions_does_not_stall_the_probe_round() -> None:
    # A member heard to be suspect is probed early (its ack carries a refutation we missed),
    # but at most every other period and from a bounded queue: when a tenth of a cluster
    # fails at once, or a peer floods us with accusations, the round robin still goes on.
    from aquila.cluster.membership.messages import Suspect
    from aquila.cluster.membership.table import State

    sim = await booted(40, seed=9)
    try:
        me = sim.nodes[0].gossip
        accused = [n.id for n in sim.nodes[1:31]]
        for nid in accused:
            m = me.member(nid)
            assert m is not None
            me.inject(Suspect(m.incarnation, nid, sim.nodes[39].id))
        assert sum(me.member(nid).state == State.SUSPECT for nid in accused) == 30  # type: ignore[union-attr]
        queued = list(me._suspects)
        assert 1 <= len(queued) <= 8 and set(queued) <= set(accused)
        targets = [me._next_probe_target() for _ in range(20)]
        # Every other target is a queued suspect while the queue lasts ...
        assert [t.id for t in targets[: 2 * len(queued) : 2] if t is not None] == queued
        # ... and the others follow the round robin, which keeps moving.
        rest = [t.id for t in targets[1::2] if t is not None]
        assert len(rest) == 10 and len(set(rest)) == 10
    finally:
        await sim.stop()
