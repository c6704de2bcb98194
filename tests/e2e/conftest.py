"""Multi-node tests: real processes on 127.0.0.2, 127.0.0.3, ... inside a private network
namespace (scripts/test.sh runs pytest under `unshare -n` as root and sets AQUILA_NETNS=1),
so that no test traffic can leave the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.datasets import load_sample
from tests.procs import NodeProc, wait_until

# Fast protocol timing so failure detection fits in a test; the logic is the same.
FAST = {
    "probe_interval_s": 0.3,
    "probe_timeout_s": 0.15,
    "gossip_interval_s": 0.1,
    "push_pull_interval_s": 2.0,
    "suspicion_mult": 3,
    "train_min": 1000,
    "peer_timeout_s": 3,
}


def in_private_netns() -> bool:
    return os.environ.get("AQUILA_NETNS") == "1"


@pytest.fixture
def netns() -> None:
    if not in_private_netns():
        pytest.skip("multi-node tests run inside a private network namespace: scripts/test.sh as root")


class Nft:
    """nftables rules in this namespace's own table (input hook only, see testbed notes)."""

    def __init__(self) -> None:
        if shutil.which("nft") is None:
            pytest.skip("nftables (nft) is not installed")
        self.run("add table inet chaos")
        self.run("add chain inet chaos input { type filter hook input priority 0 ; }")

    @staticmethod
    def run(cmd: str) -> None:
        subprocess.run(["nft", *cmd.split()], check=True)

    def cut(self, a: str, b: str) -> None:
        self.run(f"add rule inet chaos input ip saddr {a} ip daddr {b} drop")
        self.run(f"add rule inet chaos input ip saddr {b} ip daddr {a} drop")

    def heal(self) -> None:
        self.run("flush chain inet chaos input")

    def close(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", "chaos"], check=False)


@pytest.fixture
def nft(netns: None) -> Iterator[Nft]:
    n = Nft()
    yield n
    n.close()


class Cluster:
    def __init__(self, root: Path, n: int, **settings: object) -> None:
        self.nodes: list[NodeProc] = []
        for i in range(n):
            host = f"127.0.0.{i + 2}"
            extra = {**FAST, **settings, "node_id": f"n{i + 1}"}
            if i > 0:
                extra["seeds"] = "127.0.0.2:8470"
            self.nodes.append(NodeProc(root / f"n{i + 1}", host=host, port=8470, **extra))

    def start(self) -> Cluster:
        self.nodes[0].start()
        for node in self.nodes[1:]:
            node.start(wait_ready=False)
        for node in self.nodes[1:]:
            node.wait_ready()
        self.wait_states({f"n{i + 1}": "alive" for i in range(len(self.nodes))})
        return self

    def members(self, node: NodeProc) -> dict[str, str]:
        status, body = node.call("GET", "/v1/cluster", timeout=3)
        assert status == 200
        return {m["id"]: m["state"] for m in body["members"]}

    def wait_states(self, want: dict[str, str], observers: list[NodeProc] | None = None,
                    timeout: float = 30.0) -> None:
        for obs in observers or self.nodes:
            wait_until(
                lambda obs=obs: all(self.members(obs).get(k) == v for k, v in want.items()),
                timeout, f"{obs.addr} to see {want}",
            )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster3(netns: None, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 3)
    try:
        yield c.start()
    finally:
        c.stop()


def ingest_sample(node: NodeProc, n: int, **extra: object) -> tuple[np.ndarray, list[str]]:
    """The first n sample documents into collection "wn" through `node`; (vectors, ids)."""
    s = load_sample()
    for start in range(0, n, 500):
        docs = [{"id": s.base_meta[i]["id"], "vector": s.base[i].tolist(),
                 "metadata": {"pos": s.base_meta[i]["pos"]}} for i in range(start, start + 500)]
        status, body = node.call("POST", "/v1/collections/wn/documents",
                                 {"documents": docs, **extra})
        assert status == 200, body
    return s.base[:n], [m["id"] for m in s.base_meta[:n]]


def cosine_oracle(base: np.ndarray, ids: list[str], q: np.ndarray, k: int) -> list[list[str]]:
    """Exact cosine top-k ids, ties broken as a stable sort does."""
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    qq = q / np.linalg.norm(q, axis=1, keepdims=True)
    order = np.argsort(-(qq @ b.T), axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order]
