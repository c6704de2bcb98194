#!/usr/bin/env python3
"""How the cluster scales, simulated with the real protocol code (see CAPACITY.md).

Sections (all by default; `--sections` picks some, and the JSON file keeps the others):

- gossip: the real `Gossip` + cluster-state delegate of every node over the in-memory network
  under a fake clock (`cluster/sim/core.py`, `runs.py`) at each size: cold start,
  one join, failure detection, false deaths under loss and with slow members, load per
  member, cluster-state spread and push-pull sizes (full and incremental);
- placement: the rebalance planner (`cluster/movement/plan.py`) at 1,000 nodes and
  100,000 replicas: 1 join, 10 joins, 1 leave, a zone of 10% failing; moves, plan time,
  balance, the lower bound; and how long the executor takes at its limits;
- fanout: search latency at 10, 100, 1,000 nodes from a measured per-node latency
  distribution (`--latency`, from `scripts/measure_node.py latency`), with and without hedging and
  with replication 2 and 3 reading the fastest replica.

    python scripts/simulate.py                          # everything, 10/100/1,000 nodes
    python scripts/simulate.py --sections gossip --sizes 10,100 --periods 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from aquila.cluster.membership.suspicion import push_pull_scale
from aquila.cluster.sim import runs as sim_runs
from aquila.cluster.sim.core import SimCluster

ROOT = Path(__file__).resolve().parent.parent

OUT = ROOT / "scripts" / "out" / "simulate.json"
LOSSES = (0.01, 0.05, 0.10)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- gossip -------------------------------------------------------------------------------


async def gossip_at(
    n: int, periods: int, seed: int, trials: int, big_limit: float = 3600.0, warm: bool = False,
    window_s: float = 0.0, settle_s: float = 60.0,
) -> dict[str, Any]:
    wall = time.perf_counter()
    sim = SimCluster(n, seed=seed)
    out: dict[str, Any] = {"n": n, "periods": periods, "seed": seed, "warm": warm}

    def step(what: str) -> None:
        log(f"  n={n} {what}: sim {sim.clock.now():.0f} s, wall {time.perf_counter() - wall:.0f} s")

    if warm:
        await sim.warm_boot()
        out["cold_start"] = None
        step("warm start")
    else:
        out["cold_start"] = await sim_runs.cold_start(sim)
        step("cold start")
    out["quiesce_s"] = round(await sim_runs.quiesce(sim), 2)
    out["one_join"] = await sim_runs.one_join(sim)
    await sim_runs.quiesce(sim)
    window = window_s or max(60.0, 2 * push_pull_scale(sim.config.push_pull_interval, n))
    out["load"] = await sim_runs.steady_load(sim, window)
    step("join, load")

    nodes = [x.id for x in sim.running()]
    small = sim_runs.new_collection(sim.nodes[0], "small", 8, 1, nodes)
    took = await sim_runs.state_spread(sim, small, 600.0)
    sim_runs.install_state(sim, 100, 64, 3)
    sizes = sim_runs.state_sizes(sim)
    big = sim_runs.new_collection(sim.nodes[0], "big", 64, 3, nodes)
    big_took = await sim_runs.state_spread(sim, big, big_limit)
    out["state"] = {
        "small_entry_bytes": len(orjson.dumps(small.to_json())),
        "small_seen_by_all_s": None if took is None else round(took, 2),
        "big_seen_by_all_s": None if big_took is None else round(big_took, 1),
        "big_limit_s": big_limit,
        **sizes,
    }
    step("state")

    out["failure"] = []
    for _ in range(trials):
        victim = sim.rng.choice(sim.running()[1:])
        out["failure"].append(await sim_runs.detect_failure(sim, victim))
    step("failure detection")

    out["false_deaths"] = {}
    for loss in LOSSES:
        sim.net.default_drop = loss
        out["false_deaths"][f"{loss:.2f}"] = await sim_runs.false_deaths(sim, periods)
        sim.net.default_drop = 0.0
        await sim.run(settle_s)  # let suspicions from the loss settle
        step(f"{loss:.0%} loss")
    slow = min(5, max(1, n // 20))
    out["slow"] = await sim_runs.slow_members(sim, slow, periods)
    step("slow members")
    await sim.stop()
    out["wall_s"] = round(time.perf_counter() - wall, 1)
    return out


def gossip_table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| nodes | cold start: all know all | one join reaches all | first suspicion"
        " | dead at all (suspicion timeout lo–hi) | false deaths 1% / 5% / 10% loss"
        " | slow members: false deaths | sent per member: packets/s, bytes/s"
        " | push-pull bytes/s per member |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fail = r["failure"]
        first = sum(f["first_suspicion_s"] for f in fail) / len(fail)
        dead = sum(f["all_dead_s"] for f in fail) / len(fail)
        fd = " / ".join(str(r["false_deaths"][f"{x:.2f}"]["false_deaths"]) for x in LOSSES)
        load = r["load"]
        cold = ("not run (warm start)" if r["cold_start"] is None
                else f"{r['cold_start']['seconds']:.1f} s")
        rows.append(
            f"| {r['n']:,} | {cold}"
            f" | {r['one_join']['seconds']:.2f} s ({r['one_join']['gossip_rounds']:.0f} rounds,"
            f" {r['one_join']['rounds_per_log2_n']:.2f}·log₂n)"
            f" | {first:.1f} s | {dead:.1f} s ({fail[0]['suspicion_lo_s']:.1f}–"
            f"{fail[0]['suspicion_hi_s']:.0f} s) | {fd} ({r['periods']} periods)"
            f" | {r['slow']['false_deaths']} ({r['slow']['slow_members']} slow)"
            f" | {load['packets_per_s']:.2f}, {load['bytes_per_s']:.0f}"
            f" | {load['push_pull_bytes_per_s']:.0f} |"
        )
    return "\n".join(rows)


def loss_table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| nodes | loss | failed probes | refutations | false deaths"
        " | packets/s per member | bytes/s per member |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for x in LOSSES:
            f = r["false_deaths"][f"{x:.2f}"]
            rows.append(
                f"| {r['n']:,} | {x:.0%} | {f['failed_probes']} | {f['refutations']}"
                f" | {f['false_deaths']} | {f['load']['packets_per_s']:.2f}"
                f" | {f['load']['bytes_per_s']:.0f} |"
            )
    return "\n".join(rows)


def state_table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| nodes | small collection seen by all (gossip) | 64-shard collection seen by all"
        " (push-pull only) | state bytes (100 × 64 shards × 3) | push-pull interval"
        " | one exchange: full / incremental | push-pull bytes/s per member: full / incremental |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["state"]
        big = (f"not within {s['big_limit_s']:.0f} s" if s["big_seen_by_all_s"] is None
               else f"{s['big_seen_by_all_s']:.0f} s")
        rows.append(
            f"| {r['n']:,} | {s['small_seen_by_all_s']} s | {big} | {s['state_bytes']:,}"
            f" | {s['push_pull_interval_s']:.0f} s"
            f" | {s['exchange_full_bytes']:,} / {s['exchange_incremental_bytes']:,}"
            f" | {s['full_bytes_per_member_s']:,.0f} / {s['incremental_bytes_per_member_s']:,.0f} |"
        )
    return "\n".join(rows)


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000", help="cluster sizes for the gossip section")
    ap.add_argument("--periods", type=int, default=1000, help="probe periods per loss run")
    ap.add_argument("--trials", type=int, default=3, help="killed nodes per size")
    ap.add_argument("--warm", action="store_true",
                    help="start the nodes knowing each other instead of joining (no cold start)")
    ap.add_argument("--window", type=float, default=0.0,
                    help="simulated seconds of the load measurement (0: two push-pull intervals)")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="simulated seconds after each loss run for its suspicions to settle")
    ap.add_argument("--big-limit", type=float, default=3600.0,
                    help="simulated seconds to wait for the 64-shard entry to reach everyone")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sections", default="gossip,placement,fanout")
    ap.add_argument("--latency", type=Path, default=ROOT / "scripts" / "out" / "latency.json",
                    help="per-node latency samples (scripts/measure_node.py latency)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    results["command"] = "python " + " ".join(sys.argv)

    if "gossip" in sections:
        # Sizes run separately accumulate: a size run again replaces its earlier result.
        runs = {r["n"]: r for r in results.get("gossip", [])}
        for n in (int(x) for x in args.sizes.split(",")):
            log(f"gossip at {n} nodes")
            runs[n] = asyncio.run(gossip_at(n, args.periods, args.seed, args.trials, args.big_limit,
                                            args.warm, args.window, args.settle))
            runs[n]["command"] = results["command"]
            results["gossip"] = [runs[k] for k in sorted(runs)]
            save(args.out, results)
    if "placement" in sections:
        from aquila.cluster.sim import place as sim_place

        results["placement"] = sim_place.run_all(log)
        save(args.out, results)
    if "fanout" in sections:
        from aquila.cluster.sim import fanout as sim_fanout

        samples = json.loads(args.latency.read_text())
        results["fanout"] = sim_fanout.run_all(samples, seed=args.seed)
        save(args.out, results)

    if results.get("gossip"):
        print("\n## Gossip\n\n" + gossip_table(results["gossip"]))
        print("\n" + loss_table(results["gossip"]))
        print("\n## Cluster state\n\n" + state_table(results["gossip"]))
    if results.get("placement"):
        from aquila.cluster.sim import place as sim_place

        print("\n## Placement\n\n" + sim_place.table(results["placement"]))
    if results.get("fanout"):
        from aquila.cluster.sim import fanout as sim_fanout

        print("\n## Fan-out\n\n" + sim_fanout.table(results["fanout"]))
    print(f"\nwritten to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


def save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")


if __name__ == "__main__":
    main()
