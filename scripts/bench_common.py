"""Pieces of the multi-node benchmarks (scripts/bench_cluster.py): a private network namespace,
a local cluster of real `aquila serve` processes on 127.0.0.2, 127.0.0.3, ... (same port), and
a search load that spreads queries round-robin over nodes and counts failures.

Built on scripts/bench.py (Node, Dataset, call, pct, ...); no traffic leaves 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from bench import (
    COLLECTION,
    JSON_HEADERS,
    OPT_NP,
    POLL_S,
    READY_TIMEOUT_S,
    Dataset,
    K,
    Node,
    call,
    cpu_seconds_of,
    log,
    pct,
    wait_ready,
)

PORT = 8470
NETNS_ENV = "AQUILA_BENCH_NETNS"
MEMBERS_TIMEOUT_S = 60.0
LOAD_REQUEST_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------
# Network: a private namespace when we can have one
# ---------------------------------------------------------------------------------------
def in_netns() -> bool:
    return os.environ.get(NETNS_ENV) == "1"


def maybe_reexec_in_netns(script: Path, argv: list[str]) -> str:
    """As root with a working `unshare -n`, re-exec this benchmark inside a fresh network
    namespace whose only interface is lo (brought up first): nothing can leave the machine and
    nothing outside sees the ports. Returns a description of where we run (when no re-exec)."""
    if in_netns():
        return "private network namespace (unshare -n, lo only)"
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return "host loopback (not root or no unshare/ip: no private namespace)"
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        return f"host loopback (unshare -n failed: {probe.stderr.decode(errors='replace')[:200]})"
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, NETNS_ENV: "1"}
    cmd = [
        "unshare",
        "-n",
        "sh",
        "-c",
        'ip link set lo up && exec "$@"',
        "sh",
        sys.executable,
        str(script),
        *argv,
    ]
    log("re-executing inside a private network namespace: unshare -n (lo only)")
    os.execvpe("unshare", cmd, env)
    raise AssertionError("unreachable")


def host_of(i: int) -> str:
    """Node i (1-based) listens on 127.0.0.(i+1)."""
    return f"127.0.0.{i + 1}"


def check_free(host: str, port: int) -> None:
    """Fail early (and clearly) when host:port is taken for TCP or UDP."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError as exc:
                raise RuntimeError(
                    f"{host}:{port} is in use ({exc}); stop what listens there"
                ) from None


