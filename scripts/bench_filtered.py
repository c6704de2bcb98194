"""bench.py --filtered: filtered search at several selectivities beside unfiltered search and
beside pgvector's filtered HNSW, in one run on one machine.

The WordNet set with its `pos` field (a keyword correlated with the embedding: adverbs sit
together) and a synthetic numeric field `u` (uniform over 0..99,999, seeded, independent of
the vectors) filtered by ranges at 0.1 %, 1 %, 10 %, 50 % and 90 %. For each filter, and for
none: recall@10 against the exact filtered top 10 (the Python client), the plan the node chose
per shard (`explain`), and q/s from wrk (8 connections, every body carrying the filter). Then,
once the node has stopped, pgvector HNSW with iterative scans (relaxed_order) and a b-tree on
each filter column, at several ef_search (scripts/pgref.py), and its q/s interpolated at
Aquila's recall.

    python scripts/bench.py --filtered                     # the whole table (~30 min)
    python scripts/bench.py --filtered --limit 20000 --load-seconds 5 --no-pgvector
"""

from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from bench_common import COLLECTION, JSON_HEADERS, READY_TIMEOUT_S, REQUEST_TIMEOUT_S, K, log
from bench_data import Dataset, normalise
from bench_load import create_collection, ingest, run_workers, wait_trained
from bench_node import Node, wait_ready
from bench_refs import qps_at_recall
from bench_report import fmt_table

SEED = 20240601
U_RANGE = 100_000
# name → (Aquila filter, pgvector WHERE), in the order of the table.
FILTERS: dict[str, tuple[dict[str, Any] | None, str | None]] = {
    "none": (None, None),
    "u<100 (0.1%)": ({"must": [{"key": "u", "range": {"lt": 100}}]}, "u<100"),
    "u<1000 (1%)": ({"must": [{"key": "u", "range": {"lt": 1000}}]}, "u<1000"),
    "u<10000 (10%)": ({"must": [{"key": "u", "range": {"lt": 10000}}]}, "u<10000"),
    "u<50000 (50%)": ({"must": [{"key": "u", "range": {"lt": 50000}}]}, "u<50000"),
    "u<90000 (90%)": ({"must": [{"key": "u", "range": {"lt": 90000}}]}, "u<90000"),
    "pos=adv": ({"must": [{"key": "pos", "match": "adv"}]}, "pos=adv"),
    "pos=verb": ({"must": [{"key": "pos", "match": "verb"}]}, "pos=verb"),
    "pos=noun": ({"must": [{"key": "pos", "match": "noun"}]}, "pos=noun"),
}


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filtered search (--filtered)")
    g.add_argument("--filtered", action="store_true",
                   help="instead: filtered search beside unfiltered and pgvector "
                   "(scripts/bench_filtered.py)")
    g.add_argument("--filtered-nprobe", type=int, default=64,
                   help="nprobe of every filtered and unfiltered point (default 64: the "
                   "first at which unfiltered recall@10 passes 0.95 on WordNet)")
    g.add_argument("--filtered-rounds", type=int, default=3,
                   help="wrk rounds over every filter (medians reported)")
    g.add_argument("--filter-ef-search", default="40,80,160,320",
                   help="pgvector ef_search points per filter")
    g.add_argument("--no-pgvector", action="store_true", help="--filtered without pgvector")


def with_synthetic_fields(ds: Dataset) -> None:
    """Add `u`, uniform over 0..U_RANGE-1 (seeded), to every document's metadata."""
    u = np.random.default_rng(SEED).integers(0, U_RANGE, ds.n)
    for m, v in zip(ds.metadata, u.tolist(), strict=True):
        m["u"] = v
        m.pop("text", None)  # the gloss: not filtered on, only makes every answer longer


