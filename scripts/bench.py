#!/usr/bin/env python3
"""End-to-end benchmark of one Aquila node against in-process FAISS on the same data.

What it does, in one run:

1. loads the dataset (default ../shared/data/wordnet-minilm-384 next to the repository; or
   `--synthetic N` seeded clustered vectors with FAISS-flat ground truth);
2. starts a real `aquila serve` subprocess on 127.0.0.1 with a fresh temporary data dir
   (fsync on, the product default) and waits for /readyz;
3. creates a cosine ivf_flat collection and ingests every base vector over REST in batches
   (several concurrent uploaders), timing the durable ingest rate; then waits until every shard's
   index_state is "trained";
4. measures recall@10 and queries/s over REST, one query per request, at each concurrency and
   nprobe (aiohttp, keep-alive, one session);
5. measures FAISS in-process on the same vectors: one IndexIVFFlat (nlist = round(4·√n)) and the
   per-shard equivalent (one IVF index per shard, searched and merged), batched and from 16
   Python threads one query at a time;
6. times restarts of the node holding the whole set: after SIGTERM (graceful, snapshots) and
   after SIGKILL (replays the change log written since the last snapshot);
7. prints tables and writes every figure to JSON (`--out`).

Client and server run on the same machine and share its cores: REST figures include the cost
of the client (JSON encoding, HTTP) competing with the server for CPU.

    python scripts/bench.py --quick
    python scripts/bench.py --out bench-results.json
    python scripts/bench.py --synthetic 50000 --quick
    python scripts/bench.py --synthetic 1000000 --types ivf_flat,ivf_sq8  # per type (issue 14)
    python scripts/bench.py --cluster 3 --limit 50000      # 1 vs 3 nodes (bench_cluster.py),
                                                           # + batches of 100 vs FAISS
    python scripts/bench.py --rebalance --limit 50000      # 3 → 4 nodes (bench_rebalance.py)
    python scripts/bench.py --filtered                     # filters vs unfiltered vs pgvector
    python scripts/bench.py --pgvector --loadgen wrk       # wrk load, pgvector (bench_refs.py)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_cluster import run_cluster
from bench_common import COLLECTION, READY_TIMEOUT_S, REQUEST_TIMEOUT_S, log
from bench_data import DEFAULT_DATA, Dataset, load_dataset
from bench_faiss import build_searchers, faiss_points
from bench_filtered import add_args as add_filtered_args
from bench_filtered import main as main_filtered
from bench_load import (
    PointResult,
    create_collection,
    ingest,
    search_point,
    upsert_bodies,
    wait_trained,
)
from bench_local_cluster import in_netns, maybe_reexec_in_netns
from bench_node import Node, call, restart, rss_mib_of, wait_ready
from bench_profile import profile_server
from bench_rebalance import REBALANCE_CONCURRENCY, run_rebalance
from bench_refs import add_args as add_ref_args
from bench_refs import ensure_tools, report_refs, run_pgvector, wrk_points
from bench_report import new_results, report, report_cluster, report_rebalance, run_and_record


def parse_int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def parse_float_list(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if any(not 0.5 <= x <= 0.999 for x in out):
        raise argparse.ArgumentTypeError(f"expected recalls from 0.5 to 0.999, got {s!r}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="dataset directory (%(default)s)"
    )
    p.add_argument(
        "--synthetic", type=int, metavar="N", help="use N seeded synthetic vectors instead"
    )
    p.add_argument("--dim", type=int, help="dimension of --synthetic vectors (384; 96 with "
                   "--types)")
    p.add_argument("--seed", type=int, default=1234, help="seed of --synthetic")
    p.add_argument("--limit", type=int, help="use only the first N base vectors")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch", type=int, default=1000, help="documents per upsert request")
    p.add_argument("--uploaders", type=int, default=4, help="concurrent upsert requests")
    p.add_argument("--concurrency", type=parse_int_list, default=[1, 16])
    p.add_argument("--nprobe", type=parse_int_list, default=[4, 8, 16, 32, 64])
    p.add_argument("--queries", type=int, default=2000, help="queries per measured point")
    p.add_argument("--warmup", type=int, default=200, help="warm-up queries before each point")
    p.add_argument("--faiss-threads", type=int, default=16)
    p.add_argument(
        "--train-min", type=int, help="AQUILA_TRAIN_MIN for the node (product default 4096)"
    )
    p.add_argument("--kill-rewrites", type=int, help="documents re-upserted before the SIGKILL")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy the server for this long during an extra c=max run",
    )
    p.add_argument("--profile-nprobe", type=int, default=16)
    p.add_argument("--skip-restart", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 20,000 base vectors, 500 queries, nprobe 8,16",
    )
    p.add_argument(
        "--cluster",
        type=int,
        metavar="N",
        help="instead: the same workload on 1 node and on N nodes (127.0.0.2.., port 8470) "
        "side by side (scripts/bench_cluster.py)",
    )
    p.add_argument(
        "--rebalance",
        action="store_true",
        help="instead: 3 nodes, add a 4th, rebalance under search load "
        "(scripts/bench_rebalance.py)",
    )
    p.add_argument(
        "--replication", type=int, default=1, help="replication factor in --cluster mode"
    )
    p.add_argument(
        "--recall",
        type=parse_float_list,
        default=[0.95],
        help="--cluster: also search by these target recalls (each node its own probes; "
        "empty to skip)",
    )
    p.add_argument(
        "--query-batch",
        type=int,
        default=100,
        help="--cluster: query vectors per request of the 1-node batch figure (0 to skip)",
    )
    p.add_argument("--batch-nprobe", type=int, default=32, help="nprobe of the batch figure")
    p.add_argument(
        "--window", type=float, default=5.0, help="seconds of search load before/after a rebalance"
    )
    p.add_argument(
        "--rebalance-nprobe", type=int, default=16, help="nprobe of the --rebalance search load"
    )
    p.add_argument(
        "--rebalance-timeout", type=float, default=900.0, help="give the rebalance this long"
    )
    p.add_argument(
        "--types",
        help="instead, with --synthetic N: one node per index type (comma-separated, e.g. "
        "ivf_flat,ivf_sq8): ingest rate, RSS and disk against the raw vectors, time to trained, "
        "recall and q/s at several nprobe and target recalls, restarts after SIGKILL and "
        "SIGTERM (scripts/bench_memory.py)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and log")
    p.add_argument("--out", type=Path, default=Path("bench-results.json"))
    add_ref_args(p)
    add_filtered_args(p)
    args = p.parse_args(argv)
    if args.dim is None:
        args.dim = 96 if args.types else 384
    if args.types and not args.synthetic:
        p.error("--types needs --synthetic N")
    if args.loadgen == "wrk" and not args.cluster:
        args.concurrency = [1]  # the Python client only measures recall; wrk the load
        # (with --cluster, wrk runs at each --concurrency: the fan-out goals' 1 and 16)
    if args.quick:
        args.limit = args.limit or 20_000
        args.queries = min(args.queries, 500)
        args.warmup = min(args.warmup, 50)
        if args.nprobe == [4, 8, 16, 32, 64]:
            args.nprobe = [8, 16]
        if args.train_min is None:
            # 20,000 / 8 shards = 2,500 per shard, below the default 4096: train earlier.
            args.train_min = 1024
    if args.cluster and args.nprobe == [4, 8, 16, 32, 64]:
        args.nprobe = [32]  # the figure; the target recalls give the other view
    if args.kill_rewrites is None:
        args.kill_rewrites = 2_000 if args.quick else 10_000
    return args


async def run(args: argparse.Namespace, ds: Dataset, tmp: Path, results: dict[str, Any]) -> None:
    env = {"AQUILA_FSYNC": "true", "AQUILA_LOG_LEVEL": "INFO"}
    if args.train_min is not None:
        env["AQUILA_TRAIN_MIN"] = str(args.train_min)
    train_min = args.train_min or 4096
    node = Node(tmp / "node", tmp / "node.log", env)
    results["node"] = {"env": env, "port": node.port, "shards": args.shards}
    cmax = max(args.concurrency)
    connector = aiohttp.TCPConnector(limit=cmax + 4, limit_per_host=cmax + 4, keepalive_timeout=120)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            t0 = time.perf_counter()
            node.start()
            results["node"]["cold_start_ready_s"] = await wait_ready(session, node, READY_TIMEOUT_S)
            log(f"node up on {node.base_url} (pid {node.pid}) in {time.perf_counter() - t0:.2f}s")

            spec = {
                "dim": ds.dim,
                "metric": "cosine",
                "shards": args.shards,
                "index": {"type": "ivf_flat"},
            }
            await create_collection(session, node.base_url, spec)
            results["collection"] = spec

            results["ingest"] = await ingest(session, node, ds, args.batch, args.uploaders)
            ing = results["ingest"]
            log(
                f"ingest: {ds.n} docs in {ing['seconds']:.1f}s = {ing['docs_per_s']:,.0f} docs/s "
                f"durable (batch p50 {ing['batch_latency_p50_s'] * 1000:.0f} ms, "
                f"p99 {ing['batch_latency_p99_s'] * 1000:.0f} ms)"
            )
            results["training"] = await wait_trained(session, node, ds.n, train_min)
            nl = node.trained_nlists()
            results["training"]["node_nlists"] = {
                str(s): {"nlist": v[0], "trained_on": v[1]} for s, v in sorted(nl.items())
            }
            results["node"]["rss_mib_after_ingest"] = rss_mib_of(node.pid)
            log(
                f"all shards trained {results['training']['seconds_after_ingest']:.1f}s after the "
                f"last ack; node index nlist/trained-on: {nl.get(0)}"
            )

            rest: list[PointResult] = []
            for p in args.nprobe:
                for c in args.concurrency:
                    r = await search_point(session, node, ds, p, c, args.queries, args.warmup)
                    rest.append(r)
                    log(
                        f"REST nprobe={p} c={c}: recall {r.recall:.4f}, {r.qps:,.0f} q/s, "
                        f"p50 {r.lat_p50_ms:.1f} ms p99 {r.lat_p99_ms:.1f} ms, server took p50 "
                        f"{r.server_took_ms_p50:.2f} ms, cpu server {r.server_cpu_s:.1f}s "
                        f"client {r.client_cpu_s:.1f}s over {r.seconds:.1f}s"
                    )
            results["rest"] = [r.__dict__ for r in rest]
            if args.loadgen == "wrk":
                results["wrk"] = await wrk_points(session, node, ds, args, tmp, rest)

            if args.profile > 0:
                results["profile"] = await profile_server(session, node, ds, args, tmp)

            searchers, build = await asyncio.to_thread(build_searchers, ds, args.shards, nl)
            results["faiss_build"] = build
            faiss_res: list[dict[str, Any]] = []
            for s in searchers:
                faiss_res += await asyncio.to_thread(
                    faiss_points, s, ds, args.nprobe, args.queries, args.faiss_threads
                )
            results["faiss"] = faiss_res
            del searchers

            if not args.skip_restart:
                g = await restart(session, node, ds, signal.SIGTERM)
                log(
                    f"SIGTERM restart: stop {g['stop_s']:.2f}s, ready {g['start_to_ready_s']:.2f}s, "
                    f"first search {g['start_to_first_search_s']:.2f}s"
                )
                # Writes since the last snapshot make the SIGKILL restart replay the change log.
                m = min(args.kill_rewrites, ds.n)
                url = f"{node.base_url}/v1/collections/{COLLECTION}/documents"
                tw = time.perf_counter()
                for body in upsert_bodies(ds, args.batch, m):
                    await call(session, "POST", url, body)
                rewrite_s = time.perf_counter() - tw
                k = await restart(session, node, ds, signal.SIGKILL)
                k["rewritten_before_kill"] = m
                k["rewrite_s"] = rewrite_s
                check = await search_point(
                    session, node, ds, 16, min(cmax, 8), min(500, args.queries), 0
                )
                k["recall_nprobe16_after"] = check.recall
                log(
                    f"SIGKILL restart ({m} docs rewritten just before): ready "
                    f"{k['start_to_ready_s']:.2f}s, first search {k['start_to_first_search_s']:.2f}s, "
                    f"recall@10 nprobe=16 after {check.recall:.4f}"
                )
                results["restart"] = {"sigterm": g, "sigkill": k}
                results["node"]["log_restart_lines"] = [
                    ln for ln in node.log_tail(60).splitlines() if "opened" in ln or "ready" in ln
                ]
    finally:
        await asyncio.to_thread(node.stop)
        if args.keep:
            log(f"node log: {node.log_path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.types:
        return main_types(args)
    if args.filtered:
        return main_filtered(args)
    if args.cluster or args.rebalance:
        return main_multi(args, sys.argv[1:] if argv is None else argv)
    ensure_tools(args)
    ds = load_dataset(args)
    results = new_results(args, ds)
    log(results["environment"]["note"])

    def body(tmp: Path) -> None:
        asyncio.run(run(args, ds, tmp, results))
        if args.pgvector:  # after the node has stopped: the two never share the cores
            run_pgvector(args, ds, results)

    status = run_and_record(args, results, body)
    report(args, ds, results)
    report_refs(args, ds, results)
    return status


def main_types(args: argparse.Namespace) -> int:
    """--synthetic N --types A,B: scripts/bench_memory.py's per-type node benchmark (the
    figures of issue 14), its table printed, its figures written to --out."""
    import bench_memory

    nprobes = ",".join(f"nprobe={p}" for p in args.nprobe)
    margs = bench_memory.parse_args([
        "--n", str(args.synthetic), "--dim", str(args.dim), "--types", args.types,
        "--batch", "2000", "--clients", "2", "--queries", str(min(args.queries, 1000)),
        "--settings", f"{nprobes},recall=0.9,recall=0.95,recall=0.99",
        "--nprobe", str(max(args.nprobe)), "--json", str(args.out),
        *(["--keep"] if args.keep else []),
    ])
    results = bench_memory.run(margs)
    print(bench_memory.table(results))
    print(f"\nAll figures: {args.out.resolve()}")
    return 0


def main_multi(args: argparse.Namespace, argv: list[str]) -> int:
    """--cluster N and/or --rebalance, in a private network namespace when we can have one."""
    where = maybe_reexec_in_netns(Path(__file__), argv)
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
    results = new_results(args, ds)
    results["network"] = where
    results["private_netns"] = in_netns()
    log(f"network: {where}")

    def body(tmp: Path) -> None:
        if args.cluster:
            asyncio.run(run_cluster(args, ds, tmp, results))
        if args.rebalance:
            asyncio.run(run_rebalance(args, ds, tmp, results))

    status = run_and_record(args, results, body)
    report_cluster(args, ds, results)
    report_rebalance(results, REBALANCE_CONCURRENCY)
    print(f"\nAll figures: {args.out.resolve()}")
    return status


if __name__ == "__main__":
    sys.exit(main())
