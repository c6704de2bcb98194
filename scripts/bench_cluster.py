"""--cluster N of scripts/bench.py (run it through bench.py):

    python scripts/bench.py --cluster 3 --limit 50000

The same workload (ingest over REST, wait until trained, recall@10, latency and q/s at each
--concurrency and --nprobe) on a 1-node cluster and then on an N-node cluster, nodes on
127.0.0.2, 127.0.0.3, ... port 8470; in the N-node case clients send requests (queries and
ingest batches) round-robin to every node. All nodes share this machine's cores, so the N-node
figures show the cost of fan-out, not scale-out. With `--loadgen wrk` (scripts/bench_setup.sh)
the timed searches come from wrk on the first node instead of the Python client, which
costs about as much CPU as a node and takes it from the same cores; the recall is still the
Python client's, one query at a time.

As root with a working `unshare -n`, the whole run is re-executed inside a private network
namespace with only lo (nothing leaves the machine); otherwise it uses the host's loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
from bench_batch import faiss_batches, node_batches
from bench_common import COLLECTION, OPT_NP, K, log
from bench_data import Dataset
from bench_load import create_collection, ingest_rr, query_bodies, search_load, wait_trained
from bench_local_cluster import LocalCluster, new_session, node_env, pick_train_min, placement
from bench_node import call, cpu_seconds_of
from bench_profile import profile_pids
from wrkload import run_wrk, write_bodies

IDLE_SECONDS = 3.0  # a window of idle CPU measured
QUIET_CORES = 0.05  # nodes quieter than this are idle
QUIET_WAIT_S = 60.0  # at most this long for them to be


async def quiet_cores(cluster: LocalCluster) -> float:
    """The nodes' CPU (cores) over an idle window, once below QUIET_CORES or after
    QUIET_WAIT_S of waiting for it."""
    deadline = time.perf_counter() + QUIET_WAIT_S
    while True:
        cpu0, t0 = cluster.cpu_seconds(), time.perf_counter()
        await asyncio.sleep(IDLE_SECONDS)
        cores = (cluster.cpu_seconds() - cpu0) / (time.perf_counter() - t0)
        if cores < QUIET_CORES or time.perf_counter() > deadline:
            return cores


async def measure_cluster(
    args: argparse.Namespace, ds: Dataset, root: Path, size: int, train_min: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"nodes": size}
    cluster = LocalCluster(root, node_env(train_min))
    cmax = max(args.concurrency)
    try:
        async with new_session(cmax) as session:
            out["start_s"] = await cluster.start(session, size)
            urls = cluster.urls
            log(f"{size}-node cluster up: {', '.join(urls)} ({out['start_s']:.1f}s)")
            spec = {
                "dim": ds.dim,
                "metric": "cosine",
                "shards": args.shards,
                "replication": min(args.replication, size),
                "index": {"type": "ivf_flat"},
            }
            await create_collection(session, urls[0], spec)
            out["collection"] = spec
            ing = await ingest_rr(
                session, urls, ds, args.batch, args.uploaders, cluster.cpu_seconds
            )
            out["ingest"] = ing
            log(f"  ingest through {len(urls)} node(s): {ing['docs_per_s']:,.0f} docs/s")
            out["training"] = await wait_trained(session, cluster.nodes[0], ds.n, train_min)
            desc = await call(session, "GET", f"{urls[0]}/v1/collections/{COLLECTION}")
            out["placement"] = placement(desc)
            # What the nodes burn with no search at all (gossip, timers): per query it weighs
            # most at low rates, so CPU per query is given with and without it. Work left
            # from the load (a snapshot, RocksDB's compactions) is waited out first, a while.
            out["idle_cores"] = await quiet_cores(cluster)
            log(f"  {size} node(s) idle: {out['idle_cores']:.3f} cores")
            points: list[dict[str, Any]] = []
            # Explicit nprobe (per node index: at N nodes each index is smaller and the same
            # nprobe scans more of the data), then target recalls (each node its own probes).
            modes = [("nprobe", p, query_bodies(ds, p, args.queries)) for p in args.nprobe]
            modes += [("recall", r, recall_bodies(ds, r, args.queries)) for r in args.recall]
            for mode, p, bodies in modes:
                if args.loadgen == "wrk":
                    points += await wrk_points(args, ds, session, cluster, root, mode, p,
                                               bodies, out["idle_cores"], size)
                    continue
                for c in args.concurrency:
                    await search_load(
                        session,
                        urls,
                        ds,
                        bodies,
                        p,
                        c,
                        cluster.cpu_seconds,
                        count=min(args.warmup, len(bodies)),
                    )
                    r = await search_load(
                        session, urls, ds, bodies, p, c, cluster.cpu_seconds, count=args.queries
                    )
                    points.append({**r.as_dict(), "mode": mode, "target": p,
                                   "idle_cores": out["idle_cores"]})
                    log(
                        f"  {size} node(s) {mode}={p} c={c}: recall {r.recall:.4f}, "
                        f"{r.qps:,.0f} q/s, p50 {r.lat_p50_ms:.2f} ms, p99 {r.lat_p99_ms:.1f} ms, "
                        f"failures {r.failures}, server cores {r.server_cpu_s / r.seconds:.2f}, "
                        f"CPU {r.server_cpu_s * 1000 / max(1, r.ok):.2f} ms/query"
                    )
            out["points"] = points
            if args.profile > 0 and size > 1:
                out["profile"] = await profile_coordinator(args, ds, session, cluster, root)
            if size == 1 and args.query_batch > 0:
                idle = await quiet_cores(cluster)
                out["batches"] = [
                    await node_batches(session, urls[0], ds, args.batch_nprobe, args.query_batch,
                                       c, cluster.cpu_seconds, args.loadgen, root)
                    # One request at a time; one a core; and four a core, enough that the
                    # search threads never wait while an answer travels and the next request
                    # is read and parsed (its throughput, the measure).
                    for c in dict.fromkeys([1, os.cpu_count() or 1, 4 * (os.cpu_count() or 1)])
                ]
                for b in out["batches"]:
                    b["idle_cores"] = idle
                    b["server_cpu_net_ms_per_query"] = max(
                        0.0, b["server_cpu_ms_per_query"] - idle * b["seconds"] * 1000
                        / max(1, b["requests"] * b["per_request"]))
                    log(f"  1 node, batches of {b['per_request']} (nprobe {b['nprobe']}) "
                        f"c={b['concurrency']}: {b['qps']:,.0f} q/s, recall {b['recall']:.4f}, "
                        f"CPU {b['server_cpu_ms_per_query']:.3f} ms/query")
                info = desc["shard_states"][0].get("index", {})
                out["node_index"] = info
            out["log_warnings"] = cluster.log_lines("WARNING", "ERROR", "Traceback")
    finally:
        await cluster.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return out


async def wrk_points(
    args: argparse.Namespace, ds: Dataset, session: Any, cluster: LocalCluster, root: Path,
    mode: str, target: float, bodies: list[bytes], idle_cores: float, size: int,
) -> list[dict[str, Any]]:
    """`--loadgen wrk`: the recall from the Python client, one query at a time round robin
    over the nodes; then wrk (C: the Python client's own CPU took a third of a core or more
    of the two the nodes are measured on) at each --concurrency, on the first node, which
    coordinates every query, for --load-seconds each. The same fields as the Python
    client's points."""
    rec = await search_load(session, cluster.urls, ds, bodies, int(target), 1,
                            cluster.cpu_seconds, count=len(bodies))
    body_file = root / f"wrk-{mode}-{target:g}.txt"
    write_bodies(body_file, bodies)
    out = []
    for c in args.concurrency:
        cpu0 = cluster.cpu_seconds()
        r = await asyncio.to_thread(
            run_wrk, cluster.urls[0], f"/v1/collections/{COLLECTION}/search", body_file,
            connections=c, threads=min(2, c), seconds=args.load_seconds, work_dir=root)
        cpu = cluster.cpu_seconds() - cpu0
        failures = r.non2xx + sum(r.socket_errors.values())
        out.append({
            "mode": mode, "target": target, "nprobe": int(target), "concurrency": c,
            "nodes": size, "loadgen": "wrk", "sent": r.requests, "ok": r.ok,
            "failures": failures, "seconds": r.seconds, "qps": r.ok / r.seconds,
            "recall": rec.recall, "lat_p50_ms": r.lat_p50_ms, "lat_p95_ms": r.lat_p95_ms,
            "lat_p99_ms": r.lat_p99_ms, "server_cpu_s": cpu, "client_cpu_s": r.client_cpu_s,
            "idle_cores": idle_cores,
        })
        log(f"  {size} node(s) {mode}={target:g} c={c} (wrk on node 1): recall "
            f"{rec.recall:.4f}, {r.ok / r.seconds:,.0f} q/s, p50 {r.lat_p50_ms:.2f} ms, p99 "
            f"{r.lat_p99_ms:.1f} ms, failures {failures}, server cores {cpu / r.seconds:.2f}, "
            f"CPU {cpu * 1000 / max(1, r.ok):.2f} ms/query, wrk cores "
            f"{r.client_cpu_s / r.seconds:.2f}")
    return out


