"""The rebalance planner and the move executor's limits at size (scripts/simulate.py).

The planner is the real `movement.plan.plan` on maps laid out by the real `placement.place`.
The executor is not run (it moves documents between real nodes); its schedule is computed
from the rules `cluster/movement/rebalance.py` applies: every move holds one of `moves_per_node` slots
on each of its two nodes, taken in node order, first come first served, and copies at most
`transfer_docs_per_s` documents a second; one node (the driver) carries every move.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from aquila.cluster.model.placement import place
from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.movement.plan import Move, _FlowGraph, apply, plan
from aquila.cluster.state.entries import CollectionEntry

Maps = dict[str, list[list[str]]]

# A document as a move sends it (replication/remote.py encode_writes): 384 float32 in base64
# (2,048 bytes) plus id, version, writer and a little metadata.
WIRE_BYTES_PER_DOC = 2_200


def entry_bytes(maps: Maps) -> int:
    """Bytes of the largest collection entry as the map pushes send it."""
    largest = max(maps, key=lambda name: sum(len(r) for r in maps[name]))
    shard_map = maps[largest]
    spec = CollectionSpec(largest, dim=384, metric="cosine", shards=len(shard_map), replication=3)
    entry = CollectionEntry(spec, tuple(tuple(r) for r in shard_map), 1, "node-000000000000",
                            moving=tuple(None for _ in shard_map), uid="0" * 32)
    return len(orjson.dumps([entry.to_json()]))


def node_ids(n: int, prefix: str = "node") -> list[str]:
    return [f"{prefix}-{i:012x}" for i in range(n)]


def balanced_maps(
    nodes: list[str], collections: int, shards: int, replication: int
) -> tuple[Maps, dict[str, int]]:
    """`collections` laid out by `place` as they are created, then rebalanced once (as an
    operator would), so that each scenario starts from an even cluster."""
    maps = {f"coll-{c:03d}": place(shards, replication, nodes, salt=f"coll-{c:03d}")
            for c in range(collections)}
    factor = dict.fromkeys(maps, replication)
    return apply(maps, plan(maps, factor, nodes)), factor


def spread(maps: Mapping[str, list[list[str]]], live: Sequence[str]) -> tuple[int, int]:
    """(largest per-collection spread, overall spread) of replica counts over live nodes."""
    alive = set(live)
    total = dict.fromkeys(live, 0)
    worst = 0
    for shard_map in maps.values():
        per = dict.fromkeys(live, 0)
        for replicas in shard_map:
            for node in replicas:
                if node in alive:
                    per[node] += 1
                    total[node] += 1
        worst = max(worst, max(per.values()) - min(per.values()))
    return worst, max(total.values()) - min(total.values())


def lower_bound(maps: Maps, replication: Mapping[str, int], live: Sequence[str]) -> int:
    """A bound no plan can beat: every lost or missing replica costs a move; so does every
    replica a node holds above its final share (overall and per collection), and every one
    it lacks below it (overall and per collection)."""
    alive = set(live)
    width = len(alive)
    fixes = 0
    load = dict.fromkeys(alive, 0)
    per_total = 0
    per_short = 0
    final_total = 0
    for name, shard_map in maps.items():
        count = dict.fromkeys(alive, 0)
        total = 0
        for replicas in shard_map:
            held = [node for node in replicas if node in alive]
            size = min(width, max(min(replication[name], width), len(replicas)))
            fixes += size - len(held)
            total += size
            for node in held:
                count[node] += 1
                load[node] += 1
        final_total += total
        hi, lo = -(-total // width), total // width
        per_total += sum(max(0, x - hi) for x in count.values())
        per_short += sum(max(0, lo - x) for x in count.values())
    hi, lo = -(-final_total // width), final_total // width
    over = sum(max(0, x - hi) for x in load.values())
    short = sum(max(0, lo - x) for x in load.values())
    bound = max(fixes + over, fixes + per_total, short, per_short)
    if fixes and not over and not per_total and fixes <= 2_000:
        # Nothing is above its share, so every lost replica that cannot land on a node with
        # room (overall and in its collection, not holding the shard) pushes one more move.
        bound = max(bound, 2 * fixes - _landing(maps, replication, live, hi))
    return bound


def _landing(maps: Maps, replication: Mapping[str, int], live: Sequence[str], cap: int) -> int:
    """How many lost or missing replicas can land at once without anything else moving: on
    nodes below `cap` replicas, not holding the shard, below their collection's ⌈T/L⌉.
    A maximum flow: shard → (collection, node) → node → sink."""
    alive = set(live)
    width = len(alive)
    load = dict.fromkeys(alive, 0)
    lost: dict[tuple[str, int], int] = {}
    holders: dict[tuple[str, int], set[str]] = {}
    per: dict[str, dict[str, int]] = {}
    ceiling: dict[str, int] = {}
    for name, shard_map in maps.items():
        per[name] = dict.fromkeys(alive, 0)
        total = 0
        for s, replicas in enumerate(shard_map):
            held = {node for node in replicas if node in alive}
            size = min(width, max(min(replication[name], width), len(replicas)))
            total += size
            if size > len(held):
                lost[(name, s)] = size - len(held)
                holders[(name, s)] = held
            for node in held:
                per[name][node] += 1
                load[node] += 1
        ceiling[name] = -(-total // width)
    roomy = sorted(node for node in alive if load[node] < cap)
    graph = _FlowGraph(2 + len(lost) + len(maps) * len(roomy) + len(roomy))
    source, sink = 0, 1
    node_index = {node: 2 + len(lost) + len(maps) * len(roomy) + k for k, node in enumerate(roomy)}
    pair: dict[tuple[str, str], int] = {}
    for i, ((name, s), want) in enumerate(sorted(lost.items())):
        graph.add(source, 2 + i, want, 0)
        for node in roomy:
            if node in holders[(name, s)] or per[name][node] >= ceiling[name]:
                continue
            if (name, node) not in pair:
                pair[(name, node)] = 2 + len(lost) + len(pair)
                graph.add(pair[(name, node)], node_index[node], ceiling[name] - per[name][node], 0)
            graph.add(2 + i, pair[(name, node)], 1, 0)
    for node in roomy:
        graph.add(node_index[node], sink, cap - load[node], 0)
    return graph.min_cost_flow(source, sink, sum(lost.values()))


def scenario(
    name: str, maps: Maps, replication: Mapping[str, int], live: list[str]
) -> dict[str, Any]:
    started = time.perf_counter()
    moves = plan(maps, replication, live)
    seconds = time.perf_counter() - started
    after = apply(maps, moves)
    alive = set(live)
    lost = sum(
        1
        for shard_map in maps.values()
        for replicas in shard_map
        if replicas and not any(node in alive for node in replicas)
    )
    per_collection, overall = spread(after, live)
    into: dict[str, int] = defaultdict(int)
    for m in moves:
        into[m.to_node] += 1
    return {
        "scenario": name,
        "live_nodes": len(live),
        "moves": len(moves),
        "lower_bound": lower_bound(maps, replication, live),
        "replacements": sum(1 for m in moves if m.from_node is not None and m.from_node not in alive),
        "plan_s": round(seconds, 2),
        "spread_after": {"per_collection": per_collection, "overall": overall},
        "stable": plan(after, replication, live) == [],
        "most_moves_into_one_node": max(into.values(), default=0),
        "shards_without_live_replica": lost,
        "moves_list": moves,
    }


def schedule(
    moves: Sequence[Move],
    docs_per_move: int,
    per_node: int,
    docs_per_s: float,
    live: set[str] | None = None,
) -> dict[str, Any]:
    """How `Rebalancer.run` would carry the moves out: each move takes a slot on each of its
    nodes (sorted, first come first served, holding the first while it waits for the second)
    and then copies `docs_per_move` documents at `docs_per_s`. Copying only: the map updates
    and catch-up rounds add per-move latency on top.

    `Rebalancer._carry` also takes a slot on a dead `from_node`, so the replacements of a
    dead node's replicas run `per_node` at a time; with `live` given, a dead node takes no
    slot (what it would take if only live nodes were slotted)."""
    duration = docs_per_move / docs_per_s
    free: dict[str, int] = defaultdict(lambda: per_node)
    waiting: dict[str, list[int]] = defaultdict(list)  # node → moves queued on its slot
    needs = [
        sorted(
            {m.to_node}
            | ({m.from_node} if m.from_node and (live is None or m.from_node in live) else set())
        )
        for m in moves
    ]
    step = [0] * len(moves)  # how many of its slots each move holds
    ends: list[tuple[float, int]] = []
    now, running, peak = 0.0, 0, 0

    def advance(i: int) -> None:
        nonlocal running, peak
        while step[i] < len(needs[i]):
            node = needs[i][step[i]]
            if free[node] > 0 and not waiting[node]:
                free[node] -= 1
                step[i] += 1
            else:
                waiting[node].append(i)
                return
        running += 1
        peak = max(peak, running)
        heapq.heappush(ends, (now + duration, i))

    for i in range(len(moves)):
        advance(i)
    while ends:
        now, i = heapq.heappop(ends)
        running -= 1
        for node in needs[i]:
            free[node] += 1
            if waiting[node]:
                j = waiting[node].pop(0)
                free[node] -= 1
                step[j] += 1
                advance(j)
    return {
        "docs_per_move": docs_per_move,
        "move_s": round(duration, 2),
        "makespan_s": round(now, 1),
        "peak_concurrent_moves": peak,
        "peak_docs_per_s": round(peak * docs_per_s),
    }


def run_all(log: Callable[[str], None], seed: int = 1) -> dict[str, Any]:
    """1,000 nodes, about 100,000 replicas in two shapes; four scenarios each."""
    rng = random.Random(seed)
    out: dict[str, Any] = {"shapes": []}
    for collections, shards in ((100, 334), (520, 64)):
        nodes = node_ids(1000)
        t0 = time.perf_counter()
        maps, factor = balanced_maps(nodes, collections, shards, 3)
        log(f"placement: {collections} × {shards} × 3 laid out and balanced in "
            f"{time.perf_counter() - t0:.0f} s")
        zone = set(rng.sample(nodes, len(nodes) // 10))
        cases = {
            "1 node joins": nodes + node_ids(1, "new"),
            "10 nodes join": nodes + node_ids(10, "new"),
            "1 node leaves": nodes[1:],
            "a zone of 10% fails": [x for x in nodes if x not in zone],
        }
        shape: dict[str, Any] = {
            "collections": collections,
            "shards": shards,
            "replication": 3,
            "replicas": sum(len(r) for m in maps.values() for r in m),
            "nodes": len(nodes),
            "entry_bytes": entry_bytes(maps),
            "scenarios": [],
        }
        for name, live in cases.items():
            result = scenario(name, maps, factor, live)
            moves = result.pop("moves_list")
            # 100M vectors over these shards: documents per replica moved.
            docs = 100_000_000 // (collections * shards)
            result["executor"] = schedule(moves, docs, per_node=2, docs_per_s=10_000.0)
            result["executor_live_slots_only"] = schedule(
                moves, docs, per_node=2, docs_per_s=10_000.0, live=set(live)
            )
            # Every move is announced and switched in the map: two pushes of the whole
            # collection entry to every live node, each acknowledged (require_all).
            result["map_push_requests"] = 2 * len(moves) * (len(live) - 1)
            result["map_push_bytes"] = result["map_push_requests"] * shape["entry_bytes"]
            result["copy_bytes"] = len(moves) * docs * WIRE_BYTES_PER_DOC
            shape["scenarios"].append(result)
            log(f"  {name}: {result['moves']} moves (bound {result['lower_bound']}) in "
                f"{result['plan_s']} s")
        out["shapes"].append(shape)
    return out


def table(results: dict[str, Any]) -> str:
    rows = [
        "| replicas (collections × shards × 3) | scenario | moves (lower bound) | plan time"
        " | spread after: per collection, overall | stable | shards with no live replica"
        " | executor: peak moves at once, copy time (100M docs, 10,000 docs/s per move)"
        " | same, dead nodes taking no slot | map pushes: requests, bytes; copied bytes |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for shape in results["shapes"]:
        label = f"{shape['replicas']:,} ({shape['collections']} × {shape['shards']} × 3)"
        for s in shape["scenarios"]:
            ex, lv = s["executor"], s["executor_live_slots_only"]
            rows.append(
                f"| {label} | {s['scenario']} | {s['moves']:,} ({s['lower_bound']:,})"
                f" | {s['plan_s']:.1f} s | {s['spread_after']['per_collection']},"
                f" {s['spread_after']['overall']} | {'yes' if s['stable'] else 'NO'}"
                f" | {s['shards_without_live_replica']}"
                f" | {ex['peak_concurrent_moves']}, {ex['makespan_s']:,.0f} s"
                f" | {lv['peak_concurrent_moves']}, {lv['makespan_s']:,.0f} s"
                f" | {s['map_push_requests']:,}, {s['map_push_bytes'] / 1e9:.1f} GB;"
                f" {s['copy_bytes'] / 1e9:.1f} GB |"
            )
    return "\n".join(rows)
