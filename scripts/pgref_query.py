"""Queries of the pgvector reference: the search statement (a scalar subquery on a `queries`
table, so pgbench only draws a row number) and EXPLAIN proof that it orders by the HNSW index,
optional metadata filters with pgvector's iterative scans, exact (filtered) ground truth,
recall@k measured from Python and q/s from pgbench."""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_proc import machine_busy_s, run_measured, tree_cpu_s
from pgref_load import METRICS, Column
from pgref_server import PgRefError, PgServer, ident, pgbench_binary

FILTER_OPS = ("=", "<>", "<", "<=", ">", ">=")


@dataclass(frozen=True)
class Filter:
    """WHERE column op value on a metadata column. The value is written into the SQL as a
    literal (strings quoted), so pgbench and the planner see a constant."""

    column: str
    op: str
    value: str | int | float

    def __post_init__(self) -> None:
        ident(self.column)
        if self.op not in FILTER_OPS:
            raise PgRefError(f"filter operator {self.op!r} is not one of {FILTER_OPS}")
        if isinstance(self.value, float) and not math.isfinite(self.value):
            raise PgRefError("filter value must be finite")

    @classmethod
    def parse(cls, text: str) -> Filter:
        """'pos=verb', 'len<=40', 'score>0.5': numbers become numeric literals."""
        m = re.match(r"^([a-z_][a-z0-9_]*)\s*(<>|<=|>=|=|<|>)\s*(.+)$", text.strip())
        if not m:
            raise PgRefError(f"filter {text!r} is not COLUMN OP VALUE")
        raw = m.group(3).strip()
        value: str | int | float = raw
        with contextlib.suppress(ValueError):
            value = float(raw) if any(ch in raw for ch in ".eE") else int(raw)
        return cls(m.group(1), m.group(2), value)

    def literal(self) -> str:
        if isinstance(self.value, str):
            return "'" + self.value.replace("'", "''") + "'"
        return repr(self.value)

    def sql(self) -> str:
        return f"{self.column} {self.op} {self.literal()}"

    def mask(self, values: Column) -> np.ndarray:
        """Which rows pass, for the exact (filtered) ground truth."""
        arr = np.asarray(values, dtype=object if isinstance(self.value, str) else None)
        ops = {
            "=": np.equal,
            "<>": np.not_equal,
            "<": np.less,
            "<=": np.less_equal,
            ">": np.greater,
            ">=": np.greater_equal,
        }
        return np.asarray(ops[self.op](arr, self.value), dtype=bool)

    def __str__(self) -> str:
        return self.sql()


def search_sql(
    qparam: str,
    *,
    metric: str = "ip",
    k: int = 10,
    filt: Filter | None = None,
    table: str = "items",
    column: str = "embedding",
    queries_table: str = "queries",
) -> str:
    """SELECT id FROM items [WHERE f] ORDER BY embedding <op> (SELECT v FROM queries WHERE
    qid = <qparam>) LIMIT k. The scalar subquery is an InitPlan: its value is a parameter of
    the index scan, so the HNSW index orders the rows (check_plan proves it). qparam is
    ':q' for pgbench, '%s' for psycopg or a literal number for EXPLAIN."""
    _, op = METRICS[metric]
    where = f" WHERE {filt.sql()}" if filt is not None else ""
    return (
        f"SELECT id FROM {ident(table)}{where} ORDER BY {ident(column)} {op} "
        f"(SELECT v FROM {ident(queries_table)} WHERE qid = {qparam}) LIMIT {int(k)}"
    )


def session_settings(ef_search: int, filt: Filter | None, iterative: str | None) -> dict[str, str]:
    """hnsw.ef_search, and with a filter pgvector 0.8's iterative scan (relaxed_order by
    default): without it, a selective filter leaves fewer than k of the ef_search
    candidates."""
    out = {"hnsw.ef_search": str(int(ef_search))}
    mode = iterative if iterative is not None else ("relaxed_order" if filt else None)
    if mode is not None:
        if mode not in ("off", "relaxed_order", "strict_order"):
            raise PgRefError(f"hnsw.iterative_scan {mode!r}")
        out["hnsw.iterative_scan"] = mode
    return out


def apply_settings(conn: Any, settings: Mapping[str, str]) -> None:
    for k, v in settings.items():
        conn.execute(f"SET {k} = '{v}'")


def explain(pg: PgServer, sql: str, settings: Mapping[str, str]) -> str:
    with pg.connect() as conn:
        apply_settings(conn, settings)
        return "\n".join(str(r[0]) for r in conn.execute(f"EXPLAIN {sql}").fetchall())


