"""What `scripts/simulate.py` measures on a `SimCluster`, one function per property, so that
`tests/test_scale_sim.py` checks the same code at 20 to 100 nodes."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import orjson

from aquila.cluster.membership.messages import MemberRow, PushPull, encode
from aquila.cluster.membership.suspicion import push_pull_scale, retransmit_limit, suspicion_timeout
from aquila.cluster.membership.table import State
from aquila.cluster.model.placement import place
from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.sim.core import SimCluster, SimNode
from aquila.cluster.state.entries import CollectionEntry
from aquila.cluster.state.statesync import REPLY, REQUEST, encode_sync

# Steady state: each member sends one ping a period and answers about one.
QUIET_PACKETS_PER_MEMBER_S = 2.5


def _r(x: float, digits: int = 3) -> float:
    return round(x, digits)


async def cold_start(sim: SimCluster, stagger: float = 1.0, limit: float = 600.0) -> dict[str, Any]:
    """Boot every node through one seed; time until every member knows every other."""
    await sim.boot(stagger)
    booted = sim.clock.now()
    took = await sim.run(limit, until=sim.all_know_all)
    if took is None:
        raise AssertionError(f"{len(sim.nodes)} nodes did not converge within {limit} s")
    seconds = booted + took
    cfg, n = sim.config, len(sim.nodes)
    return {
        "seconds": _r(seconds),
        "periods": _r(seconds / cfg.probe_interval, 1),
        "after_last_boot_s": _r(took),
        "log2_n": _r(math.log2(n), 2),
    }


async def quiesce(sim: SimCluster, limit: float = 600.0) -> float:
    """Run until the update storm of a join has drained (packet rate back to probing only);
    returns how long that took."""
    start = sim.clock.now()
    n = len(sim.running())
    while sim.clock.now() - start < limit:
        before = sim.net.sent
        await sim.run(1.0)
        if (sim.net.sent - before) / n < QUIET_PACKETS_PER_MEMBER_S:
            return sim.clock.now() - start
    raise AssertionError(f"gossip still busy after {limit} s")


async def one_join(sim: SimCluster, limit: float = 120.0) -> dict[str, Any]:
    """A new node joins through a random member: time until every member knows it."""
    others = sim.running()
    seed = sim.rng.choice(others)
    node = sim.add_node()
    await node.gossip.start()
    await node.gossip.join([seed.addr])
    group = others + [node]
    # The join's own push-pull takes no clock time: gossip spreads the news from here.
    took = await sim.run(limit, until=lambda: sim.all_know(node.id, group))
    if took is None:
        raise AssertionError(f"the join of {node.id} did not reach everyone in {limit} s")
    cfg, n = sim.config, len(group)
    return {
        "seconds": _r(took),
        "gossip_rounds": _r(took / cfg.gossip_interval, 1),
        "log2_n": _r(math.log2(n), 2),
        "rounds_per_log2_n": _r(took / cfg.gossip_interval / math.log2(n), 2),
    }


@dataclass
class Counters:
    packets: int
    bytes: int
    push_pulls: int
    push_pull_bytes: int
    suspicions: int
    deaths: int
    refutes: int
    probe_failures: int
    at: float


def counters(sim: SimCluster) -> Counters:
    packets, nbytes, pps, ppbytes = sim.load()
    return Counters(
        packets, nbytes, pps, ppbytes, sim.seen.suspicions, len(sim.seen.deaths),
        sum(x.gossip.stats.refutes for x in sim.nodes),
        sum(x.gossip.stats.probe_failures for x in sim.nodes),
        sim.clock.now(),
    )


def per_member(sim: SimCluster, a: Counters, b: Counters, members: int) -> dict[str, float]:
    """Load sent per member per second between two snapshots (UDP gossip and TCP push-pull)."""
    secs = b.at - a.at
    return {
        "packets_per_s": _r((b.packets - a.packets) / members / secs, 2),
        "bytes_per_s": _r((b.bytes - a.bytes) / members / secs, 1),
        "push_pull_per_s": _r((b.push_pulls - a.push_pulls) / members / secs, 4),
        # Each exchange's bytes are split between the two members that take part.
        "push_pull_bytes_per_s": _r((b.push_pull_bytes - a.push_pull_bytes) / members / secs, 1),
    }


async def steady_load(sim: SimCluster, seconds: float) -> dict[str, Any]:
    a = counters(sim)
    await sim.run(seconds)
    b = counters(sim)
    out = per_member(sim, a, b, len(sim.running()))
    out["window_s"] = seconds
    return out


async def detect_failure(sim: SimCluster, victim: SimNode, limit: float = 300.0) -> dict[str, Any]:
    """Kill `victim`: when is it first suspected, first declared dead, and declared dead by
    every other member?"""
    others = [x for x in sim.running() if x is not victim]
    start = sim.clock.now()
    # Only suspicions from now on: a member may have been suspected before (a warm start
    # probes members not yet started; loss), which is not this failure's detection.
    sim.seen.first_suspected.pop(victim.id, None)
    sim.seen.dead.pop(victim.id, None)
    await sim.kill(victim)
    took = await sim.run(
        limit,
        until=lambda: all(
            (m := x.gossip.member(victim.id)) is not None and m.state == State.DEAD
            for x in others
        ),
    )
    if took is None:
        raise AssertionError(f"{victim.id} not declared dead by all within {limit} s")
    cfg, n = sim.config, len(others) + 1
    lo = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
    dead_at = sim.seen.dead[victim.id]
    first_suspect = sim.seen.first_suspected[victim.id] - start
    return {
        "first_suspicion_s": _r(first_suspect),
        "first_dead_s": _r(min(dead_at.values()) - start),
        "all_dead_s": _r(took),
        "suspicion_lo_s": _r(lo),  # memberlist: mult × max(1, log10 n) × interval
        "suspicion_hi_s": _r(cfg.suspicion_max_timeout_mult * lo),
        "suspected_to_all_dead_s": _r(took - first_suspect),
    }


async def false_deaths(sim: SimCluster, seconds: float) -> dict[str, Any]:
    """Run under whatever faults are set; count running members that running members
    declared dead."""
    down = sim.down
    a = counters(sim)
    first = len(sim.seen.deaths)
    await sim.run(seconds)
    b = counters(sim)
    wrong = [
        (t, obs, node)
        for t, obs, node in sim.seen.deaths[first:]
        if node not in down and obs not in down
    ]
    members = len(sim.running())
    return {
        "periods": _r(seconds / sim.config.probe_interval, 0),
        "false_deaths": len(wrong),  # (observer, node) declarations
        "nodes_wrongly_dead": len({node for _, _, node in wrong}),
        "suspicions": b.suspicions - a.suspicions,
        "refutations": b.refutes - a.refutes,
        "failed_probes": b.probe_failures - a.probe_failures,
        "load": per_member(sim, a, b, members),
    }


async def slow_members(
    sim: SimCluster, count: int, seconds: float, lo: float = 0.6, hi: float = 1.1
) -> dict[str, Any]:
    """`count` members handle what they receive late: after `lo` to `hi` times the probe
    timeout (mostly just in time, sometimes not). Wrongly declared deaths, as above."""
    timeout = sim.config.probe_timeout
    slow = sim.rng.sample(sim.running(), count)
    for x in slow:
        sim.net.slow_down(x.addr, lo * timeout, hi * timeout)
    out = await false_deaths(sim, seconds)
    out["slow_members"] = count
    out["delay_s"] = [_r(lo * timeout), _r(hi * timeout)]
    # Lifeguard: the slow ones should see themselves as the unhealthy ones.
    out["slow_health_scores"] = [x.gossip.health_score for x in slow]
    for x in slow:
        sim.net.slow_down(x.addr, 0.0, 0.0)
    return out


# --- cluster state ---------------------------------------------------------------------


def new_collection(
    node: SimNode, name: str, shards: int, replication: int, nodes: list[str]
) -> CollectionEntry:
    """The entry `Coordinator.create_collection` would publish on `node`."""
    spec = CollectionSpec(name, dim=384, metric="cosine", shards=shards, replication=replication)
    replicas = place(shards, replication, nodes, salt=name)
    return node.replica.state.next_entry(
        CollectionEntry(spec, (), 0, node.id, uid=hashlib.blake2b(name.encode(), digest_size=16).hexdigest()),
        node.id,
        replicas=tuple(tuple(r) for r in replicas),
        moving=tuple(None for _ in replicas),
    )


def install_state(sim: SimCluster, collections: int, shards: int, replication: int) -> None:
    """Give every node the same `collections` (as if long converged), without gossip."""
    nodes = [x.id for x in sim.running()]
    origin = sim.nodes[0]
    entries = []
    for c in range(collections):
        e = new_collection(origin, f"coll-{c:03d}", shards, replication, nodes)
        origin.replica.merge([e])
        entries.append(e)
    for x in sim.nodes[1:]:
        x.replica.merge(entries)


def state_sizes(sim: SimCluster) -> dict[str, Any]:
    """Bytes of the state and of one push-pull message, full versus incremental (in sync)."""
    node = sim.nodes[0]
    state = node.replica.state
    rows = tuple(MemberRow(m.id, m.addr, m.state.value, m.incarnation, m.meta)
                 for m in node.gossip.members())
    entries = list(state.collections.values())
    full_user = state.encode()
    inc_request = encode_sync(REQUEST, state, [])
    inc_reply = encode_sync(REPLY, state, [])
    members_only = len(encode(PushPull(False, rows, b"")))

    def msg(user: bytes) -> int:
        return len(encode(PushPull(False, rows, user)))

    n = len(sim.running())
    interval = push_pull_scale(sim.config.push_pull_interval, n)
    full, inc = msg(full_user), msg(inc_request) + msg(inc_reply)
    return {
        "collections": len(entries),
        "entry_bytes": max((len(orjson.dumps(e.to_json())) for e in entries), default=0),
        "state_bytes": len(full_user),
        "push_pull_interval_s": interval,
        "member_rows_bytes": members_only,
        # One exchange = request + reply.
        "exchange_full_bytes": 2 * full,
        "exchange_incremental_bytes": inc,
        # Every member starts one exchange per interval and answers one on average, so
        # sends one exchange's worth (its request, a reply) per interval.
        "full_bytes_per_member_s": _r(2 * full / interval, 1),
        "incremental_bytes_per_member_s": _r(inc / interval, 1),
    }


async def state_spread(sim: SimCluster, entry: CollectionEntry, limit: float) -> float | None:
    """Publish `entry` on node 0 (without the coordinator's direct pushes: gossip and
    push-pull alone); the time until every live node holds it, or None."""
    want = entry.version
    sim.nodes[0].replica.publish(entry)
    group = sim.running()

    def everywhere() -> bool:
        return all(
            (e := x.replica.state.collections.get(entry.spec.name)) is not None
            and e.version >= want
            for x in group
        )

    return await sim.run(limit, until=everywhere)


def dissemination_bound(sim: SimCluster, n: int) -> float:
    """A generous bound for one update to reach all: sent in every gossip round until its
    retransmit budget is spent (the same bound tests/test_gossip_sim.py uses)."""
    cfg = sim.config
    return retransmit_limit(cfg.retransmit_mult, n) * cfg.gossip_interval * 2
