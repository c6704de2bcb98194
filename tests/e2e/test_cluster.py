"""Three real nodes: join, a 12-shard collection created on one node and filled through
another, the same answers from every node, and one failure mode per test: SIGSTOP, a firewall
partition, SIGKILL. (The cluster logic behind them is tested in process: tests/test_sim_*.)"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np

from tests.datasets import load_sample
from tests.e2e.conftest import FAST, Cluster, Nft, cosine_oracle, ingest_sample
from tests.procs import NodeProc, wait_until

N_DOCS = 3000


def fill(cluster: Cluster) -> tuple[np.ndarray, list[str]]:
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    status, desc = n1.call("PUT", "/v1/collections/wn", {
        "dim": 384, "metric": "cosine", "shards": 12, "index": {"type": "flat"}})
    assert status == 201, desc
    assert len({r for st in desc["shard_states"] for r in st["replicas"]}) == 3
    return ingest_sample(n2, N_DOCS)



def search(node: NodeProc, q: np.ndarray, k: int = 10, **extra: object) -> tuple[int, dict]:
    return node.call("POST", "/v1/collections/wn/search",
                     {"vectors": q.tolist(), "k": k, **extra}, timeout=30)


def overlap(a: list[list[str]], b: list[list[str]]) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b, strict=True)]))


def test_three_nodes_answer_alike(cluster3: Cluster) -> None:
    base, ids = fill(cluster3)
    q = load_sample().queries[:50]
    want = cosine_oracle(base, ids, q, 10)
    for node in cluster3.nodes:
        status, body = search(node, q)
        assert status == 200 and not body["partial"]
        got = [[h["id"] for h in row] for row in body["results"]]
        assert overlap(got, want) >= 0.999, node.addr
        status, desc = node.call("GET", "/v1/collections/wn")
        assert status == 200 and desc["count"] == N_DOCS


def not_alive_everywhere(cluster: Cluster, node: str, observers: list[NodeProc]) -> bool:
    """Every observer has stopped taking `node` for alive (suspect now, or dead already: how
    far it got depends on timing alone)."""
    return all(cluster.members(obs)[node] in ("suspect", "dead") for obs in observers)


def test_paused_node_keeps_search_deadlines_then_refutes(cluster3: Cluster) -> None:
    """A paused node answers nothing: searches honour their deadline, then it refutes."""
    fill(cluster3)
    q = load_sample().queries[:50]
    n1, n2, n3 = cluster3.nodes
    n2.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    status, body = search(n1, q[:5], timeout_ms=1500)
    assert time.monotonic() - t0 < 5.0
    assert status == 200 and body["partial"] and body["missing_shards"]
    wait_until(lambda: not_alive_everywhere(cluster3, "n2", [n1, n3]), 20,
               "n1 and n3 to suspect n2")
    n2.signal(signal.SIGCONT)
    cluster3.wait_states({"n2": "alive"}, timeout=30)
    assert search(n1, q[:5])[1]["partial"] is False


def test_partitioned_node_is_suspected_then_alive_again(cluster3: Cluster, nft: Nft) -> None:
    """A partition cutting n2 off from everyone: suspected, then healed."""
    n1 = cluster3.nodes[0]
    nft.cut("127.0.0.2", "127.0.0.3")
    nft.cut("127.0.0.3", "127.0.0.4")
    wait_until(lambda: cluster3.members(n1)["n2"] in ("suspect", "dead"), 20, "n1 suspects n2")
    nft.heal()
    cluster3.wait_states({"n2": "alive"}, timeout=30)


def test_killed_node_shards_are_missing_until_it_returns(cluster3: Cluster) -> None:
    """SIGKILL: everyone marks it dead; searches are partial with its shards listed. It comes
    back with its data and is alive again."""
    base, ids = fill(cluster3)
    q = load_sample().queries[:50]
    want = cosine_oracle(base, ids, q, 10)
    n1, n2, n3 = cluster3.nodes
    shards_of_n3 = sorted(st["shard"] for st in n1.call("GET", "/v1/collections/wn")[1]["shard_states"]
                          if "n3" in st["replicas"])
    n3.kill()
    cluster3.wait_states({"n3": "dead"}, [n1, n2], timeout=30)
    for node in (n1, n2):
        status, body = search(node, q[:5])
        assert status == 200 and body["partial"]
        assert body["missing_shards"] == shards_of_n3
        status, body = search(node, q[:5], allow_partial=False)
        assert status == 503 and body["error"]["code"] == "unavailable"
    n3.start()
    cluster3.wait_states({"n3": "alive"}, timeout=30)
    status, body = search(n1, q)
    assert status == 200 and not body["partial"]
    got = [[h["id"] for h in row] for row in body["results"]]
    assert overlap(got, want) >= 0.999


def test_node_without_the_cluster_secret_cannot_join(netns: None, tmp_path: Path) -> None:
    good = NodeProc(tmp_path / "good", host="127.0.0.2", node_id="good", cluster_secret="s3cret",
                    **FAST).start()
    bad = NodeProc(tmp_path / "bad", host="127.0.0.3", node_id="bad", cluster_secret="wrong",
                   seeds="127.0.0.2:8470", **FAST)
    nosecret = NodeProc(tmp_path / "none", host="127.0.0.4", node_id="none",
                        seeds="127.0.0.2:8470", **FAST)
    try:
        bad.start(wait_ready=False)
        nosecret.start(wait_ready=False)
        # Both keep retrying their join and are never ready; the good node never lists them.
        wait_until(lambda: "join failed" in bad.log_tail(200)
                   and "join failed" in nosecret.log_tail(200), 30, "refused joins")
        assert bad.call("GET", "/readyz")[0] == 503
        assert nosecret.call("GET", "/readyz")[0] == 503
        members = {m["id"] for m in good.call("GET", "/v1/cluster")[1]["members"]}
        assert members == {"good"}
        # Peer routes refuse unsigned requests.
        status, body = good.call("POST", "/internal/v1/state", [])
        assert status == 401 and body["error"]["code"] == "unauthorized"
    finally:
        for n in (bad, nosecret, good):
            n.stop()


def test_restarted_seed_finds_its_cluster_without_seeds(netns: None, tmp_path: Path) -> None:
    """The first node has no seeds; restarted, it rejoins through the peers it remembers."""
    c = Cluster(tmp_path, 3)
    try:
        c.start()
        n1 = c.nodes[0]
        wait_until(lambda: (n1.data_dir / "peers.json").exists(), 10, "peers remembered")
        n1.kill()
        c.wait_states({"n1": "dead"}, c.nodes[1:], timeout=30)
        n1.start()
        c.wait_states({"n1": "alive", "n2": "alive", "n3": "alive"}, timeout=30)
        assert "rejoined through" in n1.log_tail(200)
    finally:
        c.stop()
