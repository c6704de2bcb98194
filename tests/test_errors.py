"""Every error of the contract over real HTTP: status, `{"error": {"code", "message"}}` with
the exact code, and that a rejected request changes nothing."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientResponse

from aquila.node.keys import SERVICE
from tests.conftest import Node, StartNode, expect_error, ok_json

DIM = 4
GOOD = [0.1, 0.2, 0.3, 0.4]


@pytest.fixture
async def coll(node: Node) -> Node:
    """`node` with a collection "c" (dim 4) holding one document "keep"."""
    await node.create("c", dim=DIM, shards=2)
    await node.upsert("c", [{"id": "keep", "vector": GOOD, "metadata": {"k": 1}}])
    return node


async def raw_post(node: Node, path: str, data: bytes | str) -> ClientResponse:
    return await node.client.post(path, data=data, headers={"Content-Type": "application/json"})


async def count(node: Node, name: str = "c") -> int:
    return int((await node.describe(name))["count"])


BODY_ROUTES = [
    ("PUT", "/v1/collections/new"),
    ("POST", "/v1/collections/c/documents"),
    ("POST", "/v1/collections/c/documents/delete"),
    ("POST", "/v1/collections/c/search"),
]


# -- bodies ---------------------------------------------------------------------------------
MALFORMED = [
    b"{",
    b'{"dim": 4,}',
    b"not json",
    b"",
    b"\xff\xfe",
    b"[1, 2",
    b'{"a": NaN}',
    b"{'a': 1}",
]
NON_OBJECTS: list[Any] = [[], [{"dim": 4}], "text", 3, True, None]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_malformed_json(coll: Node, method: str, path: str) -> None:
    for raw in MALFORMED:
        resp = await coll.client.request(
            method, path, data=raw, headers={"Content-Type": "application/json"}
        )
        await expect_error(resp, 400, "bad_request")
    assert await count(coll) == 1
    await expect_error(await coll.client.get("/v1/collections/new"), 404, "not_found")


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_non_object_body(coll: Node, method: str, path: str) -> None:
    for body in NON_OBJECTS:
        raw = json.dumps(body).encode()
        resp = await coll.client.request(
            method, path, data=raw, headers={"Content-Type": "application/json"}
        )
        await expect_error(resp, 400, "bad_request")
    assert await count(coll) == 1
    await expect_error(await coll.client.get("/v1/collections/new"), 404, "not_found")


@pytest.mark.parametrize(
    ("doc", "code"),
    [
        ({"id": "x"}, "bad_request"),  # missing vector
        ({"id": "x", "vector": GOOD, "metadata": []}, "bad_request"),
        ({"id": "x", "vector": GOOD, "metadata": "m"}, "bad_request"),
        ({"id": "x", "vector": GOOD, "metadata": 1}, "bad_request"),
        ({"id": "x" * 257, "vector": GOOD}, "bad_request"),
        ({"id": "", "vector": GOOD}, "bad_request"),
        ({"id": 7, "vector": GOOD}, "bad_request"),
        ({"id": ["x"], "vector": GOOD}, "bad_request"),
        ({"id": True, "vector": GOOD}, "bad_request"),
        ({"id": "x", "vector": GOOD, "extra": 1}, "bad_request"),
        ({"id": "x", "vector": [0.1, 0.2, 0.3]}, "dimension_mismatch"),
        ({"id": "x", "vector": [0.1] * 5}, "dimension_mismatch"),
        ({"id": "x", "vector": []}, "dimension_mismatch"),
        ({"id": "x", "vector": [0.1, 0.2, "0.3", 0.4]}, "invalid_vector"),
        ({"id": "x", "vector": [0.1, 0.2, "x", 0.4]}, "invalid_vector"),
        ({"id": "x", "vector": [0.1, 0.2, True, 0.4]}, "invalid_vector"),
        ({"id": "x", "vector": [0.1, 0.2, None, 0.4]}, "invalid_vector"),
        ({"id": "x", "vector": [0.1, 0.2, [0.3], 0.4]}, "invalid_vector"),
        ({"id": "x", "vector": [0.1, 0.2, {"v": 1}, 0.4]}, "invalid_vector"),
        ({"id": "x", "vector": [0.1, 0.2, 1e39, 0.4]}, "invalid_vector"),  # overflows float32
        ({"id": "x", "vector": "0.1,0.2,0.3,0.4"}, "invalid_vector"),
        ({"id": "x", "vector": {"0": 1}}, "invalid_vector"),
        ({"id": "x", "vector": None}, "invalid_vector"),
        ("not a document", "bad_request"),
    ],
)
async def test_bad_document(coll: Node, doc: Any, code: str) -> None:
    resp = await coll.client.post("/v1/collections/c/documents", json={"documents": [doc]})
    await expect_error(resp, 400, code)
    assert await count(coll) == 1
    await expect_error(await coll.client.get("/v1/collections/c/documents/x"), 404, "not_found")


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1e309"])
async def test_infinite_numbers_are_invalid_vectors(coll: Node, number: str) -> None:
    # JSON cannot carry NaN or Inf literals, but a number too large for a double parses to
    # ±inf: that is an invalid vector, not malformed JSON.
    raw = '{"documents": [{"id": "x", "vector": [0.1, ' + number + ", 0.3, 0.4]}]}"
    msg = await expect_error(
        await raw_post(coll, "/v1/collections/c/documents", raw), 400, "invalid_vector"
    )
    assert "documents[0]" in msg
    assert await count(coll) == 1
    raw = '{"vector": [0.1, ' + number + ", 0.3, 0.4]}"
    await expect_error(await raw_post(coll, "/v1/collections/c/search", raw), 400, "invalid_vector")


async def test_infinite_number_outside_a_vector_is_bad_request(coll: Node) -> None:
    raw = '{"documents": [{"id": "x", "vector": [0.1, 0.2, 0.3, 0.4], "metadata": {"n": 1e400}}]}'
    await expect_error(await raw_post(coll, "/v1/collections/c/documents", raw), 400, "bad_request")
    raw = '{"vector": [0.1, 0.2, 0.3, 0.4], "filter": {"must": [{"key": "n", "range": {"lt": 1e400}}]}}'
    await expect_error(await raw_post(coll, "/v1/collections/c/search", raw), 400, "bad_request")
    assert await count(coll) == 1


async def test_upsert_body_shapes(coll: Node) -> None:
    for body in (
        {},
        {"documents": []},
        {"documents": {"id": "x", "vector": GOOD}},
        {"documents": [{"id": "x", "vector": GOOD}], "consistency": "most"},
        # A misspelt field is refused, not ignored (here: a quorum write nobody asked for).
        {"documents": [{"id": "x", "vector": GOOD}], "consistancy": "all"},
        {"documents": [{"id": "x", "vector": GOOD}], "ids": ["x"]},
    ):
        resp = await coll.client.post("/v1/collections/c/documents", json=body)
        await expect_error(resp, 400, "bad_request")
    for consistency in ("one", "quorum", "all"):
        body = {"documents": [{"id": consistency, "vector": GOOD}], "consistency": consistency}
        await ok_json(await coll.client.post("/v1/collections/c/documents", json=body))
    # The longest id is fine.
    await coll.upsert("c", [{"id": "y" * 256, "vector": GOOD}])
    assert await count(coll) == 5


BAD_AT_3: list[tuple[Any, str]] = [
    ({"id": "bad", "vector": [0.1, 0.2, 0.3]}, "dimension_mismatch"),
    ({"id": "bad", "vector": [0.1, 0.2, "x", 0.4]}, "invalid_vector"),
    ({"id": "bad", "vector": [0.1, 0.2, "7", 0.4]}, "invalid_vector"),
    ({"id": "bad", "vector": [0.1, 0.2, False, 0.4]}, "invalid_vector"),
    ({"id": "bad", "vector": [0.1, 0.2, None, 0.4]}, "invalid_vector"),
    ({"id": "bad", "vector": [0.1, 0.2, 3e38 * 10, 0.4]}, "invalid_vector"),
    ({"id": "bad"}, "bad_request"),
    ({"id": "", "vector": GOOD}, "bad_request"),
    ({"id": "z" * 257, "vector": GOOD}, "bad_request"),
    ({"id": "bad", "vector": GOOD, "metadata": [1]}, "bad_request"),
    (["bad"], "bad_request"),
]


@pytest.mark.parametrize(("bad", "code"), BAD_AT_3)
async def test_batch_with_one_bad_document_is_rejected_whole(
    coll: Node, bad: Any, code: str
) -> None:
    good = [{"id": f"g{i}", "vector": [i, 0, 0, 0], "metadata": {"i": i}} for i in range(6)]
    docs = [*good[:3], bad, *good[3:]]
    resp = await coll.client.post("/v1/collections/c/documents", json={"documents": docs})
    msg = await expect_error(resp, 400, code)
    assert "documents[3]" in msg, msg
    assert await count(coll) == 1
    for g in good:
        resp = await coll.client.get(f"/v1/collections/c/documents/{g['id']}")
        await expect_error(resp, 404, "not_found")
    res = await coll.search("c", vector=[0, 0, 0, 0], k=10)
    assert [h["id"] for h in res["results"][0]] == ["keep"]


async def test_batch_with_bad_document_does_not_replace_existing(coll: Node) -> None:
    docs = [
        {"id": "keep", "vector": [9, 9, 9, 9], "metadata": {"k": 2}},
        {"id": "new", "vector": [1, 1, 1]},
    ]
    resp = await coll.client.post("/v1/collections/c/documents", json={"documents": docs})
    assert "documents[1]" in await expect_error(resp, 400, "dimension_mismatch")
    doc = await ok_json(await coll.client.get("/v1/collections/c/documents/keep?vector=true"))
    assert doc["metadata"] == {"k": 1}
    assert doc["vector"] == pytest.approx(GOOD)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ids": "keep"},
        {"ids": [1]},
        {"ids": [""]},
        {"ids": ["keep", "x" * 257]},
        {"ids": [None]},
        {"ids": ["keep"], "consistancy": "all"},
        {"ids": ["keep"], "documents": []},
    ],
)
async def test_bad_delete_batch(coll: Node, body: Any) -> None:
    resp = await coll.client.post("/v1/collections/c/documents/delete", json=body)
    await expect_error(resp, 400, "bad_request")
    assert await count(coll) == 1


async def test_too_long_id_in_url(coll: Node) -> None:
    long_id = "x" * 257
    await expect_error(
        await coll.client.get(f"/v1/collections/c/documents/{long_id}"), 400, "bad_request"
    )
    await expect_error(
        await coll.client.delete(f"/v1/collections/c/documents/{long_id}"), 400, "bad_request"
    )


# -- limits ---------------------------------------------------------------------------------
async def test_body_over_limit(start_node: StartNode) -> None:
    node = await start_node(max_body_bytes=4096)
    await node.create("c", dim=DIM)
    docs = [{"id": f"d{i}", "vector": GOOD} for i in range(200)]  # ~8 KB of JSON
    resp = await node.client.post("/v1/collections/c/documents", json={"documents": docs})
    await expect_error(resp, 413, "payload_too_large")
    assert await count(node) == 0

    # Without a Content-Length (chunked), the limit holds while reading.
    async def chunks() -> Any:
        for i in range(10):
            yield b'{"documents": [' if i == 0 else b" " * 1000

    resp = await node.client.post(
        "/v1/collections/c/documents",
        data=chunks(),
        headers={"Content-Type": "application/json"},
    )
    await expect_error(resp, 413, "payload_too_large")
    resp = await node.client.post("/v1/collections/c/search", json={"vectors": [GOOD] * 400})
    await expect_error(resp, 413, "payload_too_large")

    # The node still serves, and bodies under the limit go through.
    assert await ok_json(await node.client.get("/healthz")) == {"status": "ok"}
    await node.upsert("c", docs[:20])
    assert await count(node) == 20


async def test_body_limit_counts_vectors_at_float32_precision(start_node: StartNode) -> None:
    """The contract's promise that 10,000 × 384 fits in 64 MiB holds however a client's JSON
    library spells float32 values (Python's json spends float64 digits on them): the limit
    measures vectors at float32 precision. Scaled down: 40 × 384 in a 256 KiB limit."""
    node = await start_node(max_body_bytes=256 * 1024)
    await node.create("big", dim=384)
    vecs = np.random.default_rng(3).standard_normal((40, 384)).astype(np.float32)
    docs = [{"id": f"v{i}", "vector": vecs[i].tolist()} for i in range(40)]
    raw = json.dumps({"documents": docs}).encode()
    assert 256 * 1024 < len(raw) < 2 * 256 * 1024
    resp = await node.client.post("/v1/collections/big/documents", data=raw,
                                  headers={"Content-Type": "application/json"})
    assert (await ok_json(resp))["upserted"] == 40
    # The same bytes spent on anything but vector digits are over the limit.
    padded = {"documents": [{"id": "p", "vector": GOOD * 96, "metadata": {"t": "x" * len(raw)}}]}
    resp = await node.client.post("/v1/collections/big/documents", json=padded)
    await expect_error(resp, 413, "payload_too_large")
    # So is junk of that size, and anything beyond twice the limit is refused unread.
    resp = await node.client.post("/v1/collections/big/documents", data=b"[" * len(raw),
                                  headers={"Content-Type": "application/json"})
    await expect_error(resp, 413, "payload_too_large")
    resp = await node.client.post("/v1/collections/big/documents", data=raw * 2,
                                  headers={"Content-Type": "application/json"})
    await expect_error(resp, 413, "payload_too_large")
    assert await count(node, "big") == 40


# -- not found ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/collections/ghost", None),
        ("DELETE", "/v1/collections/ghost", None),
        ("POST", "/v1/collections/ghost/documents", {"documents": [{"vector": GOOD}]}),
        ("POST", "/v1/collections/ghost/documents/delete", {"ids": ["a"]}),
        ("GET", "/v1/collections/ghost/documents/a", None),
        ("GET", "/v1/collections/ghost/documents/a?vector=true", None),
        ("DELETE", "/v1/collections/ghost/documents/a", None),
        ("POST", "/v1/collections/ghost/search", {"vector": GOOD}),
    ],
)
async def test_unknown_collection(coll: Node, method: str, path: str, body: Any) -> None:
    resp = await coll.client.request(method, path, json=body)
    assert "ghost" in await expect_error(resp, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/v1"),
        ("GET", "/v1/collection"),
        ("POST", "/v1/collections/c/nothing"),
    ],
)
async def test_unknown_route(coll: Node, method: str, path: str) -> None:
    await expect_error(await coll.client.request(method, path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/collections/c/documents", "POST"),
        ("PATCH", "/v1/collections/c", "PUT"),
        ("POST", "/healthz", "GET"),
    ],
)
async def test_wrong_method(coll: Node, method: str, path: str, allowed: str) -> None:
    resp = await coll.client.request(method, path)
    assert allowed in resp.headers["Allow"]
    await expect_error(resp, 405, "method_not_allowed")


# -- auth -----------------------------------------------------------------------------------
PUBLIC_ROUTES: list[tuple[str, str, Any, int]] = [
    ("GET", "/metrics", None, 200),
    ("GET", "/openapi.json", None, 200),
    ("GET", "/v1/collections", None, 200),
    ("GET", "/v1/cluster", None, 200),
    ("GET", "/v1/cluster/shards", None, 200),
    ("PUT", "/v1/collections/c", {"dim": DIM}, 200),
    ("GET", "/v1/collections/c", None, 200),
    ("POST", "/v1/collections/c/documents", {"documents": [{"id": "a", "vector": GOOD}]}, 200),
    ("GET", "/v1/collections/c/documents/a", None, 200),
    ("POST", "/v1/collections/c/search", {"vector": GOOD}, 200),
    ("POST", "/v1/collections/c/documents/delete", {"ids": ["zz"]}, 200),
    ("DELETE", "/v1/collections/c/documents/a", None, 200),
    ("DELETE", "/v1/collections/c", None, 200),
    ("GET", "/no/such/route", None, 404),
]


async def test_api_key(start_node: StartNode) -> None:
    node = await start_node(api_key="s3cret")
    c = node.client
    good = {"Authorization": "Bearer s3cret"}
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
        {"Authorization": "Bearer s3cret2"},
        {"Authorization": "bearer s3cret"},
        {"Authorization": "Bearer"},
        {"X-Api-Key": "s3cret"},
    ]
    # The probes, /healthz and /readyz, need no key.
    assert await ok_json(await c.get("/healthz")) == {"status": "ok"}
    assert await ok_json(await c.get("/healthz", headers={"Authorization": "Bearer x"})) == {
        "status": "ok"
    }
    for headers in bad_headers:
        resp = await c.get("/readyz", headers=headers)
        await resp.read()
        assert resp.status == 200, (headers, resp.status)
    await c.put("/v1/collections/c", json={"dim": DIM}, headers=good)
    for method, path, body, status in PUBLIC_ROUTES:
        for headers in bad_headers:
            resp = await c.request(method, path, json=body, headers=headers)
            await expect_error(resp, 401, "unauthorized")
        # The rejected requests changed nothing: e.g. the DELETEs below still find what
        # they delete.
        resp = await c.request(method, path, json=body, headers=good)
        await resp.read()
        assert resp.status == status, (method, path, resp.status, await resp.text())
    resp = await c.get("/v1/collections", headers=good)
    assert await ok_json(resp) == {"collections": []}
    # Cluster operations are public routes too (only refused here: they would act).
    for path, body in (
        ("/v1/cluster/join", {"seeds": ["127.0.0.1:1"]}),
        ("/v1/cluster/leave", None),
        ("/v1/cluster/rebalance", {"dry_run": True}),
    ):
        for headers in bad_headers:
            resp = await c.post(path, json=body, headers=headers)
            await expect_error(resp, 401, "unauthorized")


async def test_no_api_key_needs_no_header(node: Node) -> None:
    await ok_json(await node.client.get("/v1/collections"))
    resp = await node.client.get("/v1/collections", headers={"Authorization": "Bearer any"})
    await ok_json(resp)


# -- search ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"vector": GOOD, "k": 0}, "bad_request"),
        ({"vector": GOOD, "k": 1001}, "bad_request"),
        ({"vector": GOOD, "k": -1}, "bad_request"),
        ({"vector": GOOD, "k": "10"}, "bad_request"),
        ({"vector": GOOD, "k": 2.5}, "bad_request"),
        ({"vector": GOOD, "k": True}, "bad_request"),
        ({"vector": GOOD, "k": None}, "bad_request"),
        ({"vector": GOOD, "vectors": [GOOD]}, "bad_request"),
        ({"k": 3}, "bad_request"),
        ({"vectors": []}, "bad_request"),
        ({"vectors": GOOD}, "invalid_vector"),
        ({"vectors": "x"}, "bad_request"),
        ({"vector": [0.1, 0.2]}, "dimension_mismatch"),
        ({"vectors": [GOOD, [0.1, 0.2, 0.3, 0.4, 0.5]]}, "dimension_mismatch"),
        ({"vector": [0.1, 0.2, "0.3", 0.4]}, "invalid_vector"),
        ({"vector": [0.1, 0.2, True, 0.4]}, "invalid_vector"),
        ({"vectors": [GOOD, [0.1, 0.2, False, 0.4]]}, "invalid_vector"),
        ({"vectors": [GOOD, [0.1, 0.2, "5", 0.4]]}, "invalid_vector"),
        ({"vector": [0.1, 0.2, None, 0.4]}, "invalid_vector"),
        ({"vector": "0.1 0.2 0.3 0.4"}, "invalid_vector"),
        ({"vector": GOOD, "nprobe": 0}, "bad_request"),
        ({"vector": GOOD, "nprobe": "4"}, "bad_request"),
        ({"vector": GOOD, "include": ["metadata", "score"]}, "bad_request"),
        ({"vector": GOOD, "include": "vector"}, "bad_request"),
        ({"vector": GOOD, "allow_partial": "yes"}, "bad_request"),
        ({"vector": GOOD, "timeout_ms": 0}, "bad_request"),
        ({"vector": GOOD, "topk": 3}, "bad_request"),
        ({"vector": GOOD, "filter": []}, "bad_request"),
        ({"vector": GOOD, "filter": {"must": {"key": "a", "match": 1}}}, "bad_request"),
        ({"vector": GOOD, "filter": {"must": [{"key": "a"}]}}, "bad_request"),
        ({"vector": GOOD, "filter": {"must": [{"match": 1}]}}, "bad_request"),
        (
            {"vector": GOOD, "filter": {"must": [{"key": "a", "match": 1, "in": [1]}]}},
            "bad_request",
        ),
        ({"vector": GOOD, "filter": {"must": [{"key": "a", "match": [1]}]}}, "bad_request"),
        ({"vector": GOOD, "filter": {"must": [{"key": "a", "in": 1}]}}, "bad_request"),
        (
            {"vector": GOOD, "filter": {"must": [{"key": "a", "range": {"gte": "1"}}]}},
            "bad_request",
        ),
        ({"vector": GOOD, "filter": {"must": [{"key": "a", "range": {"eq": 1}}]}}, "bad_request"),
        ({"vector": GOOD, "filter": {"must": [{"key": "a", "range": {}}]}}, "bad_request"),
        ({"vector": GOOD, "filter": {"should": [{"key": "", "match": 1}]}}, "bad_request"),
        ({"vector": GOOD, "filter": {"not": []}}, "bad_request"),
    ],
)
async def test_bad_search(coll: Node, body: dict[str, Any], code: str) -> None:
    resp = await coll.client.post("/v1/collections/c/search", json=body)
    await expect_error(resp, 400, code)


async def test_search_k_bounds_accepted(coll: Node) -> None:
    for k in (1, 1000):
        res = await coll.search("c", vector=GOOD, k=k)
        assert [h["id"] for h in res["results"][0]] == ["keep"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/internal/v1/collections/c/write", b"{}"),
        ("/internal/v1/collections/c/write", b"[1]"),
        ("/internal/v1/collections/c/write", b'{"writes": [{"shard": 0, "docs": [{"id": 1}]}]}'),
        ("/internal/v1/collections/c/search", b'{"vectors": "%%%", "nq": 1}'),
        ("/internal/v1/collections/c/get", b'{"shard": "x"}'),
        ("/internal/v1/state", b'[{"spec": 1}]'),
        ("/internal/v1/state", b"not json"),
    ],
)
async def test_malformed_peer_requests_are_400(coll: Node, path: str, body: bytes) -> None:
    resp = await coll.client.post(path, data=body, headers={"Content-Type": "application/json"})
    await expect_error(resp, 400, "bad_request")
    assert await count(coll) == 1


async def test_push_pull_to_a_node_whose_gossip_has_stopped_is_503(node: Node) -> None:
    """A node shutting down refuses push-pulls with a retryable 503, not an internal error."""
    await node.client.server.app[SERVICE].gossip.stop()
    resp = await node.client.post("/internal/v1/pushpull", data=b"\x00" * 40)
    message = await expect_error(resp, 503, "unavailable")
    assert "stopped" in message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/cluster/rebalance", b'{"dryrun": true}'),  # misspelt: would be a real rebalance
        ("/v1/cluster/rebalance", b"null"),
        ("/v1/cluster/rebalance", b'{"dry_run": "yes"}'),
        ("/v1/cluster/join", b'{"seeds": "127.0.0.1:1"}'),  # the contract's is a list
        ("/v1/cluster/join", b'{"seeds": ["127.0.0.1:1"], "force": true}'),
        ("/v1/cluster/join", b"null"),
        ("/v1/cluster/leave", b'{"now": true}'),
        ("/v1/cluster/leave", b"[]"),
    ],
)
async def test_admin_bodies_are_checked(coll: Node, path: str, body: bytes) -> None:
    await expect_error(await raw_post(coll, path, body), 400, "bad_request")
    info = await ok_json(await coll.client.get("/v1/cluster"))
    assert len(info["members"]) == 1  # still a member of its own cluster of one
    assert await count(coll) == 1


@pytest.mark.parametrize("number", ["123456789012345678901234567890", "18446744073709551616",
                                    "-9223372036854775809", "1" + "0" * 400])
async def test_an_integer_beyond_64_bits_is_refused_not_rounded(coll: Node, number: str) -> None:
    vector = '"vector": [0.1, 0.2, 0.3, 0.4]'
    doc = '{"id": "big", ' + vector + ', "metadata": {"n": ' + number + "}}"
    for body in ('{"documents": [' + doc + "]}",
                 "{" + vector + ', "filter": {"must": [{"key": "n", "match": ' + number + "}]}}"):
        path = "/v1/collections/c/" + ("documents" if "documents" in body else "search")
        msg = await expect_error(await raw_post(coll, path, body), 400, "bad_request")
        assert "beyond 64 bits" in msg, msg
    assert await count(coll) == 1


async def test_integers_within_64_bits_and_long_digit_strings_are_kept(coll: Node) -> None:
    meta = ('{"u": 18446744073709551615, "i": -9223372036854775808, "s": '
            '"1234567890123456789012345 and more", "f": 1.234567890123456789012345e5}')
    body = ('{"documents": [{"id": "wide", "vector": [0.1, 0.2, 0.3, 0.4], "metadata": '
            + meta + "}]}")
    await ok_json(await raw_post(coll, "/v1/collections/c/documents", body))
    doc = await ok_json(await coll.client.get("/v1/collections/c/documents/wide"))
    assert doc["metadata"] == json.loads(meta)