def check_plan(pg: PgServer, sql: str, index_name: str, settings: Mapping[str, str]) -> str:
    """EXPLAIN sql; fails unless the plan orders by an index scan on index_name."""
    plan = explain(pg, sql, settings)
    if f"Index Scan using {index_name}" not in plan or "Order By" not in plan:
        raise PgRefError(f"the planner does not use {index_name} for\n{sql}\n{plan}")
    return plan


def exact_topk(
    base: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    metric: str = "ip",
    mask: np.ndarray | None = None,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """Exact top-k ids (row numbers, or ids[row]) of each query among the rows in mask, by
    the metric; -1 pads when fewer than k rows pass. Chunked numpy matmul."""
    rows = np.flatnonzero(mask) if mask is not None else np.arange(len(base))
    sub = np.asarray(base[rows], dtype=np.float32)
    q = np.asarray(queries, dtype=np.float32)
    if metric == "cosine":
        sub = sub / np.maximum(np.linalg.norm(sub, axis=1, keepdims=True), 1e-30)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    out = np.full((len(q), k), -1, dtype=np.int64)
    kk = min(k, len(rows))
    if kk == 0:
        return out
    sq = (sub * sub).sum(axis=1) if metric == "l2" else None
    for s in range(0, len(q), 256):
        score = q[s : s + 256] @ sub.T  # larger is nearer
        if sq is not None:
            score = 2 * score - sq
        part = np.argpartition(-score, kk - 1, axis=1)[:, :kk]
        order = np.take_along_axis(score, part, axis=1).argsort(axis=1)[:, ::-1]
        top = rows[np.take_along_axis(part, order, axis=1)]
        out[s : s + 256, :kk] = top if ids is None else np.asarray(ids)[top]
    return out


def recall_of(found: Sequence[Sequence[int]], gt: np.ndarray, k: int) -> float:
    """|found ∩ gt[:k]| / |gt[:k] without the -1 padding|, over all queries."""
    hit = total = 0
    for row, truth in zip(found, gt, strict=True):
        t = {int(x) for x in truth[:k] if x >= 0}
        hit += len(t & {int(x) for x in row[:k]})
        total += len(t)
    return hit / total if total else float("nan")


@dataclass
class RecallResult:
    ef_search: int
    queries: int
    recall: float
    mean_returned: float
    lat_p50_ms: float  # one connection, one query at a time
    lat_p99_ms: float
    filter: str | None = None
    iterative_scan: str | None = None


def measure_recall(
    pg: PgServer,
    gt: np.ndarray,
    ef_search: int,
    *,
    n: int = 300,
    k: int = 10,
    metric: str = "ip",
    filt: Filter | None = None,
    iterative: str | None = None,
) -> RecallResult:
    """recall@k of the pgbench query for query rows 0..n-1 against gt (ids), one connection."""
    n = min(n, len(gt))
    settings = session_settings(ef_search, filt, iterative)
    # psycopg reads % as a placeholder: a literal one in the filter value is doubled.
    sql = search_sql("$qid$", metric=metric, k=k, filt=filt).replace("%", "%%")
    sql = sql.replace("$qid$", "%s")
    found: list[list[int]] = []
    lat: list[float] = []
    with pg.connect() as conn:
        apply_settings(conn, settings)
        with conn.cursor() as cur:
            for i in range(n):
                t0 = time.perf_counter()
                cur.execute(sql, (i,), prepare=True)
                found.append([int(r[0]) for r in cur.fetchall()])
                lat.append(time.perf_counter() - t0)
    return RecallResult(
        ef_search=ef_search,
        queries=n,
        recall=recall_of(found, gt[:n], k),
        mean_returned=float(np.mean([len(f) for f in found])),
        lat_p50_ms=float(np.percentile(lat, 50)) * 1000,
        lat_p99_ms=float(np.percentile(lat, 99)) * 1000,
        filter=None if filt is None else filt.sql(),
        iterative_scan=settings.get("hnsw.iterative_scan"),
    )


@dataclass
class PgbenchResult:
    ef_search: int
    clients: int
    threads: int
    seconds: float
    transactions: int
    failed: int
    tps: float  # pgbench's, without the initial connection time
    lat_avg_ms: float
    lat_p50_ms: float  # from a sample of pgbench's per-transaction log
    lat_p95_ms: float
    lat_p99_ms: float
    server_cpu_s: float  # postmaster and its backends
    client_cpu_s: float  # pgbench's own
    machine_cpu_s: float  # every core's busy time (others = this − server − pgbench)
    filter: str | None = None
    iterative_scan: str | None = None
    pgbench: str = ""


def parse_pgbench(stdout: str) -> dict[str, float]:
    """tps, transactions, failed and latency average from pgbench's summary."""
    pats = {
        "tps": r"^tps = ([\d.]+) \(without initial connection time\)",
        "transactions": r"^number of transactions actually processed: (\d+)",
        "failed": r"^number of failed transactions: (\d+)",
        "lat_avg_ms": r"^latency average = ([\d.]+) ms",
    }
    out: dict[str, float] = {}
    for key, pat in pats.items():
        m = re.search(pat, stdout, re.M)
        if m:
            out[key] = float(m.group(1))
    if "tps" not in out or "transactions" not in out:
        raise PgRefError(f"cannot read pgbench's summary:\n{stdout[-2000:]}")
    out.setdefault("failed", 0.0)
    out.setdefault("lat_avg_ms", float("nan"))
    return out


def read_pgbench_logs(paths: Sequence[Path]) -> np.ndarray:
    """Per-transaction latencies in ms from pgbench --log files (client_id, transaction_no,
    time in µs, script_no, epoch, µs); failed or skipped transactions are left out."""
    lat: list[float] = []
    for p in paths:
        for line in p.read_text().splitlines():
            f = line.split()
            if len(f) >= 3 and f[2].isdigit():
                lat.append(int(f[2]) / 1000)
    return np.asarray(lat, dtype=np.float64)


def pgbench_point(
    pg: PgServer,
    ef_search: int,
    nq: int,
    *,
    clients: int = 8,
    threads: int = 2,
    seconds: float = 15.0,
    k: int = 10,
    metric: str = "ip",
    filt: Filter | None = None,
    iterative: str | None = None,
    sampling_rate: float = 0.1,
    work_dir: Path | None = None,
) -> PgbenchResult:
    """pgbench -n -c clients -j threads -T seconds with a script that draws a random query row
    (0..nq-1) and runs search_sql; prepared statements (-M prepared), ef_search and the
    iterative scan set per connection through PGOPTIONS."""
    wd = Path(tempfile.mkdtemp(prefix="aquila-pgbench-")) if work_dir is None else work_dir
    wd.mkdir(parents=True, exist_ok=True)
    tag = f"ef{ef_search}{'_f' if filt else ''}_{time.monotonic_ns()}"
    script = wd / f"{tag}.sql"
    script.write_text(
        f"\\set q random(0, {int(nq) - 1})\n{search_sql(':q', metric=metric, k=k, filt=filt)};\n"
    )
    settings = session_settings(ef_search, filt, iterative)
    binary = pgbench_binary(pg.version)
    cmd = [
        binary,
        "-n",  # no vacuum of pgbench's own tables (there are none)
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(threads),
        "-T",
        str(max(1, round(seconds))),
        "-f",
        str(script),
        "--log",
        f"--log-prefix={wd / tag}",
        f"--sampling-rate={sampling_rate}",
    ]
    try:
        cpu0 = tree_cpu_s(pg.pid)
        busy0 = machine_busy_s()
        fin = run_measured(
            cmd,
            timeout_s=seconds + 60,
            env=pg.libpq_env(settings),
            cwd=wd,
            out_dir=wd,
            name=tag,
        )
        busy1 = machine_busy_s()
        cpu1 = tree_cpu_s(pg.pid)
        if fin.returncode != 0:
            raise PgRefError(f"pgbench exited with {fin.returncode}:\n{fin.stderr[-2000:]}")
        s = parse_pgbench(fin.stdout)
        lat = read_pgbench_logs(sorted(wd.glob(f"{tag}.*[0-9]")))
    finally:
        if work_dir is None:
            shutil.rmtree(wd, ignore_errors=True)

    def p(q: float) -> float:
        return float(np.percentile(lat, q)) if len(lat) else float("nan")

    return PgbenchResult(
        ef_search=ef_search,
        clients=clients,
        threads=threads,
        seconds=fin.seconds,
        transactions=int(s["transactions"]),
        failed=int(s["failed"]),
        tps=s["tps"],
        lat_avg_ms=s["lat_avg_ms"],
        lat_p50_ms=p(50),
        lat_p95_ms=p(95),
        lat_p99_ms=p(99),
        server_cpu_s=cpu1 - cpu0,
        client_cpu_s=fin.cpu_s,
        machine_cpu_s=busy1 - busy0,
        filter=None if filt is None else filt.sql(),
        iterative_scan=settings.get("hnsw.iterative_scan"),
        pgbench=binary,
    )
