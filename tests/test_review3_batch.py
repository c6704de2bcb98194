"""Defects found in review of t-batch's search fast path (node/http/fastsearch.py): what the
general path (orjson, then parse_search) refuses must stay refused. These pass on main (the
general path only) and fail with t-batch's fast path; skipped until its author fixes them."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import StartNode, expect_error

DIM = 8
# t-batch's fast path takes bodies of 32 KiB and more (FAST_SEARCH_BYTES).
PAD = b" " * (40 * 1024)


@pytest.mark.skip(reason="defect in t-batch: fastsearch.search_from_json counts '[' of the "
                         "other fields in their minified form, where an escaped '\\u005b' in a "
                         "string is a literal '[', so one nested array in a vector is not seen")
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


@pytest.mark.skip(reason="defect in t-batch: api.search hands bodies of up to twice "
                         "max_body_bytes (max_wire_bytes) to the fast path, which never applies "
                         "the body limit that decode_body applies (413 payload_too_large)")
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