# ---------------------------------------------------------------------------------------
# A local cluster
# ---------------------------------------------------------------------------------------
class LocalCluster:
    """Node i gets id n<i>, address 127.0.0.(i+1):8470 and <root>/n<i>; nodes 2.. seed from
    node 1."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.nodes: list[Node] = []

    @property
    def urls(self) -> list[str]:
        return [n.base_url for n in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.alive()]

    def node_id(self, i: int) -> str:
        return f"n{i}"

    def new_node(self) -> Node:
        i = len(self.nodes) + 1
        host = host_of(i)
        check_free(host, PORT)
        env = {**self.env, "AQUILA_NODE_ID": self.node_id(i)}
        if i > 1:
            env["AQUILA_SEEDS"] = f"{host_of(1)}:{PORT}"
        self.root.mkdir(parents=True, exist_ok=True)
        node = Node(self.root / f"n{i}", self.root / f"n{i}.log", env, host=host, port=PORT)
        self.nodes.append(node)
        return node

    async def start(self, session: aiohttp.ClientSession, n: int) -> float:
        """Start n nodes (the seed first), wait for every /readyz and for every node to see
        all of them alive; seconds taken."""
        t0 = time.perf_counter()
        first = self.new_node()
        first.start()
        await wait_ready(session, first, READY_TIMEOUT_S)
        rest = [self.new_node() for _ in range(n - 1)]
        for node in rest:
            node.start()
        for node in rest:
            await wait_ready(session, node, READY_TIMEOUT_S)
        await self.wait_alive(session, self.nodes, [self.node_id(i) for i in range(1, n + 1)])
        return time.perf_counter() - t0

    async def add_node(self, session: aiohttp.ClientSession) -> tuple[Node, float, float]:
        """Start one more node; (node, seconds to its /readyz, seconds until every other node
        sees it alive)."""
        observers = list(self.nodes)
        node = self.new_node()
        t0 = time.perf_counter()
        node.start()
        await wait_ready(session, node, READY_TIMEOUT_S)
        ready = time.perf_counter() - t0
        await self.wait_alive(session, observers, [self.node_id(len(self.nodes))])
        return node, ready, time.perf_counter() - t0

    async def wait_alive(
        self, session: aiohttp.ClientSession, observers: list[Node], ids: list[str]
    ) -> None:
        deadline = time.perf_counter() + MEMBERS_TIMEOUT_S
        for obs in observers:
            while True:
                states: dict[str, str] = {}
                try:
                    body = await call(session, "GET", f"{obs.base_url}/v1/cluster")
                    states = {m["id"]: m["state"] for m in body["members"]}
                except (TimeoutError, aiohttp.ClientError, RuntimeError):
                    pass
                if all(states.get(i) == "alive" for i in ids):
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(
                        f"{obs.base_url} does not see {ids} alive within {MEMBERS_TIMEOUT_S:.0f}s "
                        f"(sees {states})"
                    )
                await asyncio.sleep(POLL_S * 4)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds_of(p) for p in self.pids)

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(n.stop) for n in self.nodes))

    def log_lines(self, *needles: str, limit: int = 40) -> list[str]:
        """Lines of the node logs containing any needle (prefixed with the node's id)."""
        out: list[str] = []
        for i, node in enumerate(self.nodes, 1):
            try:
                text = node.log_path.read_text(errors="replace")
            except OSError:
                continue
            out += [f"n{i}: {ln}" for ln in text.splitlines() if any(x in ln for x in needles)]
        return out[-limit:] if limit else out


# ---------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------
async def create_collection(
    session: aiohttp.ClientSession, url: str, spec: dict[str, Any]
) -> dict[str, Any]:
    body = await call(session, "PUT", f"{url}/v1/collections/{COLLECTION}", orjson.dumps(spec))
    return dict(body)


async def ingest_rr(
    session: aiohttp.ClientSession,
    urls: list[str],
    ds: Dataset,
    batch: int,
    uploaders: int,
    cluster: LocalCluster,
) -> dict[str, Any]:
    """Upsert every base vector in batches, batch i through node i mod len(urls)."""
    bodies = [
        orjson.dumps(
            {
                "documents": [
                    {"id": str(i), "vector": ds.base[i], "metadata": ds.metadata[i]}
                    for i in range(start, min(start + batch, ds.n))
                ]
            },
            option=OPT_NP,
        )
        for start in range(0, ds.n, batch)
    ]
    counter = iter(range(len(bodies)))
    lat: list[float] = []
    upserted = 0
    cpu0 = cluster.cpu_seconds()

    async def worker() -> None:
        nonlocal upserted
        for i in counter:
            t = time.perf_counter()
            url = f"{urls[i % len(urls)]}/v1/collections/{COLLECTION}/documents"
            reply = await call(session, "POST", url, bodies[i])
            lat.append(time.perf_counter() - t)
            upserted += int(reply["upserted"])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(uploaders)))
    wall = time.perf_counter() - t0
    if upserted != ds.n:
        raise RuntimeError(f"upserted {upserted}, expected {ds.n}")
    return {
        "documents": ds.n,
        "batch": batch,
        "uploaders": uploaders,
        "through_nodes": len(urls),
        "seconds": wall,
        "docs_per_s": ds.n / wall,
        "batch_latency_p50_s": pct(lat, 50),
        "batch_latency_p99_s": pct(lat, 99),
        "server_cpu_s": cluster.cpu_seconds() - cpu0,
    }


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


def query_bodies(ds: Dataset, nprobe: int, n: int) -> list[bytes]:
    return [
        orjson.dumps({"vector": ds.queries[i], "k": K, "nprobe": nprobe}, option=OPT_NP)
        for i in range(n)
    ]


async def search_load(
    session: aiohttp.ClientSession,
    urls: list[str],
    ds: Dataset,
    bodies: list[bytes],
    nprobe: int,
    concurrency: int,
    cluster: LocalCluster,
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
    cpu0, me0 = cluster.cpu_seconds(), time.process_time()

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
    res.server_cpu_s = cluster.cpu_seconds() - cpu0
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
