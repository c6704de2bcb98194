"""--rebalance of scripts/bench.py (run it through bench.py):

    python scripts/bench.py --rebalance --limit 50000

3 nodes, a collection of 12 shards (replication 1, ivf_flat), ingest, start a 4th node, wait
until the others see it alive, measure searches (concurrency 4 through the first 3 nodes) for
--window seconds, POST /v1/cluster/rebalance and keep measuring until GET /v1/cluster/shards
shows no move and every planned move is in the map, then --window more seconds after. Reports
moves, documents moved, elapsed, transfer rate, search latency/q/s/recall and failures before,
during and after.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from bench_common import COLLECTION, log
from bench_data import Dataset
from bench_load import (
    LoadResult,
    create_collection,
    ingest_rr,
    query_bodies,
    search_load,
    wait_trained,
)
from bench_local_cluster import LocalCluster, new_session, node_env, pick_train_min, placement
from bench_node import call

REBALANCE_SHARDS = 12
REBALANCE_CONCURRENCY = 4
SHARDS_POLL_S = 0.2


def moves_done(moves: list[dict[str, Any]], entries: list[dict[str, Any]]) -> bool:
    if any(e["moving"] for e in entries):
        return False
    for m in moves:
        reps = entries[int(m["shard"])]["replicas"]
        if m["to"] not in reps or (m["from"] is not None and m["from"] in reps):
            return False
    return True


async def watch_rebalance(
    session: aiohttp.ClientSession,
    url: str,
    moves: list[dict[str, Any]],
    t0: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Poll GET /v1/cluster/shards until every planned move is in the map and none is moving;
    when each shard was first seen moving and first seen switched, and how many moved at once."""
    first_moving: dict[int, float] = {}
    switched: dict[int, float] = {}
    max_progress: dict[int, float] = {}
    concurrent: Counter[int] = Counter()
    poll_errors: Counter[str] = Counter()
    polls = 0
    deadline = t0 + timeout_s
    by_shard = {int(m["shard"]): m for m in moves}
    while True:
        now = time.perf_counter()
        done = False
        try:
            body = await call(session, "GET", f"{url}/v1/cluster/shards")
            entries = body["collections"][COLLECTION]
        except (TimeoutError, aiohttp.ClientError, RuntimeError, KeyError) as exc:
            poll_errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            entries = None
        if entries is not None:
            polls += 1
            n_moving = 0
            for e in entries:
                s = int(e["shard"])
                if e["moving"]:
                    n_moving += 1
                    first_moving.setdefault(s, now - t0)
                    prog = e["moving"].get("progress")
                    if prog is not None:
                        max_progress[s] = max(max_progress.get(s, 0.0), float(prog))
                elif s in by_shard and s not in switched:
                    m = by_shard[s]
                    if m["to"] in e["replicas"] and m["from"] not in e["replicas"]:
                        switched[s] = now - t0
            concurrent[n_moving] += 1
            done = moves_done(moves, entries)
        if done or now > deadline:
            return {
                "done": done,
                "polls": polls,
                "first_seen_moving_s": first_moving,
                "seen_switched_s": switched,
                "max_progress_seen": max_progress,
                "polls_by_moving_count": dict(sorted(concurrent.items())),
                "poll_errors": dict(poll_errors),
                "final_map": entries,
            }
        await asyncio.sleep(SHARDS_POLL_S)


def log_load(phase: str, r: LoadResult) -> None:
    log(
        f"  {phase}: {r.ok} ok / {r.failures} failed / {r.partial} partial in {r.seconds:.1f}s, "
        f"{r.qps:,.0f} q/s, p50 {r.lat_p50_ms:.1f} ms, p99 {r.lat_p99_ms:.1f} ms, "
        f"max {r.lat_max_ms:.0f} ms, recall {r.recall:.4f}"
    )