async def run_cluster(
    args: argparse.Namespace, ds: Dataset, tmp: Path, results: dict[str, Any]
) -> None:
    train_min = pick_train_min(args, ds, args.shards)
    res: dict[str, Any] = {"train_min": train_min, "runs": []}
    results["cluster"] = res
    for size in dict.fromkeys([1, args.cluster]):
        res["runs"].append(await measure_cluster(args, ds, tmp / f"c{size}", size, train_min))
    one = res["runs"][0]
    if one.get("batches") and one.get("node_index", {}).get("nlist"):
        # After the nodes stopped: FAISS has the cores to itself, as the node had.
        info = one["node_index"]
        res["faiss_batches"] = await asyncio.to_thread(
            faiss_batches, ds, int(info["nlist"]), int(info.get("trained_at", 0)),
            args.batch_nprobe, args.query_batch)


async def profile_coordinator(
    args: argparse.Namespace, ds: Dataset, session: Any, cluster: LocalCluster, root: Path
) -> dict[str, Any]:
    """py-spy on the first node (every query's coordinator: the load goes to it alone) and on
    the second (a peer only), at the highest concurrency and --profile-nprobe."""
    cmax = max(args.concurrency)
    bodies = query_bodies(ds, args.profile_nprobe, args.queries)
    pids = {"coordinator": cluster.nodes[0].pid, "peer": cluster.nodes[1].pid}

    answered = 0

    async def load() -> None:
        nonlocal answered
        r = await search_load(session, cluster.urls[:1], ds, bodies, args.profile_nprobe, cmax,
                              cluster.cpu_seconds, count=len(bodies))
        answered += r.ok

    cpu0 = [cpu_seconds_of(n.pid) for n in cluster.nodes]
    got = await profile_pids({k: v for k, v in pids.items() if v}, args.profile, root, load)
    # CPU per query of each node: the coordinator's share against the peers' (py-spy's own
    # sampling costs the profiled processes a little too).
    got["cpu_ms_per_query"] = [
        (cpu_seconds_of(n.pid) - c) * 1000 / max(1, answered)
        for n, c in zip(cluster.nodes, cpu0, strict=True)]
    log(f"  CPU ms per query, coordinator then peers: "
        f"{', '.join(f'{x:.3f}' for x in got['cpu_ms_per_query'])}")
    for name, summary in got.items():
        if not isinstance(summary, dict):
            continue
        log(f"  py-spy {name}: {summary['samples']} samples; top self frames:")
        for f in summary["self"][:15]:
            log(f"    {f['pct']:5.1f}%  {f['frame']}")
        log(f"  py-spy {name}: top inclusive frames:")
        for f in summary["inclusive"][:25]:
            log(f"    {f['pct']:5.1f}%  {f['frame']}")
    return got


def recall_bodies(ds: Dataset, target: float, n: int) -> list[bytes]:
    """One query a request, by target recall in place of nprobe."""
    return [orjson.dumps({"vector": ds.queries[i], "k": K, "recall": target}, option=OPT_NP)
            for i in range(n)]