def mask_of(ds: Dataset, spec: dict[str, Any] | None) -> np.ndarray:
    if spec is None:
        return np.ones(ds.n, dtype=bool)
    from aquila.cluster.model.filters import parse_filter

    flt = parse_filter(spec)
    assert flt is not None
    return np.fromiter((flt(m) for m in ds.metadata), dtype=bool, count=ds.n)


def ground_truth(ds: Dataset, mask: np.ndarray, n: int) -> np.ndarray:
    from pgref import exact_topk

    return exact_topk(normalise(ds.base), normalise(ds.queries[:n]), K, metric="ip", mask=mask)


def bodies(ds: Dataset, nprobe: int, spec: dict[str, Any] | None, n: int,
           explain: bool = False) -> list[bytes]:
    out = []
    for i in range(n):
        body: dict[str, Any] = {"vector": ds.queries[i], "k": K, "nprobe": nprobe,
                                "include": []}
        if spec is not None:
            body["filter"] = spec
        if explain:
            body["explain"] = True
        out.append(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
    return out


async def recall_point(session: aiohttp.ClientSession, node: Node, ds: Dataset, nprobe: int,
                       spec: dict[str, Any] | None, gt: np.ndarray) -> tuple[float, list[Any]]:
    """recall@10 over gt's queries (8 at a time) against the filtered ground truth, and the
    plans of the first query."""
    from pgref import recall_of

    url = f"{node.base_url}/v1/collections/{COLLECTION}/search"
    n = len(gt)
    reqs = bodies(ds, nprobe, spec, n, explain=True)
    found: list[list[int]] = [[] for _ in range(n)]
    plans: list[Any] = []

    async def one(i: int) -> None:
        async with session.post(url, data=reqs[i], headers=JSON_HEADERS) as r:
            raw = await r.read()
            if r.status != 200:
                raise RuntimeError(f"search -> {r.status}: {raw[:300]!r}")
        reply = orjson.loads(raw)
        found[i] = [int(h["id"]) for h in reply["results"][0]]
        if i == 0:
            plans.extend(reply["plans"])

    await run_workers(8, n, one)
    return recall_of(found, gt, K), plans


def plan_summary(plans: list[dict[str, Any]]) -> str:
    paths: dict[str, list[dict[str, Any]]] = {}
    for p in plans:
        paths.setdefault(p["path"], []).append(p)
    parts = []
    for path, ps in paths.items():
        probes = [p["nprobe"] for p in ps if "nprobe" in p]
        parts.append(f"{path}×{len(ps)}" + (f" (nprobe≤{max(probes)})" if probes else ""))
    return ", ".join(parts)


async def run_aquila(args: argparse.Namespace, ds: Dataset, tmp: Path,
                     results: dict[str, Any]) -> None:
    from wrkload import run_wrk, write_bodies

    env = {"AQUILA_FSYNC": "true", "AQUILA_LOG_LEVEL": "INFO"}
    if args.train_min is not None:
        env["AQUILA_TRAIN_MIN"] = str(args.train_min)
    node = Node(tmp / "node", tmp / "node.log", env)
    connector = aiohttp.TCPConnector(limit=16, keepalive_timeout=120)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    nrec = min(args.queries, len(ds.queries))
    p = args.filtered_nprobe
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            node.start()
            await wait_ready(session, node, READY_TIMEOUT_S)
            spec = {"dim": ds.dim, "metric": "cosine", "shards": args.shards,
                    "index": {"type": "ivf_flat"}}
            await create_collection(session, node.base_url, spec)
            ing = await ingest(session, node, ds, args.batch, args.uploaders)
            log(f"ingest: {ds.n} docs in {ing['seconds']:.1f}s")
            await wait_trained(session, node, ds.n, args.train_min or 4096)
            nl = node.trained_nlists()
            log(f"trained: nlist/trained-on {nl.get(0)}")
            results["filtered_node"] = {"nlist": nl.get(0), "nprobe": p, "shards": args.shards}
            points = []
            for i, (name, (fspec, _)) in enumerate(FILTERS.items()):
                mask = mask_of(ds, fspec)
                gt = await asyncio.to_thread(ground_truth, ds, mask, nrec)
                recall, plans = await recall_point(session, node, ds, p, fspec, gt)
                write_bodies(tmp / f"wrk-bodies-{i}.txt", bodies(ds, p, fspec, len(ds.queries)))
                points.append({"filter": name, "share": float(mask.mean()), "recall": recall,
                               "plan": plan_summary(plans), "plans": plans, "rounds": []})
                log(f"Aquila {name}: share {mask.mean():.4f}, recall@10 {recall:.4f}, plan "
                    f"{points[-1]['plan']}")
            # Rounds over every filter, so that the load other processes put on the machine
            # meanwhile weighs on all of them alike; the medians are reported.
            for r in range(args.filtered_rounds):
                for i, pt in enumerate(points):
                    w = await asyncio.to_thread(
                        run_wrk, node.base_url, f"/v1/collections/{COLLECTION}/search",
                        tmp / f"wrk-bodies-{i}.txt", connections=8, threads=2,
                        seconds=args.load_seconds, server_pid=node.pid, work_dir=tmp,
                    )
                    pt["rounds"].append(w.as_dict())
                    log(f"wrk round {r + 1} {pt['filter']}: {w.ok_rps:,.0f} q/s (non-2xx "
                        f"{w.non2xx}), server cores {w.server_cpu_s / w.seconds:.2f}, others "
                        f"{w.other_cpu_s / w.seconds:.2f}")
            for pt in points:
                rs = pt["rounds"]
                pt["qps"] = float(np.median([w["ok_rps"] for w in rs]))
                pt["qps_core"] = float(np.median([w["ok"] / w["server_cpu_s"] for w in rs]))
                pt["errors"] = sum(w["non2xx"] + sum(w["socket_errors"].values()) for w in rs)
            results["filtered"] = points
    finally:
        await asyncio.to_thread(node.stop)


def run_pgvector(args: argparse.Namespace, ds: Dataset, results: dict[str, Any]) -> None:
    from pgref import Filter, metadata_columns, run_reference

    efs = [int(x) for x in args.filter_ef_search.split(",") if x.strip()]
    filters = [Filter.parse(w) for _, w in FILTERS.values() if w is not None]
    r = run_reference(
        normalise(ds.base), ds.queries, ds.gt, columns=metadata_columns(ds.metadata),
        ef_search=efs, metric="ip", m=args.hnsw_m, ef_construction=args.hnsw_ef_construction,
        clients=args.pg_clients, threads=min(2, args.pg_clients), seconds=args.load_seconds,
        recall_queries=min(args.queries, 1000), k=K, filters=filters, filter_ef_search=efs,
        log=log,
    )
    results["filtered_pgvector"] = r.as_dict()


def main(args: argparse.Namespace) -> int:
    """The whole --filtered run: the node, then pgvector, then the table."""
    from bench_data import load_dataset
    from bench_refs import ensure_tools
    from bench_report import new_results, run_and_record

    args.loadgen = "wrk"
    args.pgvector = not args.no_pgvector
    if args.out == Path("bench-results.json"):
        args.out = Path("bench-filtered-results.json")
    ensure_tools(args)
    ds = load_dataset(args)
    with_synthetic_fields(ds)
    results = new_results(args, ds)

    def body(tmp: Path) -> None:
        asyncio.run(run_aquila(args, ds, tmp, results))
        if args.pgvector:  # after the node has stopped: the two never share the cores
            run_pgvector(args, ds, results)

    status = run_and_record(args, results, body)
    report(args, ds, results)
    print(f"\nAll figures: {args.out.resolve()}")
    return status


def _at_recall(pts: list[tuple[float, float]], recall: float) -> tuple[float, str, str]:
    """pgvector's rate at Aquila's recall (interpolated), its mark, and the mark of Aquila÷pg:
    '>' / '≤' where pgvector's lowest ef_search already has a higher recall, '<' / '≥' where
    even its highest falls short of Aquila's recall (the rate of that point is given)."""
    if not pts:
        return float("nan"), "", ""
    q, mark = qps_at_recall(pts, recall)
    if not math.isnan(q):
        return q, mark, "≤" if mark else ""
    return max(pts)[1], "<", "≥"


def report(args: argparse.Namespace, ds: Dataset, results: dict[str, Any]) -> None:
    from pgref import Filter

    points = results.get("filtered", [])
    if not points:
        return
    pg = results.get("filtered_pgvector")
    per_s: dict[str | None, list[tuple[float, float]]] = {}
    per_core: dict[str | None, list[tuple[float, float]]] = {}
    pg_rows = []
    for pt in [*pg["points"], *pg["filtered"]] if pg else []:
        rec, load = pt["recall"], pt["load"]
        per_s.setdefault(rec["filter"], []).append((rec["recall"], load["tps"]))
        core = load["tps"] * load["seconds"] / load["server_cpu_s"]
        per_core.setdefault(rec["filter"], []).append((rec["recall"], core))
        pg_rows.append([rec["filter"] or "none", str(rec["ef_search"]), f"{rec['recall']:.4f}",
                        f"{load['tps']:,.0f}", f"{core:,.0f}",
                        f"{load['server_cpu_s'] / load['seconds']:.2f}"])
    base = next(p for p in points if p["filter"] == "none")
    node = results.get("filtered_node", {})
    print()
    print("=" * 100)
    print(f"Filtered search — {ds.name}: {ds.n:,} × {ds.dim}, k={K}, {args.shards} shards, "
          f"ivf_flat nlist {node.get('nlist')}, nprobe {node.get('nprobe')}; wrk 8 connections "
          f"and pgbench {args.pg_clients} clients, {args.load_seconds:.0f}s a point (Aquila: the "
          f"median of {args.filtered_rounds} rounds); recall "
          f"against the exact filtered top 10 over {min(args.queries, len(ds.queries))} queries")
    rows = []
    for pt in points:
        where = FILTERS[pt["filter"]][1]
        key = None if where is None else Filter.parse(where).sql()
        qps, core = pt["qps"], pt["qps_core"]
        pq, mq, rq = _at_recall(per_s.get(key, []), pt["recall"])
        pc, mc, rc = _at_recall(per_core.get(key, []), pt["recall"])
        rows.append([
            pt["filter"], f"{pt['share'] * 100:.2f}%", pt["plan"], f"{pt['recall']:.4f}",
            f"{qps:,.0f}", f"{qps / base['qps']:.2f}", f"{core:,.0f}",
            f"{core / base['qps_core']:.2f}", str(pt["errors"]),
            "-" if math.isnan(pq) else f"{mq}{pq:,.0f}",
            "-" if math.isnan(pq) else f"{rq}{qps / pq:.2f}",
            "-" if math.isnan(pc) else f"{mc}{pc:,.0f}",
            "-" if math.isnan(pc) else f"{rc}{core / pc:.2f}",
        ])
    heads = ["filter", "matches", "Aquila plan (shards)", "recall@10", "q/s", "÷unfiltered",
             "q/s/core", "÷unfiltered/core", "errors", "pg q/s", "÷pg", "pg q/s/core",
             "÷pg/core"]
    print(fmt_table(heads, rows))
    print("  pg: pgvector HNSW at Aquila's recall, interpolated between its ef_search points; "
          "'>' (÷pg '≤'): its lowest ef_search already has a higher recall; '<' (÷pg '≥'): even "
          "its highest has a lower one. /core: per second of the server's CPU (steadier when "
          "other processes take cores)")
    if pg_rows:
        print("\npgvector HNSW, iterative scans relaxed_order, b-tree on the filter column:")
        print(fmt_table(["WHERE", "ef_search", "recall@10", "q/s", "q/s/core", "srv cores"],
                        pg_rows))
