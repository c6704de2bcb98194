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
    python scripts/bench.py --cluster 3 --limit 50000      # 1 vs 3 nodes (bench_cluster.py)
    python scripts/bench.py --rebalance --limit 50000      # 3 → 4 nodes under search load
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import faiss
import numpy as np
import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cluster.sharding import shard_of  # noqa: E402  (needs the repo on sys.path)

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wordnet-minilm-384"
HOST = "127.0.0.1"
COLLECTION = "bench"
K = 10

READY_TIMEOUT_S = 180.0
TRAIN_TIMEOUT_S = 1800.0
STOP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0
POLL_S = 0.05
TRAIN_POLL_S = 0.25

T = TypeVar("T")
OPT_NP = orjson.OPT_SERIALIZE_NUMPY


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    base: np.ndarray  # n × d float32 (as stored; the node normalises for cosine)
    queries: np.ndarray  # nq × d float32
    gt: np.ndarray  # nq × K int64: row numbers into base (document id = str(row))
    metadata: list[dict[str, Any]]
    synthetic: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.base.shape[0])

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(x / norms)


def exact_topk(base_n: np.ndarray, queries_n: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k over unit vectors (= cosine) with FAISS flat."""
    index = faiss.IndexFlatIP(base_n.shape[1])
    index.add(base_n)
    _, ids = index.search(queries_n, k)
    return ids.astype(np.int64)


def missing_data_message(path: Path) -> str:
    return (
        f"dataset not found at {path}\n"
        "It is the wordnet-minilm-384 set (base.f16.npy 107,659×384, query.f16.npy 10,000×384,\n"
        "gt_I.npy, base.jsonl, query.jsonl). Either:\n"
        f"  * copy that directory to {DEFAULT_DATA} (the default), or pass --data DIR\n"
        "    pointing at a copy of it; or\n"
        "  * run on synthetic data instead: --synthetic N (seeded clustered vectors, ground\n"
        "    truth computed with FAISS flat; the figures are then synthetic), e.g.\n"
        "    python scripts/bench.py --synthetic 100000"
    )


def load_real(path: Path, n_limit: int | None, nq: int) -> Dataset:
    t0 = time.perf_counter()
    base16 = np.load(path / "base.f16.npy", mmap_mode="r")
    n_all = int(base16.shape[0])
    n = n_all if n_limit is None else min(n_limit, n_all)
    base = np.ascontiguousarray(base16[:n], dtype=np.float32)
    q16 = np.load(path / "query.f16.npy", mmap_mode="r")
    if nq > q16.shape[0]:
        raise SystemExit(f"--queries {nq} exceeds the {q16.shape[0]} queries of the dataset")
    queries = np.ascontiguousarray(q16[:nq], dtype=np.float32)
    notes: list[str] = []
    if n == n_all:
        gt = np.load(path / "gt_I.npy", mmap_mode="r")[:nq, :K].astype(np.int64)
        # Sanity: the shipped ground truth is cosine top-10 of the f16 vectors.
        m = min(100, nq)
        check = exact_topk(normalise(base), normalise(queries[:m]), K)
        agree = float(
            np.mean([len(set(a) & set(b)) / K for a, b in zip(check, gt[:m], strict=True)])
        )
        notes.append(f"gt_I[:, :10] agrees with exact cosine top-10 on {m} queries: {agree:.4f}")
    else:
        gt = exact_topk(normalise(base), normalise(queries), K)
        notes.append(f"subset of {n} base vectors: ground truth recomputed with FAISS flat (IP)")
    metadata: list[dict[str, Any]] = []
    with open(path / "base.jsonl", "rb") as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            metadata.append(orjson.loads(line))
    if len(metadata) != n:
        raise SystemExit(f"base.jsonl has {len(metadata)} lines, expected at least {n}")
    log(
        f"loaded {path.name}: {n}×{base.shape[1]} base, {nq} queries ({time.perf_counter() - t0:.1f}s)"
    )
    return Dataset(path.name, base, queries, gt, metadata, False, notes)


def make_synthetic(n: int, nq: int, dim: int, seed: int) -> Dataset:
    """Seeded clustered vectors: Gaussian blobs around random centres, queries drawn the same
    way; ground truth with FAISS flat on the normalised vectors (cosine)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(8, int(math.sqrt(n)))
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    spread = 0.6

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        c = rng.integers(0, n_clusters, count)
        x = centres[c] + spread * rng.standard_normal((count, dim)).astype(np.float32)
        return normalise(x), c

    base, cl = draw(n)
    queries, _ = draw(nq)
    gt = exact_topk(base, queries, K)
    metadata = [{"cluster": int(c), "row": i} for i, c in enumerate(cl)]
    log(
        f"generated synthetic data: {n}×{dim} base, {nq} queries, {n_clusters} clusters (seed {seed})"
    )
    return Dataset(
        f"synthetic-{n}x{dim}-seed{seed}",
        base,
        queries,
        gt,
        metadata,
        True,
        ["SYNTHETIC data: figures do not describe a real embedding set"],
    )


def recall_at_k(found: list[list[int]] | np.ndarray, gt: np.ndarray, k: int = K) -> float:
    total = 0
    for row, truth in zip(found, gt, strict=True):
        total += len(set(int(x) for x in list(row)[:k]) & set(int(t) for t in truth[:k]))
    return total / (k * len(gt))


# ---------------------------------------------------------------------------------------
# The node subprocess
# ---------------------------------------------------------------------------------------
def free_port() -> int:
    """A port free on 127.0.0.1 for both TCP (HTTP) and UDP (gossip)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((HOST, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free TCP+UDP port on 127.0.0.1")


def aquila_command() -> list[str]:
    exe = Path(sys.executable).with_name("aquila")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("aquila")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from node.cli import main; sys.exit(main())"]


def cpu_seconds_of(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mib_of(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Node:
    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        env_overrides: dict[str, str],
        host: str = HOST,
        port: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.host = host
        self.port = port if port is not None else free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AQUILA_")}
        self.env.update(env_overrides)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        cmd = [
            *aquila_command(),
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--data",
            str(self.data_dir),
        ]
        with self.log_path.open("ab") as out:
            out.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=str(self.data_dir.parent),
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Graceful stop, then SIGKILL when it does not go in time. Idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def trained_nlists(self) -> dict[int, tuple[int, int]]:
        """{0: (nlist, vectors trained on)} of the node's last training, from its log. The
        node keeps one index per collection over all its local shards."""
        text = self.log_path.read_text(errors="replace")
        on = -1
        out: dict[int, tuple[int, int]] = {}
        for m in re.finditer(
            rf"{COLLECTION}: (?:training on (\d+) vectors|trained \(nlist=(\d+)\))", text
        ):
            if m.group(1) is not None:
                on = int(m.group(1))
            else:
                out[0] = (int(m.group(2)), on)
        return out


class NodeFailed(RuntimeError):
    pass


async def wait_ready(session: aiohttp.ClientSession, node: Node, limit_s: float) -> float:
    """Poll /readyz until 200; seconds waited. Fails fast if the process exits."""
    t0 = time.perf_counter()
    deadline = t0 + limit_s
    while True:
        if not node.alive():
            raise NodeFailed(
                f"aquila exited with {node.proc and node.proc.returncode}:\n{node.log_tail()}"
            )
        try:
            async with session.get(
                f"{node.base_url}/readyz", timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                await r.read()
                if r.status == 200:
                    return time.perf_counter() - t0
        except (TimeoutError, aiohttp.ClientError):
            pass
        if time.perf_counter() > deadline:
            raise NodeFailed(f"/readyz not 200 within {limit_s:.0f}s:\n{node.log_tail()}")
        await asyncio.sleep(POLL_S)


# ---------------------------------------------------------------------------------------
# REST helpers
# ---------------------------------------------------------------------------------------
JSON_HEADERS = {"Content-Type": "application/json"}


async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: bytes | None = None
) -> Any:
    async with session.request(method, url, data=body, headers=JSON_HEADERS) as r:
        raw = await r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {url} -> {r.status}: {raw[:500]!r}")
        return orjson.loads(raw)


async def run_workers(n_workers: int, items: int, work: Callable[[int], Awaitable[None]]) -> None:
    """Run work(0..items-1) with n_workers concurrent workers pulling from one counter."""
    counter = iter(range(items))

    async def worker() -> None:
        for i in counter:
            await work(i)

    await asyncio.gather(*(worker() for _ in range(n_workers)))


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p)) if values else float("nan")


async def ingest(
    session: aiohttp.ClientSession, node: Node, ds: Dataset, batch: int, uploaders: int
) -> dict[str, Any]:
    url = f"{node.base_url}/v1/collections/{COLLECTION}/documents"
    t0 = time.perf_counter()
    bodies: list[bytes] = []
    for start in range(0, ds.n, batch):
        docs = [
            {"id": str(i), "vector": ds.base[i], "metadata": ds.metadata[i]}
            for i in range(start, min(start + batch, ds.n))
        ]
        bodies.append(orjson.dumps({"documents": docs}, option=OPT_NP))
    encode_s = time.perf_counter() - t0
    total_bytes = sum(len(b) for b in bodies)
    log(
        f"ingest: {len(bodies)} bodies of ≤{batch} docs encoded in {encode_s:.1f}s "
        f"({total_bytes / 2**20:.0f} MiB; off the clock)"
    )
    latencies: list[float] = []
    upserted = 0
    cpu0 = cpu_seconds_of(node.pid)
    me0 = time.process_time()

    async def one(i: int) -> None:
        nonlocal upserted
        t = time.perf_counter()
        reply = await call(session, "POST", url, bodies[i])
        latencies.append(time.perf_counter() - t)
        upserted += int(reply["upserted"])
        done = upserted
        if done % (batch * 20) == 0 or done == ds.n:
            log(f"  ingested {done}/{ds.n}")

    t1 = time.perf_counter()
    await run_workers(uploaders, len(bodies), one)
    wall = time.perf_counter() - t1
    if upserted != ds.n:
        raise RuntimeError(f"upserted {upserted}, expected {ds.n}")
    return {
        "documents": ds.n,
        "batch": batch,
        "uploaders": uploaders,
        "seconds": wall,
        "docs_per_s": ds.n / wall,
        "mib_per_s": total_bytes / 2**20 / wall,
        "batch_latency_p50_s": pct(latencies, 50),
        "batch_latency_p99_s": pct(latencies, 99),
        "server_cpu_s": cpu_seconds_of(node.pid) - cpu0,
        "client_cpu_s": time.process_time() - me0,
        "client_encode_s_off_clock": encode_s,
        "fsync": True,
    }


async def wait_trained(
    session: aiohttp.ClientSession, node: Node, n: int, train_min: int
) -> dict[str, Any]:
    url = f"{node.base_url}/v1/collections/{COLLECTION}"
    t0 = time.perf_counter()
    deadline = t0 + TRAIN_TIMEOUT_S
    last: dict[str, Any] = {}
    last_log = 0.0
    while True:
        desc = await call(session, "GET", url)
        states = [s["index_state"] for s in desc["shard_states"]]
        counts = [s["count"] for s in desc["shard_states"]]
        last = {"count": desc["count"], "states": states, "shard_counts": counts}
        if desc["count"] == n and all(s == "trained" for s in states):
            break
        never = [
            s["shard"]
            for s in desc["shard_states"]
            if s["index_state"] == "buffering" and s["count"] < train_min
        ]
        if desc["count"] == n and never:
            raise RuntimeError(
                f"shards {never} hold fewer than train_min={train_min} vectors and will never "
                f"train (counts {counts}); use more data, fewer --shards or a lower --train-min"
            )
        now = time.perf_counter()
        if now - last_log > 10:
            log(f"  waiting for training: {Counter(states)}")
            last_log = now
        if now > deadline:
            raise RuntimeError(f"shards not trained within {TRAIN_TIMEOUT_S:.0f}s: {last}")
        await asyncio.sleep(TRAIN_POLL_S)
    return {"seconds_after_ingest": time.perf_counter() - t0, **last}


@dataclass
class PointResult:
    nprobe: int
    concurrency: int
    queries: int
    seconds: float
    qps: float
    recall: float
    lat_p50_ms: float
    lat_p95_ms: float
    lat_p99_ms: float
    server_cpu_s: float
    client_cpu_s: float
    server_took_ms_p50: float


async def search_point(
    session: aiohttp.ClientSession,
    node: Node,
    ds: Dataset,
    nprobe: int,
    concurrency: int,
    n_queries: int,
    warmup: int,
) -> PointResult:
    url = f"{node.base_url}/v1/collections/{COLLECTION}/search"
    bodies = [
        orjson.dumps({"vector": ds.queries[i], "k": K, "nprobe": nprobe}, option=OPT_NP)
        for i in range(n_queries)
    ]
    found: list[list[int]] = [[] for _ in range(n_queries)]
    lat: list[float] = []
    took: list[float] = []

    async def one(i: int, record: bool) -> None:
        t = time.perf_counter()
        async with session.post(url, data=bodies[i], headers=JSON_HEADERS) as r:
            raw = await r.read()
            if r.status != 200:
                raise RuntimeError(f"search -> {r.status}: {raw[:300]!r}")
        if record:
            lat.append(time.perf_counter() - t)
            reply = orjson.loads(raw)
            took.append(float(reply["took_ms"]))
            found[i] = [int(h["id"]) for h in reply["results"][0]]

    await run_workers(concurrency, min(warmup, n_queries), lambda i: one(i, False))
    cpu0, me0 = cpu_seconds_of(node.pid), time.process_time()
    t0 = time.perf_counter()
    await run_workers(concurrency, n_queries, lambda i: one(i, True))
    wall = time.perf_counter() - t0
    return PointResult(
        nprobe=nprobe,
        concurrency=concurrency,
        queries=n_queries,
        seconds=wall,
        qps=n_queries / wall,
        recall=recall_at_k(found, ds.gt[:n_queries]),
        lat_p50_ms=pct(lat, 50) * 1000,
        lat_p95_ms=pct(lat, 95) * 1000,
        lat_p99_ms=pct(lat, 99) * 1000,
        server_cpu_s=cpu_seconds_of(node.pid) - cpu0,
        client_cpu_s=time.process_time() - me0,
        server_took_ms_p50=pct(took, 50),
    )


async def one_search_ok(session: aiohttp.ClientSession, node: Node, ds: Dataset) -> None:
    body = orjson.dumps({"vector": ds.queries[0], "k": K}, option=OPT_NP)
    reply = await call(session, "POST", f"{node.base_url}/v1/collections/{COLLECTION}/search", body)
    if not reply["results"] or not reply["results"][0]:
        raise RuntimeError(f"search after restart returned nothing: {reply}")


# ---------------------------------------------------------------------------------------
# Profiling the server with py-spy during a c=max run
# ---------------------------------------------------------------------------------------
# Leaves that mean "waiting", which py-spy may not recognise as idle inside containers.
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py:81)",)
LOOP_LEAF = "Runner.run (asyncio/runners.py:118)"


def thread_cpu_of(pid: int) -> dict[int, float]:
    """CPU seconds of every thread (native tid) of a process, from /proc."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = (task / "stat").read_text()
                f = raw[raw.rindex(")") + 2 :].split()
                out[int(task.name)] = (int(f[11]) + int(f[12])) / tick
    return out


def summarise_collapsed(path: Path, top: int = 20) -> dict[str, Any]:
    """Top frames (self and inclusive, idle waits left out) overall and for the event-loop
    thread, from py-spy's raw (collapsed) output recorded with --threads."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    main_self: Counter[str] = Counter()
    thread_busy: Counter[str] = Counter()
    tids: dict[int, str] = {}
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        m = re.match(r"thread \((\w+)\): ?(.*)", frames[0])
        thread = frames[0]
        if m:
            thread = m.group(2) or m.group(1)
            with contextlib.suppress(ValueError):
                tids[int(m.group(1))] = thread
            frames = frames[1:]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        if leaf in IDLE_LEAVES:
            idle += count
            continue
        if leaf == LOOP_LEAF:
            leaf = "<event loop in uvloop (C): epoll wait, socket I/O, callbacks>"
        thread_busy[thread] += count
        self_c[leaf] += count
        if thread == "MainThread":
            main_self[leaf] += count
        for f in set(frames):
            incl_c[f] += count

    busy = max(1, total - idle)

    def fmt(c: Counter[str], of: int) -> list[dict[str, Any]]:
        return [
            {"frame": f, "samples": n, "pct": round(100 * n / max(1, of), 1)}
            for f, n in c.most_common(top)
        ]

    return {
        "samples": total,
        "idle_samples_left_out": idle,
        "self": fmt(self_c, busy),
        "inclusive": fmt(incl_c, busy),
        "main_thread_self": fmt(main_self, sum(main_self.values())),
        "threads": fmt(thread_busy, busy),
        "tids": tids,
    }


# ---------------------------------------------------------------------------------------
# FAISS in process
# ---------------------------------------------------------------------------------------
def _single_threaded_faiss() -> None:
    """Each worker thread runs FAISS single-threaded (like the node's search pool)."""
    faiss.omp_set_num_threads(1)


def train_ivf(x: np.ndarray, nlist: int, seed: int = 0) -> faiss.IndexIVFFlat:
    d = x.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 5
    index.cp.seed = seed
    sample = x
    if x.shape[0] > 256 * nlist:
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(x.shape[0], 256 * nlist, replace=False)]
    index.train(sample)
    index.add(x)
    return index


class Searcher:
    """One IVF index, or several (shards) whose answers are merged like the node does."""

    def __init__(self, name: str, parts: list[tuple[faiss.IndexIVFFlat, np.ndarray]]) -> None:
        self.name = name
        self.parts = parts  # (index, global row ids of its vectors)

    @property
    def nlists(self) -> list[int]:
        return [int(ix.nlist) for ix, _ in self.parts]

    def search(self, q: np.ndarray, nprobe: int) -> np.ndarray:
        if len(self.parts) == 1:
            index, ids = self.parts[0]
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, index.nlist))
            _, lab = index.search(q, K, params=params)
            return np.where(lab >= 0, ids[np.maximum(lab, 0)], -1)
        ds, ls = [], []
        for index, ids in self.parts:
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, index.nlist))
            d, lab = index.search(q, K, params=params)
            ds.append(np.where(lab >= 0, d, -np.inf))
            ls.append(np.where(lab >= 0, ids[np.maximum(lab, 0)], -1))
        d_all = np.hstack(ds)
        l_all = np.hstack(ls)
        order = np.argsort(-d_all, axis=1, kind="stable")[:, :K]
        return np.take_along_axis(l_all, order, axis=1)


