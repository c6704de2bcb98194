"""Real Aquila nodes for the client's integration tests: one `aquila serve` on 127.0.0.1 with a
free port (runs anywhere), or three on 127.0.0.2-4 inside the private network namespace
(scripts/test.sh as root), as the server's own e2e tests do. Data is seeded with plain JSON
requests (the v1 upsert), so these tests do not depend on the client's columnar upsert."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tests.datasets import Sample, load_sample
from tests.procs import NodeProc, wait_until

API_KEY = "client-test-key"
# Small training threshold so IVF shards train on the few hundred documents of a test.
SETTINGS: dict[str, Any] = {"api_key": API_KEY, "train_min": 64}
# Fast failure detection, as in tests/e2e/conftest.py: the logic is the same.
FAST: dict[str, Any] = {
    "probe_interval_s": 0.3,
    "probe_timeout_s": 0.15,
    "gossip_interval_s": 0.1,
    "push_pull_interval_s": 2.0,
    "suspicion_mult": 3,
    "peer_timeout_s": 3,
}


def in_private_netns() -> bool:
    return os.environ.get("AQUILA_NETNS") == "1"


def free_port() -> int:
    """A port free for both TCP (HTTP) and UDP (gossip), which a node binds together."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free TCP+UDP port")


@dataclass
class Deployment:
    kind: str  # "node" or "cluster3"
    nodes: list[NodeProc]

    @property
    def addrs(self) -> list[str]:
        return [n.addr for n in self.nodes]

    def states(self, observer: NodeProc) -> dict[str, str]:
        """Member id → state as `observer` sees it."""
        status, body = observer.call("GET", "/v1/cluster", timeout=3)
        assert status == 200, body
        return {m["id"]: m["state"] for m in body["members"]}

    def wait_states(self, want: dict[str, str], observers: list[NodeProc] | None = None,
                    timeout: float = 30.0) -> None:
        for obs in observers or self.nodes:
            wait_until(lambda obs=obs: all(self.states(obs).get(k) == v  # type: ignore[misc]
                                           for k, v in want.items()),
                       timeout, f"{obs.addr} to see {want}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def start_node(root: Path, **settings: Any) -> Deployment:
    node = NodeProc(root / "n1", host="127.0.0.1", port=free_port(), **{**SETTINGS, **settings})
    try:
        node.start()
    except BaseException:
        node.stop()
        raise
    return Deployment("node", [node])


def cluster_node(root: Path, i: int, seeded: bool = True, **settings: Any) -> NodeProc:
    """Node n{i} on 127.0.0.{i + 1}:8470 (namespace only), seeded with n1 unless told not."""
    extra = {**SETTINGS, **FAST, **settings, "node_id": f"n{i}"}
    if i > 1 and seeded:
        extra["seeds"] = "127.0.0.2:8470"
    return NodeProc(root / f"n{i}", host=f"127.0.0.{i + 1}", port=8470, **extra)


def start_cluster3(root: Path, **settings: Any) -> Deployment:
    """Three nodes on 127.0.0.2-4 (as tests/e2e/conftest.py starts them), all alive."""
    if not in_private_netns():
        raise RuntimeError("a 3-node cluster needs the private network namespace")
    dep = Deployment("cluster3", [cluster_node(root, i, **settings) for i in (1, 2, 3)])
    try:
        dep.nodes[0].start()
        for node in dep.nodes[1:]:
            node.start(wait_ready=False)
        for node in dep.nodes[1:]:
            node.wait_ready()
        dep.wait_states({"n1": "alive", "n2": "alive", "n3": "alive"})
    except BaseException:
        dep.stop()
        raise
    return dep


def create(node: NodeProc, name: str, dim: int, **spec: Any) -> None:
    status, body = node.call("PUT", f"/v1/collections/{name}", {"dim": dim, **spec})
    assert status == 201, body


def seed(node: NodeProc, name: str, vectors: npt.NDArray[np.float32], ids: list[str],
         metadata: list[dict[str, Any]], batch: int = 250) -> None:
    """Documents through the v1 JSON upsert (float32 → float is exact, so the stored vectors
    are these float32 values bit for bit)."""
    for lo in range(0, len(ids), batch):
        docs = [{"id": ids[i], "vector": vectors[i].tolist(), "metadata": metadata[i]}
                for i in range(lo, min(lo + batch, len(ids)))]
        status, body = node.call("POST", f"/v1/collections/{name}/documents",
                                 {"documents": docs, "consistency": "all"}, timeout=60)
        assert status == 200, body


def sample_rows(n: int) -> tuple[Sample, npt.NDArray[np.float32], list[str], list[dict[str, Any]]]:
    s = load_sample()
    meta = [{"pos": m["pos"], "text": m["text"]} for m in s.base_meta[:n]]
    return s, np.ascontiguousarray(s.base[:n]), [m["id"] for m in s.base_meta[:n]], meta


def cosine_top(base: npt.NDArray[np.float32], q: npt.NDArray[np.float32], k: int,
               allowed: npt.NDArray[np.bool_] | None = None,
               exclude: list[int] | None = None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Exact cosine top-k rows (and scores) per query, among `allowed` rows, `exclude[i]` left
    out of query i's answer."""
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    qq = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = (qq @ b.T).astype(np.float32)
    if allowed is not None:
        sims[:, ~allowed] = -np.inf
    if exclude is not None:
        for i, row in enumerate(exclude):
            sims[i, row] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)
