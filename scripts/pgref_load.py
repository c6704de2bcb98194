"""Loading a data set into PostgreSQL for the pgvector reference: COPY ... FROM STDIN in the
binary format (rows encoded with numpy, off the clock; the COPY itself timed), and the HNSW
and b-tree indexes, timed."""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
from pgref_server import PgRefError, PgServer, ident

COPY_CHUNK = 1 << 20

METRICS: dict[str, tuple[str, str]] = {
    # metric: (operator class, distance operator; smaller is nearer)
    "ip": ("vector_ip_ops", "<#>"),
    "cosine": ("vector_cosine_ops", "<=>"),
    "l2": ("vector_l2_ops", "<->"),
}


COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER = struct.pack("!h", -1)

Column: TypeAlias = np.ndarray | Sequence[str | None]


def column_type(values: Column) -> str:
    """The PostgreSQL type a metadata column is loaded as: bigint, double precision, boolean
    or text (strings; None is NULL)."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        kind = values.dtype.kind
        if kind in "iu":
            return "bigint"
        if kind == "f":
            return "double precision"
        if kind == "b":
            return "boolean"
        raise PgRefError(f"unsupported column dtype {values.dtype}")
    return "text"


def encode_copy_binary(
    ids: np.ndarray, vectors: np.ndarray, columns: Mapping[str, Column] | None = None
) -> bytes:
    """COPY's binary format for rows (id bigint, <numeric/boolean columns>..., vector,
    <text columns>...), in that order (column_order gives the names). pgvector's binary
    vector is int16 dim, int16 0, then dim float4, all big-endian. The fixed-size part is
    one numpy structured array; text columns are spliced in per row."""
    n, d = vectors.shape
    if len(ids) != n:
        raise PgRefError(f"{len(ids)} ids for {n} vectors")
    cols = dict(columns or {})
    for name, values in cols.items():
        if len(values) != n:
            raise PgRefError(f"column {name!r} has {len(values)} values for {n} rows")
    fixed = [k for k, v in cols.items() if column_type(v) != "text"]
    texts = [k for k, v in cols.items() if column_type(v) == "text"]
    fields: list[tuple[str, str]] = [("nf", ">i2"), ("id_len", ">i4"), ("id", ">i8")]
    for i, name in enumerate(fixed):
        t = column_type(cols[name])
        fmt = {"bigint": ">i8", "double precision": ">f8", "boolean": "u1"}[t]
        fields += [(f"c{i}_len", ">i4"), (f"c{i}", fmt)]
    fields += [("v_len", ">i4"), ("v_dim", ">i2"), ("v_unused", ">i2"), ("v", f"({d},)>f4")]
    rec = np.zeros(n, dtype=np.dtype(fields))
    rec["nf"] = 2 + len(fixed) + len(texts)
    rec["id_len"] = 8
    rec["id"] = np.asarray(ids, dtype=np.int64)
    for i, name in enumerate(fixed):
        rec[f"c{i}_len"] = np.dtype(fields[3 + 2 * i + 1][1]).itemsize
        rec[f"c{i}"] = np.asarray(cols[name])
    rec["v_len"] = 4 + 4 * d
    rec["v_dim"] = d
    rec["v"] = np.asarray(vectors, dtype=np.float32)
    if not texts:
        return COPY_SIGNATURE + rec.tobytes() + COPY_TRAILER
    raw = memoryview(rec.tobytes())
    size = rec.dtype.itemsize
    null = struct.pack("!i", -1)
    text_values = [cols[name] for name in texts]
    parts: list[bytes | memoryview] = [COPY_SIGNATURE]
    for r in range(n):
        parts.append(raw[r * size : (r + 1) * size])
        for values in text_values:
            v = values[r]
            if v is None:
                parts.append(null)
            else:
                b = str(v).encode()
                parts.append(struct.pack("!i", len(b)))
                parts.append(b)
    parts.append(COPY_TRAILER)
    return b"".join(parts)


def column_order(columns: Mapping[str, Column] | None, vector_column: str) -> list[str]:
    """The COPY column list matching encode_copy_binary's row layout (after the id)."""
    cols = dict(columns or {})
    fixed = [k for k, v in cols.items() if column_type(v) != "text"]
    texts = [k for k, v in cols.items() if column_type(v) == "text"]
    return [*fixed, vector_column, *texts]


@dataclass
class CopyResult:
    table: str
    rows: int
    seconds: float  # the COPY statement alone (encoding is off the clock)
    rows_per_s: float
    mib: float
    mib_per_s: float
    encode_s: float
    table_mib: float
    format: str = "binary"


def copy_rows(conn: Any, sql: str, payload: bytes) -> float:
    """Stream payload through COPY ... FROM STDIN in 1 MiB writes; seconds taken."""
    import psycopg

    view = memoryview(payload)
    t0 = time.perf_counter()
    try:
        with conn.cursor() as cur, cur.copy(sql) as cp:
            for off in range(0, len(view), COPY_CHUNK):
                cp.write(view[off : off + COPY_CHUNK])
    except psycopg.Error as exc:
        raise PgRefError(f"{sql}: {exc}") from exc
    return time.perf_counter() - t0


