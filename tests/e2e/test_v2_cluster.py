"""The v2 routes on three real nodes: `aquila import` of the committed sample through every
node (one of them killed mid-way), then count, scroll and search by stored id from each node
against the sample; a scroll that writes through another node do not disturb; and the shards of
a dead node missing from a count and a scroll."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tests.datasets import load_sample
from tests.e2e.conftest import Cluster, cosine_oracle
from tests.procs import NodeProc, wait_until

N = 5000


def write_sample(root: Path) -> tuple[Path, Path, Path]:
    s = load_sample()
    npy, ids, meta = root / "base.npy", root / "ids.txt", root / "meta.jsonl"
    np.save(npy, s.base)
    ids.write_text("".join(m["id"] + "\n" for m in s.base_meta))
    meta.write_bytes(b"".join(orjson.dumps({"pos": m["pos"]}) + b"\n" for m in s.base_meta))
    return npy, ids, meta


def import_cmd(cluster: Cluster, root: Path, *extra: str) -> list[str]:
    npy, ids, meta = write_sample(root)
    nodes = ",".join(n.addr for n in cluster.nodes)
    return [sys.executable, "-m", "aquila.node", "import", "wn", str(npy), "--ids", str(ids),
            "--metadata", str(meta), "--node", nodes, "--batch", "200", "--concurrency", "3",
            *extra]


def create(node: NodeProc, replication: int) -> None:
    status, body = node.call("PUT", "/v1/collections/wn", {
        "dim": 384, "metric": "cosine", "shards": 12, "replication": replication,
        "index": {"type": "flat"}})
    assert status == 201, body


def scroll_all(node: NodeProc, **body: Any) -> tuple[list[dict[str, Any]], list[int]]:
    docs: list[dict[str, Any]] = []
    missing: list[int] = []
    cursor = None
    while True:
        status, page = node.call("POST", "/v1/collections/wn/scroll",
                                 {"cursor": cursor, **body}, timeout=30)
        assert status == 200, page
        docs += page["documents"]
        missing += page["missing_shards"]
        cursor = page["next_cursor"]
        if cursor is None:
            return docs, missing


def test_import_then_count_scroll_and_search_by_id_from_every_node(
    cluster3: Cluster, tmp_path: Path
) -> None:
    create(cluster3.nodes[0], replication=2)
    # Consistency one: with replication 2, a write needs one live replica of its shard.
    proc = subprocess.Popen(import_cmd(cluster3, tmp_path, "--consistency", "one"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stored() -> int:
        status, body = cluster3.nodes[0].call("POST", "/v1/collections/wn/count", {})
        return int(body["count"]) if status == 200 else 0

    # A node dies while the import runs: its requests fail over to the others.
    wait_until(lambda: stored() >= 1000, 60, "a fifth of the import stored")
    cluster3.nodes[2].kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert b"imported 5,000 documents" in out
    cluster3.nodes[2].start()
    cluster3.wait_states({"n1": "alive", "n2": "alive", "n3": "alive"})
    # n3 is handed the writes it missed (hinted hand-off); until then a read may ask it.
    for node in cluster3.nodes:
        wait_until(lambda node=node: node.call("POST", "/v1/collections/wn/count", {})[1]
                   == {"count": N, "partial": False, "missing_shards": []},  # type: ignore[misc]
                   60, f"{node.addr} to count every document")
    s = load_sample()
    ids = [m["id"] for m in s.base_meta]
    nouns = {m["id"] for m in s.base_meta if m["pos"] == "noun"}
    flt = {"must": [{"key": "pos", "match": "noun"}]}
    for node in cluster3.nodes:
        status, body = node.call("POST", "/v1/collections/wn/count", {"filter": flt})
        assert status == 200 and body == {"count": len(nouns), "partial": False,
                                          "missing_shards": []}
        docs, missing = scroll_all(node, limit=500)
        assert missing == [] and sorted(d["id"] for d in docs) == sorted(ids)
        some, _ = scroll_all(node, limit=333, filter=flt, include=["vector"])
        assert {d["id"] for d in some} == nouns and len(some) == len(nouns)
        row = {i: r for r, i in enumerate(ids)}
        for d in some[:50]:
            assert np.asarray(d["vector"], np.float32).tobytes() == s.base[row[d["id"]]].tobytes()
        rows = [0, 2500, 4999]
        want = cosine_oracle(s.base, ids, s.base[rows], 11)
        status, body = node.call("POST", "/v1/collections/wn/search",
                                 {"ids": [ids[r] for r in rows], "k": 10}, timeout=30)
        assert status == 200, body
        got = [[h["id"] for h in row] for row in body["results"]]
        assert got == [[i for i in w if i != ids[r]][:10] for w, r in zip(want, rows, strict=True)]


def test_a_scroll_while_another_node_takes_writes(cluster3: Cluster, tmp_path: Path) -> None:
    create(cluster3.nodes[0], replication=1)
    run = subprocess.run(import_cmd(cluster3, tmp_path), cwd=tmp_path, capture_output=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr.decode()
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        rng = np.random.default_rng(1)
        writer_node = cluster3.nodes[1]
        while not stop.is_set():
            new = [{"id": f"w{writes[0]}-{j}", "vector": rng.standard_normal(384).tolist()}
                   for j in range(20)]
            status, body = writer_node.call("POST", "/v1/collections/wn/documents",
                                            {"documents": new}, timeout=30)
            assert status == 200, body
            writer_node.call("POST", "/v1/collections/wn/documents/delete",
                             {"ids": [d["id"] for d in new[:5]]}, timeout=30)
            writes[0] += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: writes[0] > 0, 30, "the writer to get going")
        docs, _ = scroll_all(cluster3.nodes[0], limit=97)
    finally:
        stop.set()
        t.join(60)
    seen = [d["id"] for d in docs]
    assert len(seen) == len(set(seen))
    assert {m["id"] for m in load_sample().base_meta} <= set(seen)
    assert writes[0] > 0


def test_the_shards_of_a_dead_node(cluster3: Cluster, tmp_path: Path) -> None:
    create(cluster3.nodes[0], replication=1)
    run = subprocess.run(import_cmd(cluster3, tmp_path), cwd=tmp_path, capture_output=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr.decode()
    n1 = cluster3.nodes[0]
    status, desc = n1.call("GET", "/v1/collections/wn")
    lost = sorted(st["shard"] for st in desc["shard_states"] if st["replicas"] == ["n3"])
    lost_count = sum(st["count"] for st in desc["shard_states"] if st["replicas"] == ["n3"])
    assert lost and lost_count
    cluster3.nodes[2].kill()
    cluster3.wait_states({"n3": "dead"}, observers=cluster3.nodes[:2])
    status, body = n1.call("POST", "/v1/collections/wn/count", {})
    assert status == 200 and body == {"count": N - lost_count, "partial": True,
                                      "missing_shards": lost}
    status, body = n1.call("POST", "/v1/collections/wn/count", {"allow_partial": False})
    assert status == 503 and body["error"]["code"] == "unavailable"
    status, body = n1.call("POST", "/v1/collections/wn/scroll", {"limit": 1000})
    while status == 200 and body["next_cursor"] is not None:  # until it reaches a lost shard
        status, body = n1.call("POST", "/v1/collections/wn/scroll",
                               {"limit": 1000, "cursor": body["next_cursor"]})
    assert status == 503 and "allow_partial" in body["error"]["message"]
    docs, missing = scroll_all(n1, limit=1000, allow_partial=True)
    assert missing == lost and len(docs) == N - lost_count
