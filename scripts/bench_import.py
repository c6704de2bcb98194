#!/usr/bin/env python3
"""Bulk import: `aquila import` into one node beside PostgreSQL's COPY into pgvector, in the
same run on the same machine, fsync on for both.

The shared WordNet set is first written out as a user would have it: base.npy (float32),
ids.txt (one id a line) and metadata.jsonl ({"text", "pos"} a line). Then, `--repeat` times:

- pgvector: `scripts/pgref.py`'s private PostgreSQL; one binary COPY of id, vector, text and
  pos in one transaction (committed with fsync; the encoding of the COPY stream is off the
  clock, as pgref measures it);
- Aquila: a fresh `aquila serve` (fsync on, its default) and the command
  `aquila import wn base.npy --ids ids.txt --metadata metadata.jsonl --create --metric cosine`,
  timed from its start to its exit: reading the files, encoding, sending, and every document
  durable on the node (the summary's rate is the same figure). The index type is the
  collection's default, ivf_flat, unless `--index`: its training runs in the background while
  documents arrive, as it would for a user.

Each figure comes with the CPU seconds of each side and of everything else on the machine
(it is shared: what others take is the noise in the figure). Unless `--no-index-build`, each
side then also gets the time until an ANN index serves every row: pgvector's HNSW build
(m 16, ef_construction 64) after the COPY; Aquila's wait until every shard is "trained".

    scripts/bench_setup.sh                    # once: PostgreSQL with pgvector, its user
    python scripts/bench_import.py            # the whole set, one round
    python scripts/bench_import.py --repeat 3 --index flat
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from bench_common import REPO_ROOT, log, temp_dir
from bench_data import DEFAULT_DATA, missing_data_message
from bench_proc import machine_busy_s, run_measured, tree_cpu_s

HOST = "127.0.0.1"


def default_data() -> Path:
    """The shared set beside the repository, or beside a folder above it (a git worktree)."""
    for parent in REPO_ROOT.parents:
        candidate = parent / "shared" / "data" / "wordnet-minilm-384"
        if (candidate / "base.f16.npy").is_file():
            return candidate
    return DEFAULT_DATA


@dataclass
class Files:
    npy: Path
    ids: Path
    metadata: Path
    rows: int
    vectors: np.ndarray
    meta: list[dict[str, Any]]


def user_files(data: Path, out: Path, limit: int | None) -> Files:
    """The set as a user would hand it to `aquila import`."""
    base = np.load(data / "base.f16.npy", mmap_mode="r")
    n = base.shape[0] if limit is None else min(limit, base.shape[0])
    vectors = np.ascontiguousarray(base[:n], dtype=np.float32)
    meta: list[dict[str, Any]] = []
    with (data / "base.jsonl").open("rb") as f:
        for line in f:
            if len(meta) >= n:
                break
            meta.append(orjson.loads(line))
    files = Files(out / "base.npy", out / "ids.txt", out / "metadata.jsonl", n, vectors,
                  [{"text": m["text"], "pos": m["pos"]} for m in meta])
    np.save(files.npy, vectors)
    files.ids.write_text("".join(m["id"] + "\n" for m in meta))
    files.metadata.write_bytes(b"".join(orjson.dumps(m) + b"\n" for m in files.meta))
    return files


@dataclass
class Point:
    system: str
    rows: int
    seconds: float
    rows_per_s: float
    own_cpu_s: float  # the server's (and, for Aquila, the import command's) CPU seconds
    others_cpu_s: float  # every other process on the machine meanwhile
    note: str = ""
    # From the start of the load until an ANN index serves every row (pgvector: COPY then
    # CREATE INDEX ... USING hnsw; Aquila: the import, then every shard "trained"); 0: not run.
    indexed_s: float = 0.0


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as tcp:
            tcp.bind((HOST, 0))
            port = int(tcp.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind((HOST, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free TCP+UDP port")


def get_json(url: str, timeout: float = 10.0) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def aquila_point(files: Files, work: Path, args: argparse.Namespace, round_: int) -> Point:
    data = work / f"node{round_}"
    port = free_port()
    exe = Path(sys.executable).with_name("aquila")
    aquila = [str(exe)] if exe.exists() else [sys.executable, "-m", "aquila.node"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUILA_")}
    log_file = (work / f"node{round_}.log").open("wb")
    node = subprocess.Popen([*aquila, "serve", "--host", HOST, "--port", str(port), "--data",
                             str(data)], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    log_file.close()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                get_json(f"http://{HOST}:{port}/readyz", 2)
                break
            except OSError:
                if time.monotonic() > deadline or node.poll() is not None:
                    raise RuntimeError("the node did not become ready") from None
                time.sleep(0.05)
        cmd = [*aquila, "import", "wn", str(files.npy), "--ids", str(files.ids), "--metadata",
               str(files.metadata), "--node", f"{HOST}:{port}", "--create", "--metric",
               "cosine", "--batch", str(args.batch), "--concurrency", str(args.concurrency),
               "--progress", "none", "--state", str(work / f"import{round_}.state")]
        if args.index:
            cmd += ["--index", args.index]
        cpu0, busy0 = tree_cpu_s(node.pid), machine_busy_s()
        run = run_measured(cmd, timeout_s=3600, env=env, cwd=work, out_dir=work,
                           name=f"import{round_}")
        server_cpu, busy = tree_cpu_s(node.pid) - cpu0, machine_busy_s() - busy0
        if run.returncode != 0:
            raise RuntimeError(f"aquila import failed: {run.stderr[-2000:]}")
        count = get_json(f"http://{HOST}:{port}/v1/collections/wn")["count"]
        if count != files.rows:
            raise RuntimeError(f"the node holds {count} documents, not {files.rows}")
        said = re.search(r"\(([\d,]+) docs/s\)", run.stdout)
        own = server_cpu + run.cpu_s
        point = Point("aquila import", files.rows, run.seconds, files.rows / run.seconds, own,
                      max(0.0, busy - own),
                      f"index {args.index or 'ivf_flat'}; the command said "
                      f"{said.group(1) if said else '?'} docs/s; CPU per document: node "
                      f"{server_cpu / files.rows * 1e6:.0f} µs, import command "
                      f"{run.cpu_s / files.rows * 1e6:.0f} µs")
        if args.index_build:
            t0 = time.monotonic()
            while True:
                desc = get_json(f"http://{HOST}:{port}/v1/collections/wn")
                if {st["index_state"] for st in desc["shard_states"]} == {"trained"}:
                    break
                if time.monotonic() - t0 > 3600:
                    raise RuntimeError("the index did not train within an hour")
                time.sleep(0.25)
            point.indexed_s = run.seconds + time.monotonic() - t0
        return point
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(120)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()


def pgvector_point(files: Files, index_build: bool) -> Point:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from pgref import PgServer, build_hnsw, load_table, metadata_columns

    columns = metadata_columns(files.meta)
    with PgServer() as pg:
        cpu0, busy0 = tree_cpu_s(pg.pid), machine_busy_s()
        t0 = time.perf_counter()
        res = load_table(pg, np.arange(files.rows, dtype=np.int64), files.vectors, columns)
        wall = time.perf_counter() - t0
        pg_cpu, busy = tree_cpu_s(pg.pid) - cpu0, machine_busy_s() - busy0
        # The set is L2-normalised: inner product is cosine.
        hnsw = build_hnsw(pg, metric="ip") if index_build else None
    # load_table's own process encodes the stream (off COPY's clock) and drives psycopg.
    point = Point("pgvector COPY", res.rows, res.seconds, res.rows_per_s, pg_cpu,
                  max(0.0, busy - pg_cpu - wall),
                  f"binary COPY of {res.mib:.0f} MiB ({res.mib_per_s:.0f} MiB/s), one "
                  f"transaction; encoding {res.encode_s:.1f} s off the clock")
    if hnsw is not None:
        point.indexed_s = res.seconds + hnsw.seconds
        point.note += f"; HNSW (m 16, ef_construction 64) {hnsw.seconds:.1f} s"
    return point


def table(points: list[Point]) -> str:
    rows = [["system", "rows", "seconds", "rows/s", "own CPU s", "others' CPU s",
             "with an ANN index: s", "rows/s", ""]]
    for p in points:
        indexed = [f"{p.indexed_s:.1f}", f"{p.rows / p.indexed_s:,.0f}"] if p.indexed_s \
            else ["-", "-"]
        rows.append([p.system, f"{p.rows:,}", f"{p.seconds:.2f}", f"{p.rows_per_s:,.0f}",
                     f"{p.own_cpu_s:.1f}", f"{p.others_cpu_s:.1f}", *indexed, p.note])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=default_data(),
                   help="the WordNet set's folder (default: shared/data beside the repository)")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--index", choices=("ivf_flat", "ivf_sq8", "ivf_pq", "flat"),
                   help="the collection's index type (default: the collection default)")
    p.add_argument("--batch", type=int, default=2000, help="aquila import --batch (2000)")
    p.add_argument("--concurrency", type=int, default=4, help="aquila import --concurrency")
    p.add_argument("--repeat", type=int, default=1, help="rounds, alternating the two (1)")
    p.add_argument("--no-pgvector", action="store_true", help="Aquila alone")
    p.add_argument("--no-index-build", dest="index_build", action="store_false",
                   help="skip the time until an ANN index serves every row (pgvector's HNSW "
                        "build, Aquila's training)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    args = p.parse_args(argv)
    if not (args.data / "base.f16.npy").is_file():
        print(missing_data_message(args.data), file=sys.stderr)
        return 2
    points: list[Point] = []
    with temp_dir(args.keep) as work:
        t0 = time.perf_counter()
        files = user_files(args.data, work, args.limit)
        log(f"wrote base.npy, ids.txt, metadata.jsonl: {files.rows:,} rows "
            f"({time.perf_counter() - t0:.1f} s)")
        for r in range(args.repeat):
            if not args.no_pgvector:
                points.append(pgvector_point(files, args.index_build))
                log(f"round {r + 1}: pgvector COPY {points[-1].rows_per_s:,.0f} rows/s")
            points.append(aquila_point(files, work, args, r))
            log(f"round {r + 1}: aquila import {points[-1].rows_per_s:,.0f} rows/s")
    print(table(points))
    by: dict[str, list[float]] = {}
    for pt in points:
        by.setdefault(pt.system, []).append(pt.rows_per_s)
    medians = {k: statistics.median(v) for k, v in by.items()}
    print("\nmedian rows/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in medians.items()))
    if "pgvector COPY" in medians:
        print(f"aquila import / pgvector COPY: "
              f"{medians['aquila import'] / medians['pgvector COPY']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps([asdict(pt) for pt in points], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