def load_table(
    pg: PgServer,
    ids: np.ndarray,
    vectors: np.ndarray,
    columns: Mapping[str, Column] | None = None,
    *,
    table: str = "items",
    vector_column: str = "embedding",
) -> CopyResult:
    """CREATE TABLE table (id bigint PRIMARY KEY, embedding vector(d), <columns>) and COPY
    every row in (one transaction, committed with fsync). Re-creates the table."""
    t, vc = ident(table), ident(vector_column)
    d = int(vectors.shape[1])
    cols = dict(columns or {})
    defs = [f"{ident(k)} {column_type(v)}" for k, v in cols.items()]
    t0 = time.perf_counter()
    payload = encode_copy_binary(ids, vectors, cols)
    encode_s = time.perf_counter() - t0
    names = ", ".join(["id", *column_order(cols, vc)])
    with pg.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {t}")
        conn.execute(
            f"CREATE TABLE {t} (id bigint PRIMARY KEY, {vc} vector({d}){''.join(', ' + x for x in defs)})"
        )
        seconds = copy_rows(conn, f"COPY {t} ({names}) FROM STDIN (FORMAT binary)", payload)
        conn.execute(f"ANALYZE {t}")
        size = conn.execute(f"SELECT pg_table_size('{t}')").fetchone()[0]
    n = int(vectors.shape[0])
    return CopyResult(
        table=t,
        rows=n,
        seconds=seconds,
        rows_per_s=n / seconds,
        mib=len(payload) / 2**20,
        mib_per_s=len(payload) / 2**20 / seconds,
        encode_s=encode_s,
        table_mib=size / 2**20,
    )


def load_queries(pg: PgServer, queries: np.ndarray, *, table: str = "queries") -> CopyResult:
    """The query vectors as table (qid int PRIMARY KEY, v vector(d)), qid = row number: the
    pgbench script then only picks a random qid."""
    t = ident(table)
    d = int(queries.shape[1])
    payload = encode_copy_binary(np.arange(len(queries)), queries)
    with pg.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {t}")
        conn.execute(f"CREATE TABLE {t} (qid bigint PRIMARY KEY, v vector({d}))")
        seconds = copy_rows(conn, f"COPY {t} (qid, v) FROM STDIN (FORMAT binary)", payload)
        conn.execute(f"ANALYZE {t}")
        size = conn.execute(f"SELECT pg_table_size('{t}')").fetchone()[0]
    n = len(queries)
    return CopyResult(t, n, seconds, n / seconds, len(payload) / 2**20, 0.0, 0.0, size / 2**20)


@dataclass
class IndexBuild:
    name: str
    kind: str  # "hnsw" or "btree"
    column: str
    seconds: float
    mib: float
    params: dict[str, Any] = field(default_factory=dict)


def build_hnsw(
    pg: PgServer,
    *,
    table: str = "items",
    column: str = "embedding",
    metric: str = "ip",
    m: int = 16,
    ef_construction: int = 64,
) -> IndexBuild:
    """CREATE INDEX ... USING hnsw (column <opclass>) WITH (m, ef_construction), timed; the
    build uses max_parallel_maintenance_workers (PostgreSQL's default 2) beside the leader."""
    opclass, _ = METRICS[metric]
    t, c = ident(table), ident(column)
    name = f"{t}_{c}_hnsw"
    with pg.connect() as conn:
        conn.execute(f"DROP INDEX IF EXISTS {name}")
        t0 = time.perf_counter()
        conn.execute(
            f"CREATE INDEX {name} ON {t} USING hnsw ({c} {opclass}) "
            f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)})"
        )
        seconds = time.perf_counter() - t0
        size = conn.execute(f"SELECT pg_relation_size('{name}')").fetchone()[0]
        workers = conn.execute("SHOW max_parallel_maintenance_workers").fetchone()[0]
    return IndexBuild(
        name,
        "hnsw",
        c,
        seconds,
        size / 2**20,
        {
            "metric": metric,
            "opclass": opclass,
            "m": m,
            "ef_construction": ef_construction,
            "max_parallel_maintenance_workers": int(workers),
        },
    )


def create_btree(pg: PgServer, column: str, *, table: str = "items") -> IndexBuild:
    t, c = ident(table), ident(column)
    name = f"{t}_{c}_btree"
    with pg.connect() as conn:
        t0 = time.perf_counter()
        conn.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {t} ({c})")
        seconds = time.perf_counter() - t0
        conn.execute(f"ANALYZE {t}")
        size = conn.execute(f"SELECT pg_relation_size('{name}')").fetchone()[0]
    return IndexBuild(name, "btree", c, seconds, size / 2**20)


def metadata_columns(metadata: Sequence[Mapping[str, Any]]) -> dict[str, Column]:
    """Metadata dicts → columns: numbers (all int, or float) stay numeric, anything else is
    text. A key `id` becomes `key` (the table's id is the row number)."""
    keys = list(dict.fromkeys(k for m in metadata for k in m))
    out: dict[str, Column] = {}
    for key in keys:
        vals = [m.get(key) for m in metadata]
        name = "key" if key == "id" else key
        ident(name)
        present = [v for v in vals if v is not None]
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in present)
        if present and ints and len(present) == len(vals):
            out[name] = np.asarray(vals, dtype=np.int64)
            continue
        if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
            out[name] = np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)
            continue
        out[name] = [None if v is None else str(v) for v in vals]
    return out
