"""One real `aquila serve` process: the exact-search oracle, IVF recall, crash safety and
training that never blocks serving."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import metric_samples
from tests.datasets import Sample, load_sample, recall_at_k
from tests.procs import NodeProc, http, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sample() -> Sample:
    return load_sample()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    n = NodeProc(tmp_path / "node", port=free_port(), train_min=1000, fsync="true")
    yield n.start()
    n.stop()


def ingest(node: NodeProc, name: str, sample: Sample, n: int, batch: int = 500) -> None:
    for start in range(0, n, batch):
        docs = [
            {"id": sample.base_meta[i]["id"], "vector": sample.base[i].tolist(),
             "metadata": sample.base_meta[i]}
            for i in range(start, min(n, start + batch))
        ]
        status, body = node.call("POST", f"/v1/collections/{name}/documents", {"documents": docs})
        assert status == 200, body


def search_ids(node: NodeProc, name: str, queries: np.ndarray, k: int, **extra: object) -> list[list[str]]:
    status, body = node.call(
        "POST", f"/v1/collections/{name}/search",
        {"vectors": queries.tolist(), "k": k, **extra}, timeout=60,
    )
    assert status == 200, body
    return [[h["id"] for h in row] for row in body["results"]]


def test_flat_search_equals_brute_force(node: NodeProc, sample: Sample) -> None:
    n = 3000
    assert node.call("PUT", "/v1/collections/oracle",
                     {"dim": 384, "metric": "cosine", "shards": 4, "index": {"type": "flat"}})[0] == 201
    ingest(node, "oracle", sample, n)
    base = sample.base[:n] / np.linalg.norm(sample.base[:n], axis=1, keepdims=True)
    q = sample.queries[:100] / np.linalg.norm(sample.queries[:100], axis=1, keepdims=True)
    sims = q @ base.T
    # Exact order, ties broken the way a stable sort does.
    want = np.argsort(-sims, axis=1, kind="stable")[:, :20]
    got = search_ids(node, "oracle", sample.queries[:100], 20)
    ids = [m["id"] for m in sample.base_meta[:n]]
    mismatches = 0
    for qi, row in enumerate(got):
        expect = [ids[j] for j in want[qi]]
        if row != expect:
            # Only float ties may reorder; the scores must then be equal.
            s_got = [sims[qi, ids.index(x)] for x in row]
            s_exp = [sims[qi, j] for j in want[qi]]
            assert np.allclose(s_got, s_exp, atol=1e-6), (qi, row, expect)
            mismatches += 1
    assert mismatches <= 2


def test_ivf_recall_at_10(node: NodeProc, sample: Sample) -> None:
    assert node.call("PUT", "/v1/collections/ivf",
                     {"dim": 384, "metric": "cosine", "shards": 2})[0] == 201
    ingest(node, "ivf", sample, len(sample.base))

    def trained() -> bool:
        desc = node.call("GET", "/v1/collections/ivf")[1]
        return all(s["index_state"] == "trained" for s in desc["shard_states"])

    wait_until(trained, 120, "every shard trained")
    got = search_ids(node, "ivf", sample.queries, 10, nprobe=64)
    pos = {m["id"]: i for i, m in enumerate(sample.base_meta)}
    rows = [[pos[x] for x in row] for row in got]
    recall = recall_at_k(rows, sample.gt_I, 10)
    assert recall >= 0.95, recall


def test_sigkill_mid_write_loses_no_acknowledged_write(tmp_path: Path, sample: Sample) -> None:
    node = NodeProc(tmp_path / "crash", port=free_port(), train_min=500).start()
    try:
        assert node.call("PUT", "/v1/collections/c", {"dim": 384, "metric": "cosine", "shards": 3})[0] == 201
        acked: list[str] = []
        inflight: list[list[str]] = []
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set() and i < 400:
                ids = [f"b{i}-{j}" for j in range(50)]
                docs = [{"id": d, "vector": sample.base[(i * 50 + j) % len(sample.base)].tolist(),
                         "metadata": {"batch": i}} for j, d in enumerate(ids)]
                inflight.append(ids)
                try:
                    status, _ = http("POST", node.url + "/v1/collections/c/documents",
                                     {"documents": docs}, timeout=10)
                except OSError:
                    return
                if status != 200:
                    return
                acked.extend(ids)
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        wait_until(lambda: len(acked) >= 3000, 60, "3,000 acknowledged writes")
        node.signal(signal.SIGKILL)
        stop.set()
        t.join(30)
        assert node.proc is not None
        node.proc.wait(10)
        node.start()
        status, desc = node.call("GET", "/v1/collections/c")
        assert status == 200
        present = desc["count"]
        assert present >= len(acked)
        # Every acknowledged id can be fetched and found by its own vector.
        for doc_id in acked[:: max(1, len(acked) // 200)]:
            assert node.call("GET", f"/v1/collections/c/documents/{doc_id}")[0] == 200, doc_id
        i, j = (int(x) for x in acked[-1][1:].split("-"))
        vec = sample.base[(i * 50 + j) % len(sample.base)]
        hits = search_ids(node, "c", vec[None, :], 50, nprobe=64)[0]
        assert any(h.startswith(f"b{i}-") for h in hits)
        # A batch is all or nothing: the one cut off mid-write is wholly present or absent.
        last = inflight[-1]
        seen = [node.call("GET", f"/v1/collections/c/documents/{d}")[0] == 200 for d in last]
        assert all(seen) or not any(seen), seen
        assert present == len(acked) + (len(last) if all(seen) and last[0] not in acked else 0)
    finally:
        node.stop()


def test_training_does_not_block_serving(tmp_path: Path, sample: Sample) -> None:
    node = NodeProc(tmp_path / "train", port=free_port(), train_min=4000).start()
    try:
        # Many lists on few points: a training run long enough to observe.
        assert node.call("PUT", "/v1/collections/t", {
            "dim": 384, "metric": "cosine", "shards": 1, "index": {"type": "ivf_flat", "nlist": 1000}})[0] == 201
        ingest(node, "t", sample, 5000, batch=5000)
        seen_training = False
        worst = 0.0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            assert node.call("GET", "/healthz", timeout=5)[0] == 200
            got = search_ids(node, "t", sample.queries[:1], 5)
            assert len(got[0]) == 5
            worst = max(worst, time.monotonic() - t0)
            state = node.call("GET", "/v1/collections/t")[1]["shard_states"][0]["index_state"]
            seen_training |= state == "training"
            if state == "trained":
                break
        assert state == "trained"
        assert seen_training
        # Generous: the point is that the event loop is never held for the training run.
        assert worst < 3.0, worst
    finally:
        node.stop()


def test_ten_thousand_documents_of_dim_384_in_one_batch(node: NodeProc, sample: Sample) -> None:
    """The contract: a batch of 10,000 documents of dim 384 fits within the default body
    limit, written by Python's json (float64 digits for float32 data: about 75 MiB)."""
    assert node.call("PUT", "/v1/collections/bulk", {"dim": 384, "metric": "cosine"})[0] == 201
    vectors = np.vstack([sample.base, sample.base + np.float32(0.001)])[:10_000]
    docs = [{"id": f"b{i}", "vector": v, "metadata": {"i": i}}
            for i, v in enumerate(vectors.tolist())]
    assert len(json.dumps({"documents": docs})) > 64 * 2**20  # over the limit as sent
    status, body = node.call("POST", "/v1/collections/bulk/documents", {"documents": docs},
                             timeout=120)
    assert status == 200, body
    assert body["upserted"] == 10_000
    assert node.call("GET", "/v1/collections/bulk")[1]["count"] == 10_000


def _metric(node: NodeProc, name: str) -> dict[str, float]:
    """The samples of a /metrics family, by their labels."""
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as resp:  # noqa: S310
        samples = metric_samples(resp.read().decode())
    return {",".join(f"{k}={v}" for k, v in sorted(labels)): got
            for (sample, labels), got in samples.items() if sample == name}


def test_the_start_is_frozen_out_of_the_garbage_collector(node: NodeProc, sample: Sample) -> None:
    """Once ready, what the node's start made is out of the collector's sight (a full
    collection then walks only what came after); collections are counted and timed."""
    frozen = wait_until(lambda: _metric(node, "aquila_gc_frozen_objects").get(""), 30,
                        "the start's objects frozen")
    assert frozen > 10_000
    assert node.call("PUT", "/v1/collections/g", {"dim": 384, "metric": "cosine"})[0] == 201
    ingest(node, "g", sample, 500)
    assert search_ids(node, "g", sample.queries[:20], 5)[0]
    runs = _metric(node, "aquila_gc_collections_total")
    assert set(runs) == {"generation=0", "generation=1", "generation=2"}
    assert runs["generation=0"] > 0
    assert set(_metric(node, "aquila_gc_seconds_total")) == set(runs)