async def run_rebalance(
    args: argparse.Namespace, ds: Dataset, tmp: Path, results: dict[str, Any]
) -> None:
    train_min = pick_train_min(args, ds, REBALANCE_SHARDS)
    res: dict[str, Any] = {"train_min": train_min, "nprobe": args.rebalance_nprobe}
    results["rebalance"] = res
    cluster = LocalCluster(tmp / "rb", node_env(train_min))
    c = REBALANCE_CONCURRENCY
    try:
        async with new_session(c) as session:
            res["start_s"] = await cluster.start(session, 3)
            urls3 = cluster.urls
            log(f"3-node cluster up: {', '.join(urls3)}")
            spec = {
                "dim": ds.dim,
                "metric": "cosine",
                "shards": REBALANCE_SHARDS,
                "replication": 1,
                "index": {"type": "ivf_flat"},
            }
            await create_collection(session, urls3[0], spec)
            res["collection"] = spec
            res["ingest"] = await ingest_rr(
                session, urls3, ds, args.batch, args.uploaders, cluster.cpu_seconds
            )
            log(f"  ingest: {res['ingest']['docs_per_s']:,.0f} docs/s through 3 nodes")
            res["training"] = await wait_trained(session, cluster.nodes[0], ds.n, train_min)
            coll_url = f"{urls3[0]}/v1/collections/{COLLECTION}"
            before_desc = await call(session, "GET", coll_url)
            counts = {int(s["shard"]): int(s["count"]) for s in before_desc["shard_states"]}
            res["placement_before"] = placement(before_desc)
            res["shard_counts_before"] = counts

            _, ready_s, alive_s = await cluster.add_node(session)
            res["node4_ready_s"], res["node4_seen_alive_s"] = ready_s, alive_s
            log(f"  n4 ready in {ready_s:.1f}s, seen alive by n1..n3 after {alive_s:.1f}s")

            bodies = query_bodies(ds, args.rebalance_nprobe, args.queries)
            p = args.rebalance_nprobe
            await search_load(
                session, urls3, ds, bodies, p, c, cluster.cpu_seconds, count=args.warmup
            )
            before = await search_load(
                session, urls3, ds, bodies, p, c, cluster.cpu_seconds, seconds=args.window
            )
            log_load("before", before)

            stop = asyncio.Event()
            during_task = asyncio.create_task(
                search_load(session, urls3, ds, bodies, p, c, cluster.cpu_seconds, stop=stop)
            )
            try:
                t0 = time.perf_counter()
                cpu0 = cluster.cpu_seconds()
                reply = await call(
                    session,
                    "POST",
                    f"{urls3[0]}/v1/cluster/rebalance",
                    orjson.dumps({"dry_run": False}),
                )
                moves = list(reply["moves"])
                res["post_s"] = time.perf_counter() - t0
                log(f"  rebalance: {len(moves)} move(s): {moves}")
                watch = await watch_rebalance(session, urls3[0], moves, t0, args.rebalance_timeout)
                elapsed = time.perf_counter() - t0
                res["server_cpu_s_during"] = cluster.cpu_seconds() - cpu0
            finally:
                stop.set()
                during = await during_task
            log_load("during", during)
            after = await search_load(
                session, urls3, ds, bodies, p, c, cluster.cpu_seconds, seconds=args.window
            )
            log_load("after", after)

            meta_bytes = float(np.mean([len(orjson.dumps(m)) for m in ds.metadata]))
            per_doc = ds.dim * 4 + meta_bytes
            moved_docs = sum(counts.get(int(m["shard"]), 0) for m in moves)
            after_desc = await call(session, "GET", coll_url)
            maps = [await call(session, "GET", f"{u}/v1/cluster/shards") for u in cluster.urls]
            res.update(
                {
                    "moves": moves,
                    "documents_moved": moved_docs,
                    "avg_metadata_bytes": meta_bytes,
                    "bytes_per_doc": per_doc,
                    "elapsed_s": elapsed,
                    "docs_per_s": moved_docs / elapsed if elapsed > 0 else float("nan"),
                    "mb_per_s": moved_docs * per_doc / 1e6 / elapsed
                    if elapsed > 0
                    else float("nan"),
                    "watch": watch,
                    "before": before.as_dict(),
                    "during": during.as_dict(),
                    "after": after.as_dict(),
                    "placement_after": placement(after_desc),
                    "count_after": after_desc["count"],
                    "states_after": dict(
                        Counter(s["index_state"] for s in after_desc["shard_states"])
                    ),
                    "map_epochs_after": [m["epoch"] for m in maps],
                    "maps_agree_after": all(
                        m["collections"] == maps[0]["collections"] for m in maps
                    ),
                    "log_warnings": cluster.log_lines("WARNING", "ERROR", "Traceback"),
                    "log_moves": cluster.log_lines("move", "rebalanc", limit=60),
                }
            )
            if not watch["done"]:
                raise RuntimeError(
                    f"rebalance not finished within {args.rebalance_timeout:.0f}s: "
                    f"{watch['final_map']}"
                )
            if after_desc["count"] != ds.n:
                raise RuntimeError(f"count after the rebalance {after_desc['count']} != {ds.n}")
    finally:
        await cluster.stop()
        if not args.keep:
            shutil.rmtree(cluster.root, ignore_errors=True)
