#!/usr/bin/env python3
"""What one node costs, measured on this machine, for CAPACITY.md and the fan-out simulation.

    python scripts/measure_node.py latency   # search latency distribution of a real node
    python scripts/measure_node.py memory    # RSS per vector by index type, real nodes
    python scripts/measure_node.py faiss     # in-process FAISS: bytes and search time per vector

- latency: starts `aquila serve` on 127.0.0.1 (free port, fresh data dir), loads the
  committed sample tests/data/wordnet-sample (5,000 × 384) into a cosine ivf_flat collection,
  waits for training, then times searches one request at a time and from 4 concurrent
  clients (k=10, nprobe=16). Every latency is kept: scripts/simulate.py draws from them.
- memory: one node per index type; loads N1 then N2 seeded random vectors of dim 384 (and
  small metadata), waits for training, reads VmRSS after each: (RSS2 − RSS1)/(N2 − N1) is the
  memory one more vector costs (index, RocksDB, Python), the fixed part cancelling out. N1 and
  N2 sit between two retrainings (an index is retrained at 4× the size it was trained at:
  ~4K, ~16K, ~66K, ~262K vectors); RocksDB's memtables (bounded) add noise. Also the data
  directory's bytes per vector.
- faiss: the same index types built in-process on N random vectors: serialized bytes per
  vector and the time of one query (one thread, nprobe 16), to scale search cost per node.

Results go to scripts/out/node.json (and latency samples to scripts/out/latency.json).
Client and node share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from bench_common import COLLECTION, JSON_HEADERS, OPT_NP, REPO_ROOT, log, pct, temp_dir
from bench_data import Dataset, load_real
from bench_load import create_collection, run_workers, upload, upsert_bodies, wait_trained
from bench_node import Node, call, cpu_seconds_of, rss_mib_of, wait_ready

OUT = REPO_ROOT / "scripts" / "out"
SAMPLE = REPO_ROOT / "tests" / "data" / "wordnet-sample"
DIM = 384
TRAIN_MIN = 4096


def save(name: str, key: str, value: Any) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    data = orjson.loads(path.read_bytes()) if path.exists() else {}
    data[key] = value
    data.setdefault("commands", {})[key] = "python " + " ".join(sys.argv)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | OPT_NP))
    return path


# glibc keeps freed memory in its arenas, so RSS would lag behind what the node holds (an
# index retrained and freed, then its pages reused): small mmap and trim thresholds make RSS
# follow the live allocations.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072",
              "MALLOC_TRIM_THRESHOLD_": "131072"}


async def start(
    tmp: Path, name: str, session: aiohttp.ClientSession, env: dict[str, str] | None = None
) -> Node:
    node = Node(tmp / name, tmp / f"{name}.log",
                {"AQUILA_FSYNC": "false", "AQUILA_TRAIN_MIN": str(TRAIN_MIN), **(env or {})})
    (tmp / name).mkdir()
    node.start()
    await wait_ready(session, node, 120)
    return node


# --- latency ------------------------------------------------------------------------------


async def latency(args: argparse.Namespace) -> None:
    ds = load_real(SAMPLE, None, 200)
    async with aiohttp.ClientSession() as session:
        with temp_dir(False) as tmp:
            node = await start(tmp, "lat", session)
            try:
                await create_collection(session, node.base_url, {
                    "dim": ds.dim, "metric": "cosine", "shards": args.shards,
                    "index": {"type": "ivf_flat", "nprobe": 16}})
                await upload(session, [node.base_url], upsert_bodies(ds, 1000), 2, ds.n)
                await wait_trained(session, node, ds.n, TRAIN_MIN)
                url = f"{node.base_url}/v1/collections/{COLLECTION}/search"
                bodies = [orjson.dumps({"vector": q, "k": 10, "nprobe": 16}, option=OPT_NP)
                          for q in ds.queries]
                out: dict[str, Any] = {"node_vectors": ds.n, "shards": args.shards}
                for clients in (1, 4):
                    lat = await timed_searches(session, url, bodies, clients, args.queries)
                    out[f"clients_{clients}_ms"] = [round(x * 1000, 4) for x in lat]
                    log(f"{clients} client(s): p50 {pct(lat, 50) * 1000:.2f} ms, "
                        f"p99 {pct(lat, 99) * 1000:.2f} ms, max {max(lat) * 1000:.1f} ms")
                # Throughput and the node's CPU per search: what one sub-search costs a node
                # besides FAISS itself (which is ~0.05 ms on 5,000 vectors).
                cpu0, t0 = cpu_seconds_of(node.pid), time.perf_counter()
                await timed_searches(session, url, bodies, 16, args.queries)
                wall, cpu = time.perf_counter() - t0, cpu_seconds_of(node.pid) - cpu0
                total = args.queries + min(200, args.queries)  # with the warm-up
                out["clients_16_qps"] = round(total / wall)
                out["server_cpu_ms_per_search"] = round(cpu / total * 1000, 3)
                log(f"16 clients: {out['clients_16_qps']} q/s, node CPU "
                    f"{out['server_cpu_ms_per_search']} ms per search")
                out["fanout_overhead_ms_per_node"] = await request_cost(session, node)
                log(f"one more node asked costs {out['fanout_overhead_ms_per_node']} ms")
            finally:
                node.stop()
    path = save("latency.json", "latency", out)
    log(f"written to {path}")


async def timed_searches(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], clients: int, n: int
) -> list[float]:
    lat: list[float] = []

    async def one(i: int) -> None:
        t = time.perf_counter()
        async with session.post(url, data=bodies[i % len(bodies)], headers=JSON_HEADERS) as r:
            raw = await r.read()
            if r.status != 200:
                raise RuntimeError(f"search -> {r.status}: {raw[:200]!r}")
        lat.append(time.perf_counter() - t)

    await run_workers(clients, min(200, n), one)  # warm-up, not kept
    lat.clear()
    await run_workers(clients, n, one)
    return lat


async def request_cost(session: aiohttp.ClientSession, node: Node) -> float:
    """What asking one more node adds to a fan-out on the asking side: 100 concurrent
    GET /healthz from one event loop, the median over 20 rounds, per request (server side
    included, on the same cores; a floor for a real sub-search request)."""
    url = f"{node.base_url}/healthz"

    async def one() -> None:
        async with session.get(url) as r:
            await r.read()

    rounds = []
    for _ in range(20):
        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(100)))
        rounds.append((time.perf_counter() - t) / 100)
    return round(pct(rounds, 50) * 1000, 4)


# --- memory -------------------------------------------------------------------------------


def random_dataset(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, DIM), dtype=np.float32)
    meta = [{"pos": ("noun", "verb", "adj", "adv")[i % 4], "n": i} for i in range(n)]
    return Dataset("random", base, base[:1], np.zeros((1, 10), np.int64), meta, True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def memory(args: argparse.Namespace) -> None:
    n1, n2 = args.n1, args.n2
    ds = random_dataset(n2, seed=7)
    bodies = upsert_bodies(ds, 1000)
    first, rest = bodies[: n1 // 1000], bodies[n1 // 1000:]
    results: dict[str, Any] = {"n1": n1, "n2": n2, "dim": DIM, "types": {}}
    async with aiohttp.ClientSession() as session:
        with temp_dir(False) as tmp:
            for itype in args.types.split(","):
                node = await start(tmp, itype, session, MALLOC_ENV)
                try:
                    empty = rss_mib_of(node.pid)
                    await create_collection(session, node.base_url, {
                        "dim": DIM, "metric": "l2", "shards": 4, "index": {"type": itype}})
                    await upload(session, [node.base_url], first, 2, n1)
                    if itype != "flat":
                        await wait_trained(session, node, n1, TRAIN_MIN)
                    await asyncio.sleep(2.0)  # let snapshots and compactions settle
                    rss1 = rss_mib_of(node.pid)
                    await upload(session, [node.base_url], rest, 2, n2 - n1)
                    await wait_count(session, node, n2)
                    await asyncio.sleep(2.0)
                    rss2 = rss_mib_of(node.pid)
                    per = (rss2 - rss1) * 2**20 / (n2 - n1)
                    disk = dir_bytes(node.data_dir) / n2
                    results["types"][itype] = {
                        "rss_empty_mib": round(empty, 1), "rss_n1_mib": round(rss1, 1),
                        "rss_n2_mib": round(rss2, 1), "bytes_per_vector": round(per),
                        "disk_bytes_per_vector": round(disk)}
                    log(f"{itype}: {per:.0f} B/vector in RSS, {disk:.0f} B/vector on disk "
                        f"(RSS {empty:.0f} → {rss1:.0f} → {rss2:.0f} MiB)")
                finally:
                    node.stop()
    path = save("node.json", "memory", results)
    log(f"written to {path}")


async def wait_count(session: aiohttp.ClientSession, node: Node, n: int) -> None:
    url = f"{node.base_url}/v1/collections/{COLLECTION}"
    for _ in range(1200):
        desc = await call(session, "GET", url)
        if desc["count"] == n and all(s["index_state"] in ("trained", "buffering")
                                      for s in desc["shard_states"]):
            return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"count never reached {n}")


# --- in-process FAISS ---------------------------------------------------------------------


def faiss_costs(args: argparse.Namespace) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    n = args.n
    rng = np.random.default_rng(3)
    base = rng.standard_normal((n, DIM), dtype=np.float32)
    queries = rng.standard_normal((200, DIM), dtype=np.float32)
    nlist = int(round(4 * n**0.5))
    # Run one type per process (`--types ivf_pq`) for a clean RSS figure: memory another
    # index freed is reused. Types measured before are kept.
    path = OUT / "node.json"
    earlier = orjson.loads(path.read_bytes()).get(f"faiss_{n}", {}) if path.exists() else {}
    out: dict[str, Any] = {"n": n, "dim": DIM, "nlist": nlist, "nprobe": 16,
                           "types": earlier.get("types", {})}
    for itype in args.types.split(","):
        quantizer = faiss.IndexFlatL2(DIM)
        if itype == "flat":
            index: Any = faiss.IndexIDMap2(faiss.IndexFlatL2(DIM))  # as node/storage/index.py
        elif itype == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, DIM, nlist)
        elif itype == "ivf_sq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, DIM, nlist,
                                                  faiss.ScalarQuantizer.QT_8bit)
        else:
            index = faiss.IndexIVFPQ(quantizer, DIM, nlist, 48, 8)
        t0 = time.perf_counter()
        if not index.is_trained:
            # As the node trains (node/storage/index.py train_ivf): 10 k-means rounds, 64 points a
            # list, and no direct map (the node finds a label's list through its own map).
            index.cp.niter = 10
            index.train(base[: min(n, 64 * nlist)])
        before = rss_bytes()
        index.add_with_ids(base, np.arange(n, dtype=np.int64))
        added = rss_bytes() - before
        build = time.perf_counter() - t0
        if itype != "flat":
            index.nprobe = 16
        per_query = []
        for q in queries:
            t = time.perf_counter()
            index.search(q[None, :], 10)
            per_query.append(time.perf_counter() - t)
        size = len(faiss.serialize_index(index))
        out["types"][itype] = {
            "bytes_per_vector": round(size / n, 1),
            "rss_bytes_per_vector": round(added / n, 1),
            "query_ms_p50": round(pct(per_query, 50) * 1000, 3),
            "query_ms_p99": round(pct(per_query, 99) * 1000, 3),
            "build_s": round(build, 1),
        }
        log(f"{itype}: {size / n:.0f} B/vector serialized, {added / n:.0f} in RSS, one query {pct(per_query, 50) * 1000:.2f} ms "
            f"(p50, one thread, {n:,} vectors)")
    out["python_bytes_per_document"] = python_per_document(min(n, 200_000))
    log(f"per-document Python state (id, metadata): {out['python_bytes_per_document']} B")
    path = save("node.json", f"faiss_{n}", out)
    log(f"written to {path}")


def rss_bytes() -> int:
    return int(rss_mib_of(os.getpid()) * 2**20)


def python_per_document(n: int) -> dict[str, int]:
    """What a shard keeps in Python per document (node/storage/shard.py: labels label → id, meta
    label → metadata bytes), measured with tracemalloc for WordNet-like ids and metadata."""
    import tracemalloc

    from aquila.cluster.model.documents import json_bytes

    sample = [orjson.loads(line) for line in (SAMPLE / "base.jsonl").read_bytes().splitlines()]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    labels: dict[int, str] = {}
    meta: dict[int, bytes] = {}
    for i in range(n):
        row = sample[i % len(sample)]
        labels[i + 1] = f"{row['id']}-{i}"
        meta[i + 1] = json_bytes({"text": row["text"], "pos": row["pos"]})
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    metadata = sum(len(v) for v in meta.values()) / n
    return {"total": round(used / n), "of_which_metadata_bytes": round(metadata)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("latency")
    p.add_argument("--queries", type=int, default=3000)
    p.add_argument("--shards", type=int, default=8)
    p = sub.add_parser("memory")
    p.add_argument("--n1", type=int, default=80_000)
    p.add_argument("--n2", type=int, default=240_000)
    p.add_argument("--types", default="flat,ivf_flat,ivf_sq8,ivf_pq")
    p = sub.add_parser("faiss")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--types", default="flat,ivf_flat,ivf_sq8,ivf_pq")
    args = ap.parse_args()
    if args.what == "latency":
        asyncio.run(latency(args))
    elif args.what == "memory":
        asyncio.run(memory(args))
    else:
        faiss_costs(args)


if __name__ == "__main__":
    main()
