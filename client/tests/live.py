"""Real Aquila nodes for the client's integration tests: one `aquila serve` on 127.0.0.1 with a
free port (runs anywhere), or three on 127.0.0.2-4 inside the private network namespace
(scripts/test.sh as root), as the server's own e2e tests do. Data is seeded with plain JSON
requests (the v1 upsert), so these tests do not depend on the client's columnar upsert."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tests.datasets import Sample, load_sample
from tests.e2e.conftest import Cluster, in_private_netns
from tests.procs import NodeProc

API_KEY = "client-test-key"
# Small training threshold so IVF shards train on the few hundred documents of a test.
SETTINGS: dict[str, Any] = {"api_key": API_KEY, "train_min": 64}


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
    cluster: Cluster | None = None

    @property
    def addrs(self) -> list[str]:
        return [n.addr for n in self.nodes]

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
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


def start_cluster3(root: Path, **settings: Any) -> Deployment:
    if not in_private_netns():
        raise RuntimeError("a 3-node cluster needs the private network namespace")
    c = Cluster(root, 3, **{**SETTINGS, **settings})
    try:
        c.start()
    except BaseException:
        c.stop()
        raise
    return Deployment("cluster3", c.nodes, c)


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
