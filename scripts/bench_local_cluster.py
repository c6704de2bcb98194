"""A local cluster of real `aquila serve` processes on 127.0.0.2, 127.0.0.3, ... (same port),
the private network namespace it runs in when we can have one, and the settings the multi-node
modes (bench_cluster.py, bench_rebalance.py) share. No traffic leaves 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_common import POLL_S, READY_TIMEOUT_S, log
from bench_data import Dataset
from bench_node import Node, call, cpu_seconds_of, wait_ready

PORT = 8470
NETNS_ENV = "AQUILA_BENCH_NETNS"
MEMBERS_TIMEOUT_S = 60.0
PRODUCT_TRAIN_MIN = 4096


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

    def __init__(self, root: Path, env: dict[str, str], port: int = PORT) -> None:
        self.root = root
        self.env = env
        self.port = port
        self.nodes: list[Node] = []

    @property
    def urls(self) -> list[str]:
        return [n.base_url for n in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.alive()]

    def node_id(self, i: int) -> str:
        return f"n{i}"

    def host(self, i: int) -> str:
        """Node i's address (1-based)."""
        return host_of(i)

    def new_node(self) -> Node:
        i = len(self.nodes) + 1
        host = self.host(i)
        check_free(host, self.port)
        env = {**self.env, "AQUILA_NODE_ID": self.node_id(i)}
        if i > 1:
            env["AQUILA_SEEDS"] = f"{self.host(1)}:{self.port}"
        self.root.mkdir(parents=True, exist_ok=True)
        node = Node(self.root / f"n{i}", self.root / f"n{i}.log", env, host=host,
                    port=self.port)
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


def pick_train_min(args: argparse.Namespace, ds: Dataset, shards: int) -> int:
    """The product default unless a shard of this data set could end below it."""
    if args.train_min is not None:
        return int(args.train_min)
    per_shard = ds.n // shards
    return PRODUCT_TRAIN_MIN if per_shard >= 2 * PRODUCT_TRAIN_MIN else max(256, per_shard // 2)


def node_env(train_min: int) -> dict[str, str]:
    return {"AQUILA_FSYNC": "true", "AQUILA_LOG_LEVEL": "INFO", "AQUILA_TRAIN_MIN": str(train_min)}


def new_session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=4 * concurrency + 16, limit_per_host=concurrency + 8, keepalive_timeout=120
    )
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300))


def placement(desc: dict[str, Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for s in desc["shard_states"]:
        for r in s["replicas"]:
            out.setdefault(r, []).append(int(s["shard"]))
    return dict(sorted(out.items()))