def build_searchers(
    ds: Dataset, shards: int, node_nlists: dict[int, tuple[int, int]]
) -> tuple[list[Searcher], dict[str, Any]]:
    xb = normalise(ds.base)
    info: dict[str, Any] = {}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    out: list[Searcher] = []

    nlist = max(1, int(round(4 * math.sqrt(ds.n))))
    t0 = time.perf_counter()
    single = train_ivf(xb, nlist)
    info["single"] = {"nlist": nlist, "train_add_s": time.perf_counter() - t0}
    log(f"FAISS single IVFFlat nlist={nlist} built in {info['single']['train_add_s']:.1f}s")
    out.append(Searcher(f"FAISS 1×IVF{nlist}", [(single, np.arange(ds.n, dtype=np.int64))]))

    owner = np.fromiter((shard_of(str(i), shards) for i in range(ds.n)), np.int64, ds.n)
    rows = [np.flatnonzero(owner == s) for s in range(shards)]
    t0 = time.perf_counter()
    parts = []
    for r in rows:
        nl = max(1, min(int(round(4 * math.sqrt(len(r)))), len(r) // 8))
        parts.append((train_ivf(xb[r], nl), r.astype(np.int64)))
    per = Searcher(f"FAISS {shards}×IVF~{parts[0][0].nlist} merged", parts)
    info["per_shard"] = {"nlists": per.nlists, "train_add_s": time.perf_counter() - t0}
    log(
        f"FAISS per-shard {shards}×IVF nlists={per.nlists} built in {info['per_shard']['train_add_s']:.1f}s"
    )
    out.append(per)

    # The node trains one index over its local shards when they reach train_min vectors, and
    # again only after 4× growth: its nlist may be smaller than 4·√n and trained on a prefix.
    if 0 in node_nlists and node_nlists[0][0] != nlist:
        nl, trained_on = node_nlists[0]
        t0 = time.perf_counter()
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(ds.dim), ds.dim, nl, faiss.METRIC_INNER_PRODUCT)
        idx.cp.min_points_per_centroid = 5
        prefix = xb[: trained_on if 0 < trained_on <= ds.n else ds.n]
        idx.train(prefix[: 256 * nl] if len(prefix) > 256 * nl else prefix)
        idx.add(xb)
        info["node_like"] = {"nlist": nl, "trained_on": trained_on,
                             "train_add_s": time.perf_counter() - t0}
        log(f"FAISS node-like 1×IVF{nl} (trained on {trained_on}) built")
        out.append(Searcher(f"FAISS 1×IVF{nl} (node's nlist)",
                            [(idx, np.arange(ds.n, dtype=np.int64))]))
    return out, info


def faiss_points(
    searcher: Searcher, ds: Dataset, nprobes: list[int], n_queries: int, threads: int
) -> list[dict[str, Any]]:
    xq = normalise(ds.queries[:n_queries])
    gt = ds.gt[:n_queries]
    results = []
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, initializer=_single_threaded_faiss) as pool:
        list(pool.map(lambda i: searcher.search(xq[i : i + 1], 8), range(min(64, n_queries))))
        for p in nprobes:
            searcher.search(xq[: min(100, n_queries)], p)  # warm-up
            batched_s = float("inf")
            for _ in range(3):  # best of 3: the machine is small and shared
                t0 = time.perf_counter()
                found = searcher.search(xq, p)
                batched_s = min(batched_s, time.perf_counter() - t0)
            rec = recall_at_k(found, gt)

            def one(i: int, p: int = p) -> np.ndarray:
                return searcher.search(xq[i : i + 1], p)[0]

            cpu0 = time.process_time()
            t0 = time.perf_counter()
            singles = list(pool.map(one, range(n_queries), chunksize=1))
            threaded_s = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            results.append(
                {
                    "index": searcher.name,
                    "nprobe": p,
                    "recall": rec,
                    "recall_threads": recall_at_k(singles, gt),
                    "qps_batched": n_queries / batched_s,
                    "qps_threads": n_queries / threaded_s,
                    "threads": threads,
                    "threads_cpu_s": cpu,
                }
            )
            log(
                f"  {searcher.name} nprobe={p}: recall {rec:.4f}, batched "
                f"{n_queries / batched_s:,.0f} q/s, {threads} threads {n_queries / threaded_s:,.0f} q/s"
            )
    return results


