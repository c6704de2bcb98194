"""Multi-node modes of scripts/bench.py (run them through it):

    python scripts/bench.py --cluster 3 --limit 50000
    python scripts/bench.py --rebalance --limit 50000

--cluster N: the same workload (ingest over REST, wait until trained, recall@10, latency and q/s
at each --concurrency and --nprobe) on a 1-node cluster and then on an N-node cluster, nodes on
127.0.0.2, 127.0.0.3, ... port 8470; in the N-node case clients send requests (queries and
ingest batches) round-robin to every node. All nodes share this machine's cores, so the N-node
figures show the cost of fan-out, not scale-out.

--rebalance: 3 nodes, a collection of 12 shards (replication 1, ivf_flat), ingest, start a 4th
node, wait until the others see it alive, measure searches (concurrency 4 through the first 3
nodes) for --window seconds, POST /v1/cluster/rebalance and keep measuring until
GET /v1/cluster/shards shows no move and every planned move is in the map, then --window more
seconds after. Reports moves, documents moved, elapsed, transfer rate, search latency/q/s/recall
and failures before, during and after.

As root with a working `unshare -n`, the whole run is re-executed inside a private network
namespace with only lo (nothing leaves the machine); otherwise it uses the host's loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from bench import (
    COLLECTION,
    OPT_NP,
    Dataset,
    NodeFailed,
    call,
    environment,
    fmt_table,
    load_dataset,
    log,
    parse_args,
    temp_dir,
    wait_trained,
)
from bench_common import (
    LoadResult,
    LocalCluster,
    create_collection,
    in_netns,
    ingest_rr,
    maybe_reexec_in_netns,
    query_bodies,
    search_load,
)

REBALANCE_SHARDS = 12
REBALANCE_CONCURRENCY = 4
SHARDS_POLL_S = 0.2
PRODUCT_TRAIN_MIN = 4096
SHARE_NOTE = (
    "all nodes and the client share this machine's {cpus} core(s): the N-node figures show the "
    "overhead of fan-out (coordination, peer HTTP, merging), not scale-out"
)


def pick_train_min(args: argparse.Namespace, ds: Dataset, shards: int) -> int:
    """The product default unless a shard of this data set could end below it."""
    if args.train_min is not None:
        return int(args.train_min)
    per_shard = ds.n // shards
    return PRODUCT_TRAIN_MIN if per_shard >= 2 * PRODUCT_TRAIN_MIN else max(256, per_shard // 2)


def node_env(train_min: int) -> dict[str, str]:
    return {"AQUILA_FSYNC": "true", "AQUILA_LOG_LEVEL": "INFO", "AQUILA_TRAIN_MIN": str(train_min)}


def new_session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=4 * concurrency + 16, limit_per_host=concurrency + 8, keepalive_timeout=120
    )
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300))


def placement(desc: dict[str, Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for s in desc["shard_states"]:
        for r in s["replicas"]:
            out.setdefault(r, []).append(int(s["shard"]))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------
# --cluster N
# ---------------------------------------------------------------------------------------
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
            ing = await ingest_rr(session, urls, ds, args.batch, args.uploaders, cluster)
            out["ingest"] = ing
            log(f"  ingest through {len(urls)} node(s): {ing['docs_per_s']:,.0f} docs/s")
            out["training"] = await wait_trained(session, cluster.nodes[0], ds.n, train_min)
            desc = await call(session, "GET", f"{urls[0]}/v1/collections/{COLLECTION}")
            out["placement"] = placement(desc)
            points: list[dict[str, Any]] = []
            for p in args.nprobe:
                bodies = query_bodies(ds, p, args.queries)
                for c in args.concurrency:
                    await search_load(
                        session,
                        urls,
                        ds,
                        bodies,
                        p,
                        c,
                        cluster,
                        count=min(args.warmup, len(bodies)),
                    )
                    r = await search_load(
                        session, urls, ds, bodies, p, c, cluster, count=args.queries
                    )
                    points.append(r.as_dict())
                    log(
                        f"  {size} node(s) nprobe={p} c={c}: recall {r.recall:.4f}, "
                        f"{r.qps:,.0f} q/s, p50 {r.lat_p50_ms:.1f} ms, p99 {r.lat_p99_ms:.1f} ms, "
                        f"failures {r.failures}, server cores {r.server_cpu_s / r.seconds:.2f}"
                    )
            out["points"] = points
            out["log_warnings"] = cluster.log_lines("WARNING", "ERROR", "Traceback")
    finally:
        await cluster.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return out


async def run_cluster(
    args: argparse.Namespace, ds: Dataset, tmp: Path, results: dict[str, Any]
) -> None:
    train_min = pick_train_min(args, ds, args.shards)
    res: dict[str, Any] = {"train_min": train_min, "runs": []}
    results["cluster"] = res
    for size in dict.fromkeys([1, args.cluster]):
        res["runs"].append(await measure_cluster(args, ds, tmp / f"c{size}", size, train_min))


def report_cluster(args: argparse.Namespace, ds: Dataset, results: dict[str, Any]) -> None:
    res = results.get("cluster")
    if not res or len(res.get("runs", [])) < 1:
        return
    runs = res["runs"]
    a, b = runs[0], runs[-1]
    na, nb = a["nodes"], b["nodes"]
    print()
    print("=" * 100)
    print(
        f"Aquila 1 vs {nb} nodes — {ds.name}: {ds.n:,} × {ds.dim}, cosine, {args.shards} shards "
        f"ivf_flat, replication {b.get('collection', {}).get('replication', '?')}; "
        f"{args.queries} queries per point, one per request, round-robin over the nodes"
    )
    print(f"Network: {results['network']}")
    print("Note: " + SHARE_NOTE.format(cpus=results["environment"]["cpus_usable"]))
    for r in runs:
        if "ingest" in r:
            print(
                f"{r['nodes']} node(s): ingest {r['ingest']['docs_per_s']:,.0f} docs/s; "
                f"placement {r.get('placement', {})}"
            )
    pa = {(p["nprobe"], p["concurrency"]): p for p in a.get("points", [])}
    pb = {(p["nprobe"], p["concurrency"]): p for p in b.get("points", [])}
    rows = []
    for key in pa:
        x, y = pa[key], pb.get(key)
        if y is None:
            continue
        rows.append(
            [
                str(key[0]),
                str(key[1]),
                f"{x['recall']:.4f}",
                f"{y['recall']:.4f}",
                f"{x['qps']:,.0f}",
                f"{y['qps']:,.0f}",
                f"{y['qps'] / x['qps']:.2f}",
                f"{x['lat_p50_ms']:.1f}",
                f"{y['lat_p50_ms']:.1f}",
                f"{x['lat_p99_ms']:.1f}",
                f"{y['lat_p99_ms']:.1f}",
                f"{x['server_cpu_s'] / x['seconds']:.2f}",
                f"{y['server_cpu_s'] / y['seconds']:.2f}",
                f"{x['failures']}/{y['failures']}",
            ]
        )
    h = [
        "nprobe",
        "c",
        f"recall {na}n",
        f"recall {nb}n",
        f"q/s {na}n",
        f"q/s {nb}n",
        f"{nb}n/{na}n",
        f"p50 {na}n",
        f"p50 {nb}n",
        f"p99 {na}n",
        f"p99 {nb}n",
        f"cores {na}n",
        f"cores {nb}n",
        "fail",
    ]
    print("\nLatency in ms; cores = CPU seconds of all node processes per second of wall time")
    print(fmt_table(h, rows))
    for r in runs:
        if r.get("log_warnings"):
            print(f"{r['nodes']} node(s): {len(r['log_warnings'])} WARNING/ERROR log line(s), e.g.")
            for ln in r["log_warnings"][:3]:
                print(f"    {ln[:200]}")


# ---------------------------------------------------------------------------------------
# --rebalance
# ---------------------------------------------------------------------------------------
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
            if moves_done(moves, entries):
                return {
                    "done": True,
                    "polls": polls,
                    "first_seen_moving_s": first_moving,
                    "seen_switched_s": switched,
                    "max_progress_seen": max_progress,
                    "polls_by_moving_count": dict(sorted(concurrent.items())),
                    "poll_errors": dict(poll_errors),
                    "final_map": entries,
                }
        if now > deadline:
            return {
                "done": False,
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
            res["ingest"] = await ingest_rr(session, urls3, ds, args.batch, args.uploaders, cluster)
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
            await search_load(session, urls3, ds, bodies, p, c, cluster, count=args.warmup)
            before = await search_load(
                session, urls3, ds, bodies, p, c, cluster, seconds=args.window
            )
            log_load("before", before)

            stop = asyncio.Event()
            during_task = asyncio.create_task(
                search_load(session, urls3, ds, bodies, p, c, cluster, stop=stop)
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
                session, urls3, ds, bodies, p, c, cluster, seconds=args.window
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


def report_rebalance(results: dict[str, Any]) -> None:
    r = results.get("rebalance")
    if not r or "before" not in r:
        return
    print()
    print("=" * 100)
    spec = r["collection"]
    n = results["dataset"]["n"]
    print(
        f"Rebalance 3 → 4 nodes — {results['dataset']['name']}: {n:,} × "
        f"{results['dataset']['dim']}, {spec['shards']} shards, replication {spec['replication']}, "
        f"{spec['index']['type']}, train_min {r['train_min']}"
    )
    print(f"Network: {results['network']}")
    print("Note: " + SHARE_NOTE.format(cpus=results["environment"]["cpus_usable"]))
    print(f"Placement before: {r['placement_before']}")
    print(f"Placement after:  {r['placement_after']}  (count after {r['count_after']:,})")
    print(
        f"Moves: {len(r['moves'])}; documents moved {r['documents_moved']:,} in "
        f"{r['elapsed_s']:.1f}s (POST → map final): {r['docs_per_s']:,.0f} docs/s, "
        f"{r['mb_per_s']:.2f} MB/s at {r['bytes_per_doc']:.0f} B/doc "
        f"({results['dataset']['dim']}×4 + {r['avg_metadata_bytes']:.0f} metadata)"
    )
    w = r["watch"]
    rows = []
    for m in r["moves"]:
        s = int(m["shard"])
        fm, sw = w["first_seen_moving_s"].get(s), w["seen_switched_s"].get(s)
        rows.append(
            [
                str(s),
                str(m["from"]),
                str(m["to"]),
                f"{r['shard_counts_before'].get(s, 0):,}",
                "-" if fm is None else f"{fm:.1f}",
                "-" if sw is None else f"{sw:.1f}",
                "-" if fm is None or sw is None else f"{sw - fm:.1f}",
            ]
        )
    print("\nPer move (seconds after the POST, as seen by polling GET /v1/cluster/shards):")
    print(fmt_table(["shard", "from", "to", "docs", "moving", "switched", "took"], rows))
    print(f"Polls by number of shards shown moving: {w['polls_by_moving_count']}")
    print(
        f"\nSearches, concurrency {REBALANCE_CONCURRENCY} round-robin over n1..n3, nprobe "
        f"{r['nprobe']}, k=10 (latency ms):"
    )
    rows = []
    for phase in ("before", "during", "after"):
        x = r[phase]
        rows.append(
            [
                phase,
                f"{x['seconds']:.1f}",
                f"{x['ok']:,}",
                str(x["failures"]),
                str(x["partial"]),
                f"{x['qps']:,.0f}",
                f"{x['lat_p50_ms']:.1f}",
                f"{x['lat_p99_ms']:.1f}",
                f"{x['lat_max_ms']:.0f}",
                f"{x['recall']:.4f}",
            ]
        )
    print(
        fmt_table(
            ["phase", "s", "ok", "failed", "partial", "q/s", "p50", "p99", "max", "recall@10"],
            rows,
        )
    )
    for phase in ("before", "during", "after"):
        if r[phase]["errors"]:
            print(f"  {phase} errors: {r[phase]['errors']}")
    if r.get("log_warnings"):
        print(f"{len(r['log_warnings'])} WARNING/ERROR log line(s), last ones:")
        for ln in r["log_warnings"][-5:]:
            print(f"    {ln[:220]}")


# ---------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    where = maybe_reexec_in_netns(Path(__file__).with_name("bench.py"), argv)
    args = parse_args(argv)
    if args.out == Path("bench-results.json"):
        args.out = Path(
            "bench-rebalance-results.json"
            if args.rebalance and not args.cluster
            else "bench-cluster-results.json"
        )
    if args.cluster is not None and args.cluster < 2:
        print("--cluster N needs N >= 2", file=sys.stderr)
        return 2
    ds = load_dataset(args)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": {
            "name": ds.name,
            "n": ds.n,
            "dim": ds.dim,
            "queries": args.queries,
            "synthetic": ds.synthetic,
            "notes": ds.notes,
        },
        "environment": environment(),
        "network": where,
        "private_netns": in_netns(),
    }
    log(f"network: {where}")
    status = 0
    t0 = time.perf_counter()
    with temp_dir(args.keep) as tmp:
        try:
            if args.cluster:
                asyncio.run(run_cluster(args, ds, tmp, results))
            if args.rebalance:
                asyncio.run(run_rebalance(args, ds, tmp, results))
        except (TimeoutError, RuntimeError, NodeFailed, aiohttp.ClientError) as exc:
            results["error"] = f"{type(exc).__name__}: {exc}"
            print(f"bench: {results['error']}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            results["error"] = "interrupted"
            status = 130
        finally:
            results["wall_s"] = time.perf_counter() - t0
            args.out.write_bytes(
                orjson.dumps(results, option=orjson.OPT_INDENT_2 | OPT_NP | orjson.OPT_NON_STR_KEYS)
            )
    report_cluster(args, ds, results)
    report_rebalance(results)
    print(f"\nAll figures: {args.out.resolve()}")
    return status
