"""Defects found in review of a search fast path and of split batches: what the general path
(orjson, then parse_search) refuses must stay refused by the fast path (node/http/fastsearch.py),
and a split batch leaves its read lock only once every part has ended."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import StartNode, expect_error, wait_for

DIM = 8
# t-batch's fast path takes bodies of 32 KiB and more (FAST_SEARCH_BYTES).
PAD = b" " * (40 * 1024)


async def test_a_nested_vector_stays_refused_whatever_a_filter_string_holds(
    start_node: StartNode,
) -> None:
    node = await start_node()
    await node.create("c", dim=DIM)
    await node.upsert("c", [{"id": "a", "vector": [1.0] * DIM}])
    # Row 0 is [[1], 2, ...]: its first element is a list. The filter's string is "[" written
    # with an escape: one "[" more in its minified form than in the body.
    body = (b'{"vectors": [[[1], 2, 3, 4, 5, 6, 7, 8]], "filter": {"must": [{"key": "t", '
            b'"match": "\\u005b"}]}' + PAD + b"}")
    resp = await node.client.post("/v1/collections/c/search", data=body,
                                  headers={"Content-Type": "application/json"})
    await expect_error(resp, 400, "invalid_vector")
    # The same with the nested row second.
    body = (b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8], [[1], 2, 3, 4, 5, 6, 7, 8]], "filter": '
            b'{"must": [{"key": "t", "match": "\\u005b"}]}' + PAD + b"}")
    resp = await node.client.post("/v1/collections/c/search", data=body,
                                  headers={"Content-Type": "application/json"})
    await expect_error(resp, 400, "invalid_vector")


async def test_a_search_body_over_the_limit_is_refused_by_the_fast_path_too(
    start_node: StartNode,
) -> None:
    limit = 64 * 1024
    node = await start_node(max_body_bytes=limit)
    await node.create("c", dim=DIM)
    await node.upsert("c", [{"id": "a", "vector": [1.0] * DIM}])
    # 1,000 queries of 8 values of 10 significant digits each (as float32 writes them too):
    # about 90 KB, above the limit however it is counted, below twice the limit.
    vecs = np.random.default_rng(5).uniform(0.1, 0.9, (1000, DIM)).astype(np.float32)
    body = ('{"vectors": [' + ",".join(
        "[" + ",".join(f"{float(x):.8f}" for x in row) + "]" for row in vecs) + "]}").encode()
    assert limit < len(body) < 2 * limit
    resp = await node.client.post("/v1/collections/c/search", data=body,
                                  headers={"Content-Type": "application/json"})
    await expect_error(resp, 413, "payload_too_large")
    # Under the limit, the same kind of body is answered.
    small = ('{"vectors": [' + ",".join(
        "[" + ",".join(f"{float(x):.8f}" for x in row) + "]" for row in vecs[:100]) + "]}")
    resp = await node.client.post("/v1/collections/c/search", data=small.encode(),
                                  headers={"Content-Type": "application/json"})
    assert resp.status == 200


async def test_a_failed_part_of_a_split_batch_waits_for_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search returns (or raises) only once no thread of it reads the index any more: the
    read lock it holds is what keeps index updates and swaps away from FAISS."""
    from aquila.node.storage.search import run_batch as real

    blocking = Blocking(2)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(CollectionSpec("c", 4, "l2", 1, 1, IndexSpec("flat")), [0], "u")
    await coll.write({0: [Incoming(f"d{i}", np.full(4, float(i), np.float32), b"{}", 1, "n1")
                          for i in range(10)]})
    running, release = [0], threading.Event()
    lock = threading.Lock()

    def run(c: Any, q: np.ndarray, *args: Any) -> Any:
        with lock:
            running[0] += 1
        try:
            if q[0, 0] < 0:  # the part that fails
                raise RuntimeError("a part failed")
            release.wait(5)  # the part still searching
            return real(c, q, *args)
        finally:
            with lock:
                running[0] -= 1

    q = np.ones((128, 4), np.float32)
    q[0] = -1.0  # the first part fails at once; the others are still in FAISS
    monkeypatch.setattr("aquila.node.storage.collection.run_batch", run)
    try:
        with pytest.raises(RuntimeError):
            await coll.search(q, 3, None)
        still = running[0]
    finally:
        release.set()
    await wait_for(lambda: running[0] == 0, 10, what="the parts to end")
    await engine.close()
    blocking.close()
    assert still == 0, f"{still} part(s) still read the index after the search ended"