# ---------------------------------------------------------------------------------------
# Restarts
# ---------------------------------------------------------------------------------------
async def restart(
    session: aiohttp.ClientSession, node: Node, ds: Dataset, sig: signal.Signals
) -> dict[str, Any]:
    rss = rss_mib_of(node.pid)
    t0 = time.perf_counter()
    node.signal(sig)
    code = await asyncio.to_thread(node.wait_exit, STOP_TIMEOUT_S)
    stop_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    node.start()
    ready_s = await wait_ready(session, node, READY_TIMEOUT_S)
    await one_search_ok(session, node, ds)
    total_s = time.perf_counter() - t1
    desc = await call(session, "GET", f"{node.base_url}/v1/collections/{COLLECTION}")
    states = Counter(s["index_state"] for s in desc["shard_states"])
    if desc["count"] != ds.n:
        raise RuntimeError(f"after {sig.name} restart: count {desc['count']} != {ds.n}")
    return {
        "signal": sig.name,
        "exit_code": code,
        "rss_mib_before": rss,
        "stop_s": stop_s,
        "start_to_ready_s": ready_s,
        "start_to_first_search_s": total_s,
        "count_after": desc["count"],
        "states_after": dict(states),
    }


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def main_table(
    nprobes: list[int],
    rest: list[PointResult],
    faiss_res: list[dict[str, Any]],
    index_name: str,
    conc: list[int],
) -> str:
    by = {(r.nprobe, r.concurrency): r for r in rest}
    fz = {f["nprobe"]: f for f in faiss_res if f["index"] == index_name}
    cmax = max(conc)
    headers = ["nprobe", "recall REST"]
    headers += [f"qps REST c={c}" for c in conc]
    headers += [
        "recall FAISS",
        "qps FAISS batch",
        "qps FAISS 16thr",
        f"c{cmax}/batch",
        f"c{cmax}/16thr",
    ]
    rows = []
    for p in nprobes:
        r = by.get((p, cmax)) or by.get((p, conc[0]))
        f = fz.get(p)
        row = [str(p), f"{r.recall:.4f}" if r else "-"]
        row += [f"{by[(p, c)].qps:,.0f}" if (p, c) in by else "-" for c in conc]
        if f is not None and (p, cmax) in by:
            q = by[(p, cmax)].qps
            row += [
                f"{f['recall']:.4f}",
                f"{f['qps_batched']:,.0f}",
                f"{f['qps_threads']:,.0f}",
                f"{q / f['qps_batched']:.3f}",
                f"{q / f['qps_threads']:.3f}",
            ]
        else:
            row += ["-"] * 5
        rows.append(row)
    return fmt_table(headers, rows)


