"""The REST load generator: request bodies, ingest in concurrent batches, waiting for the
indexes to train, and search load, one query per request, against one node (search_point:
every query must answer) or round-robin over many (search_load: failures are counted).

Requests to several nodes go round-robin: request i to urls[i mod len(urls)]."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson
from bench_common import (
    COLLECTION,
    JSON_HEADERS,
    OPT_NP,
    TRAIN_POLL_S,
    TRAIN_TIMEOUT_S,
    K,
    log,
    pct,
)
from bench_data import Dataset, recall_at_k
from bench_node import Node, call, cpu_seconds_of

LOAD_REQUEST_TIMEOUT_S = 30.0


async def run_workers(n_workers: int, items: int, work: Callable[[int], Awaitable[None]]) -> None:
    """Run work(0..items-1) with n_workers concurrent workers pulling from one counter."""
    counter = iter(range(items))

    async def worker() -> None:
        for i in counter:
            await work(i)

    await asyncio.gather(*(worker() for _ in range(n_workers)))


# ---------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------
def upsert_bodies(ds: Dataset, batch: int, n: int | None = None) -> list[bytes]:
    """Upsert bodies of ≤batch documents for base rows 0..n-1 (all by default); id = str(row)."""
    n = ds.n if n is None else n
    return [
        orjson.dumps(
            {
                "documents": [
                    {"id": str(i), "vector": ds.base[i], "metadata": ds.metadata[i]}
                    for i in range(start, min(start + batch, n))
                ]
            },
            option=OPT_NP,
        )
        for start in range(0, n, batch)
    ]


def query_bodies(ds: Dataset, nprobe: int, n: int) -> list[bytes]:
    return [
        orjson.dumps({"vector": ds.queries[i], "k": K, "nprobe": nprobe}, option=OPT_NP)
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------
# Collection and ingest
# ---------------------------------------------------------------------------------------
async def create_collection(
    session: aiohttp.ClientSession, url: str, spec: dict[str, Any]
) -> dict[str, Any]:
    body = await call(session, "PUT", f"{url}/v1/collections/{COLLECTION}", orjson.dumps(spec))
    return dict(body)


async def upload(
    session: aiohttp.ClientSession,
    urls: list[str],
    bodies: list[bytes],
    uploaders: int,
    expected: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, list[float]]:
    """POST every upsert body, body i through urls[i mod len(urls)], `uploaders` at a time;
    (wall seconds, per-request latencies). progress(upserted so far) after each reply. Fails
    unless `expected` documents were upserted."""
    doc_urls = [f"{u}/v1/collections/{COLLECTION}/documents" for u in urls]
    latencies: list[float] = []
    upserted = 0

    async def one(i: int) -> None:
        nonlocal upserted
        t = time.perf_counter()
        reply = await call(session, "POST", doc_urls[i % len(doc_urls)], bodies[i])
        latencies.append(time.perf_counter() - t)
        upserted += int(reply["upserted"])
        if progress is not None:
            progress(upserted)

    t0 = time.perf_counter()
    await run_workers(uploaders, len(bodies), one)
    wall = time.perf_counter() - t0
    if upserted != expected:
        raise RuntimeError(f"upserted {upserted}, expected {expected}")
    return wall, latencies


async def ingest(
    session: aiohttp.ClientSession, node: Node, ds: Dataset, batch: int, uploaders: int
) -> dict[str, Any]:
    """Every base vector into one node; bodies are encoded off the clock."""
    t0 = time.perf_counter()
    bodies = upsert_bodies(ds, batch)
    encode_s = time.perf_counter() - t0
    total_bytes = sum(len(b) for b in bodies)
    log(
        f"ingest: {len(bodies)} bodies of ≤{batch} docs encoded in {encode_s:.1f}s "
        f"({total_bytes / 2**20:.0f} MiB; off the clock)"
    )
    cpu0 = cpu_seconds_of(node.pid)
    me0 = time.process_time()

    def progress(done: int) -> None:
        if done % (batch * 20) == 0 or done == ds.n:
            log(f"  ingested {done}/{ds.n}")

    wall, latencies = await upload(session, [node.base_url], bodies, uploaders, ds.n, progress)
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


async def ingest_rr(
    session: aiohttp.ClientSession,
    urls: list[str],
    ds: Dataset,
    batch: int,
    uploaders: int,
    server_cpu: Callable[[], float],
) -> dict[str, Any]:
    """Every base vector, batch i through node i mod len(urls); server_cpu() = CPU seconds of
    all the nodes so far."""
    bodies = upsert_bodies(ds, batch)
    cpu0 = server_cpu()
    wall, lat = await upload(session, urls, bodies, uploaders, ds.n)
    return {
        "documents": ds.n,
        "batch": batch,
        "uploaders": uploaders,
        "through_nodes": len(urls),
        "seconds": wall,
        "docs_per_s": ds.n / wall,
        "batch_latency_p50_s": pct(lat, 50),
        "batch_latency_p99_s": pct(lat, 99),
        "server_cpu_s": server_cpu() - cpu0,
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
        if desc["count"] == n and all(s == "trained" for s in states) and settled(desc):
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


def settled(desc: dict[str, Any]) -> bool:
    """No shard's index is due a retraining: its vectors are below the count that triggers
    the next one. Measuring while the last one of a bulk load runs (it starts once the writes
    pause) would time the training, and search an index about to change."""
    for s in desc["shard_states"]:
        info = s.get("index")
        if info and info.get("retrain_at") and info["vectors"] >= info["retrain_at"]:
            return False
    return True


# ---------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------
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
    """n_queries queries (after `warmup` unmeasured ones) against one node; any failure raises."""
    url = f"{node.base_url}/v1/collections/{COLLECTION}/search"
    bodies = query_bodies(ds, nprobe, n_queries)
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


@dataclass
class LoadResult:
    nprobe: int
    concurrency: int
    nodes: int
    sent: int = 0
    ok: int = 0
    failures: int = 0
    partial: int = 0
    seconds: float = 0.0
    qps: float = 0.0
    recall: float = float("nan")
    lat_p50_ms: float = float("nan")
    lat_p95_ms: float = float("nan")
    lat_p99_ms: float = float("nan")
    lat_max_ms: float = float("nan")
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def search_load(
    session: aiohttp.ClientSession,
    urls: list[str],
    ds: Dataset,
    bodies: list[bytes],
    nprobe: int,
    concurrency: int,
    server_cpu: Callable[[], float],
    *,
    count: int | None = None,
    seconds: float | None = None,
    stop: asyncio.Event | None = None,
    first: int = 0,
) -> LoadResult:
    """One query per request, request j to urls[j mod len(urls)], query (first + j) mod
    len(bodies); until `count` requests were sent, `seconds` passed or `stop` is set (whichever
    comes first; at least one must be given). Failures (non-200, timeouts, connection errors)
    are counted, not raised; recall@10 is over the answered queries."""
    assert count is not None or seconds is not None or stop is not None
    res = LoadResult(nprobe=nprobe, concurrency=concurrency, nodes=len(urls))
    lat: list[float] = []
    hits = 0
    errors: Counter[str] = Counter()
    seq = itertools.count()
    timeout = aiohttp.ClientTimeout(total=LOAD_REQUEST_TIMEOUT_S)
    t0 = time.perf_counter()
    deadline = t0 + seconds if seconds is not None else float("inf")
    cpu0, me0 = server_cpu(), time.process_time()

    async def worker() -> None:
        nonlocal hits
        while True:
            j = next(seq)
            if (count is not None and j >= count) or time.perf_counter() >= deadline:
                return
            if stop is not None and stop.is_set():
                return
            q = (first + j) % len(bodies)
            url = f"{urls[j % len(urls)]}/v1/collections/{COLLECTION}/search"
            res.sent += 1
            t = time.perf_counter()
            try:
                async with session.post(
                    url, data=bodies[q], headers=JSON_HEADERS, timeout=timeout
                ) as r:
                    raw = await r.read()
                    if r.status != 200:
                        errors[f"HTTP {r.status}: {raw[:160].decode(errors='replace')}"] += 1
                        continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
                continue
            lat.append(time.perf_counter() - t)
            reply = orjson.loads(raw)
            if reply.get("partial"):
                res.partial += 1
            found = {int(h["id"]) for h in reply["results"][0]}
            hits += len(found & {int(x) for x in ds.gt[q][:K]})

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.seconds = time.perf_counter() - t0
    res.server_cpu_s = server_cpu() - cpu0
    res.client_cpu_s = time.process_time() - me0
    res.ok = len(lat)
    res.failures = sum(errors.values())
    res.errors = dict(errors.most_common(10))
    res.qps = res.ok / res.seconds if res.seconds > 0 else float("nan")
    if lat:
        res.recall = hits / (K * len(lat))
        res.lat_p50_ms = pct(lat, 50) * 1000
        res.lat_p95_ms = pct(lat, 95) * 1000
        res.lat_p99_ms = pct(lat, 99) * 1000
        res.lat_max_ms = max(lat) * 1000
    return res