def parse_int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
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
    p.add_argument("--dim", type=int, default=384, help="dimension of --synthetic vectors")
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
        help="instead: 3 nodes, add a 4th, rebalance under search load (scripts/bench_cluster.py)",
    )
    p.add_argument(
        "--replication", type=int, default=1, help="replication factor in --cluster mode"
    )
    p.add_argument(
        "--window", type=float, default=5.0, help="seconds of search load before/after a rebalance"
    )
    p.add_argument(
        "--rebalance-nprobe", type=int, default=16, help="nprobe of the --rebalance search load"
    )
    p.add_argument(
        "--rebalance-timeout", type=float, default=900.0, help="give the rebalance this long"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and log")
    p.add_argument("--out", type=Path, default=Path("bench-results.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 20_000
        args.queries = min(args.queries, 500)
        args.warmup = min(args.warmup, 50)
        if args.nprobe == [4, 8, 16, 32, 64]:
            args.nprobe = [8, 16]
        if args.train_min is None:
            # 20,000 / 8 shards = 2,500 per shard, below the default 4096: train earlier.
            args.train_min = 1024
    if args.kill_rewrites is None:
        args.kill_rewrites = 2_000 if args.quick else 10_000
    return args


def load_dataset(args: argparse.Namespace) -> Dataset:
    if args.synthetic:
        return make_synthetic(args.synthetic, args.queries, args.dim, args.seed)
    data: Path = args.data
    needed = ["base.f16.npy", "query.f16.npy", "gt_I.npy", "base.jsonl"]
    if not all((data / f).exists() for f in needed):
        print(missing_data_message(data), file=sys.stderr)
        raise SystemExit(2)
    return load_real(data, args.limit, args.queries)


def environment() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
        "note": f"client and server share the same {affinity} core(s)",
    }


@contextlib.contextmanager
def temp_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aquila-bench-"))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


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
            await call(
                session, "PUT", f"{node.base_url}/v1/collections/{COLLECTION}", orjson.dumps(spec)
            )
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
                for start in range(0, m, args.batch):
                    docs = [
                        {"id": str(i), "vector": ds.base[i], "metadata": ds.metadata[i]}
                        for i in range(start, min(start + args.batch, m))
                    ]
                    await call(
                        session, "POST", url, orjson.dumps({"documents": docs}, option=OPT_NP)
                    )
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


def pyspy_exe() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


async def profile_server(
    session: aiohttp.ClientSession, node: Node, ds: Dataset, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    exe = pyspy_exe()
    if exe is None:
        log("py-spy not installed (pip install py-spy): no profile")
        return {"error": "py-spy not installed"}
    out = tmp / "pyspy.txt"
    cmax = max(args.concurrency)
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(node.pid),
        "--duration",
        str(int(args.profile)),
        "--rate",
        "100",
        "--format",
        "raw",
        "--threads",
        "--output",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    cpu0 = thread_cpu_of(node.pid)
    t0 = time.perf_counter()
    try:
        deadline = time.perf_counter() + args.profile + 30
        n = 0
        while proc.returncode is None and time.perf_counter() < deadline:
            await search_point(
                session, node, ds, args.profile_nprobe, cmax, min(500, args.queries), 0
            )
            n += 1
        async with asyncio.timeout(60):
            spy_out = (await proc.communicate())[0].decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if not out.exists():
        return {"error": spy_out[-2000:]}
    wall = time.perf_counter() - t0
    cpu1 = thread_cpu_of(node.pid)
    summary = summarise_collapsed(out)
    names: dict[int, str] = summary.pop("tids")
    per_thread: Counter[str] = Counter()
    for tid, c in cpu1.items():
        per_thread[names.get(tid, f"tid {tid}")] += c - cpu0.get(tid, 0.0)
    summary["thread_cpu_cores"] = {
        name: round(c / wall, 3) for name, c in per_thread.most_common() if c > 0
    }
    summary["wall_s"] = wall
    summary["nprobe"] = args.profile_nprobe
    summary["concurrency"] = cmax
    keep = args.out.with_suffix(".pyspy.txt")
    shutil.copy(out, keep)
    summary["raw_file"] = str(keep)
    log(f"py-spy: {summary['samples']} samples over {n} runs of 500 queries -> {keep}")
    return summary


def report(args: argparse.Namespace, ds: Dataset, results: dict[str, Any]) -> None:
    env = results["environment"]
    print()
    print("=" * 100)
    print(
        f"Aquila benchmark — {ds.name}: {ds.n:,} × {ds.dim}, cosine, {args.shards} shards ivf_flat"
    )
    if ds.synthetic:
        print("*** SYNTHETIC DATA: these figures are not for the real embedding set ***")
    print(
        f"Machine: {env['cpus_usable']} usable core(s) — the client, the server and FAISS share them."
    )
    for n in ds.notes:
        print(f"Note: {n}")
    if "ingest" in results:
        i = results["ingest"]
        print(
            f"Ingest (fsync on, batch {i['batch']}, {i['uploaders']} uploaders): "
            f"{i['docs_per_s']:,.0f} docs/s ({i['seconds']:.1f}s; server CPU {i['server_cpu_s']:.1f}s)"
        )
    if "training" in results:
        t = results["training"]
        nls = sorted({v["nlist"] for v in t["node_nlists"].values()})
        print(
            f"All shards trained {t['seconds_after_ingest']:.1f}s after the last ingest ack "
            f"(node index nlist: {nls})"
        )
    rest = [PointResult(**r) for r in results.get("rest", [])]
    faiss_res = results.get("faiss", [])
    names = list(dict.fromkeys(f["index"] for f in faiss_res))
    if rest:
        print(
            f"\nREST: one query per request, k={K}, {args.queries} queries per point. "
            "nprobe is per shard on the node; per index for FAISS."
        )
        for name in names or [""]:
            print(f"\nvs {name}:")
            print(main_table(args.nprobe, rest, faiss_res, name, args.concurrency))
        print("\nREST latency (ms):")
        rows = [
            [
                str(r.nprobe),
                str(r.concurrency),
                f"{r.lat_p50_ms:.1f}",
                f"{r.lat_p95_ms:.1f}",
                f"{r.lat_p99_ms:.1f}",
                f"{r.server_took_ms_p50:.2f}",
                f"{r.server_cpu_s / r.seconds:.2f}",
                f"{r.client_cpu_s / r.seconds:.2f}",
            ]
            for r in rest
        ]
        print(
            fmt_table(
                ["nprobe", "c", "p50", "p95", "p99", "took p50", "srv cores", "cli cores"], rows
            )
        )
    if "restart" in results:
        g, k = results["restart"]["sigterm"], results["restart"]["sigkill"]
        print(
            f"\nRestart holding {ds.n:,} docs: SIGTERM stop {g['stop_s']:.2f}s, start→ready "
            f"{g['start_to_ready_s']:.2f}s, start→first search {g['start_to_first_search_s']:.2f}s"
        )
        print(
            f"                      SIGKILL (after re-upserting {k['rewritten_before_kill']:,}): "
            f"start→ready {k['start_to_ready_s']:.2f}s, start→first search "
            f"{k['start_to_first_search_s']:.2f}s, recall@10 nprobe=16 after "
            f"{k['recall_nprobe16_after']:.4f}"
        )
    prof = results.get("profile")
    if prof and "self" in prof:
        print(
            f"\npy-spy, server during c={prof['concurrency']} nprobe={prof['nprobe']} "
            f"({prof['samples']} samples): top self frames"
        )
        for f in prof["self"][:12]:
            print(f"  {f['pct']:5.1f}%  {f['frame']}")
        print("  event-loop thread (MainThread) self frames:")
        for f in prof["main_thread_self"][:8]:
            print(f"  {f['pct']:5.1f}%  {f['frame']}")
        cores = ", ".join(f"{k} {v:.2f}" for k, v in list(prof["thread_cpu_cores"].items())[:8])
        print(f"  CPU cores used per server thread (/proc): {cores}")
    print(f"\nAll figures: {args.out.resolve()}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cluster or args.rebalance:
        import bench_cluster  # scripts/ is on sys.path when this file runs as a script

        return bench_cluster.main(sys.argv[1:] if argv is None else argv)
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
    }
    log(results["environment"]["note"])
    status = 0
    t0 = time.perf_counter()
    with temp_dir(args.keep) as tmp:
        try:
            asyncio.run(run(args, ds, tmp, results))
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
    report(args, ds, results)
    return status


if __name__ == "__main__":
    sys.exit(main())
