"""Keys on a real in-process node: the read key reads and nothing else (403 `forbidden`),
the probes are open, and the public keys never open the peer routes, which take a peer
signature (with the API key as the cluster secret when there is none)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from yarl import URL

from aquila.cluster.model.errors import Forbidden, Unauthorized
from aquila.cluster.peers.auth import PeerSigner
from aquila.node.config import NodeConfig
from aquila.node.http.access import check_access
from tests.conftest import Node, StartNode, expect_error, ok_json

FULL = {"Authorization": "Bearer full-key"}
READ = {"Authorization": "Bearer read-key"}
DIM = 2

READS: list[tuple[str, str, Any]] = [
    ("GET", "/v1/collections", None),
    ("GET", "/v1/collections/c", None),
    ("GET", "/v1/collections/c/documents/a", None),
    ("POST", "/v1/collections/c/search", {"vector": [1.0, 0.0], "k": 1}),
    ("GET", "/v1/cluster", None),
    ("GET", "/v1/cluster/shards", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
]
WRITES: list[tuple[str, str, Any]] = [
    ("PUT", "/v1/collections/d", {"dim": DIM}),
    ("PUT", "/v1/collections/c", {"dim": DIM}),
    ("DELETE", "/v1/collections/c", None),
    ("POST", "/v1/collections/c/documents", {"documents": [{"id": "z", "vector": [0, 1]}]}),
    ("POST", "/v1/collections/c/documents/delete", {"ids": ["a"]}),
    ("DELETE", "/v1/collections/c/documents/a", None),
    ("POST", "/v1/cluster/join", {"seeds": ["127.0.0.1:1"]}),
    ("POST", "/v1/cluster/rebalance", {"dry_run": True}),
    ("POST", "/v1/cluster/leave", None),
]


async def keyed(start_node: StartNode, **keys: str) -> Node:
    node = await start_node(**keys)
    resp = await node.client.put("/v1/collections/c", json={"dim": DIM}, headers=FULL)
    assert resp.status in (200, 201), await resp.text()
    resp = await node.client.post(
        "/v1/collections/c/documents", headers=FULL,
        json={"documents": [{"id": "a", "vector": [1, 0]}, {"id": "b", "vector": [0, 1]}]})
    await ok_json(resp)
    return node


async def ids(node: Node) -> list[str]:
    resp = await node.client.post("/v1/collections/c/search", headers=FULL,
                                  json={"vector": [1.0, 0.0], "k": 10})
    return sorted(h["id"] for h in (await ok_json(resp))["results"][0])


async def test_read_key_reads_and_is_forbidden_everything_else(start_node: StartNode) -> None:
    node = await keyed(start_node, api_key="full-key", read_key="read-key")
    c = node.client
    for method, path, body in READS:
        resp = await c.request(method, path, json=body, headers=READ)
        await resp.read()
        assert resp.status == 200, (method, path, resp.status, await resp.text())
    for method, path, body in WRITES:
        resp = await c.request(method, path, json=body, headers=READ)
        await expect_error(resp, 403, "forbidden")
        # Neither key may be guessed at: a wrong one is 401 on reads and writes alike.
        resp = await c.request(method, path, json=body, headers={"Authorization": "Bearer x"})
        await expect_error(resp, 401, "unauthorized")
    resp = await c.post("/v1/collections/c/search", json={"vector": [1, 0]})
    await expect_error(resp, 401, "unauthorized")
    # Nothing the read key tried changed anything.
    assert await ids(node) == ["a", "b"]
    listed = (await ok_json(await c.get("/v1/collections", headers=FULL)))["collections"]
    assert [x["name"] for x in listed] == ["c"]
    # The full key still writes.
    resp = await c.post("/v1/collections/c/documents/delete", json={"ids": ["a"]}, headers=FULL)
    await ok_json(resp)
    assert await ids(node) == ["b"]


async def test_probes_are_open_with_keys_set(start_node: StartNode) -> None:
    node = await start_node(api_key="full-key", read_key="read-key")
    for path in ("/healthz", "/readyz"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, READ):
            resp = await node.client.get(path, headers=headers)
            await resp.read()
            assert resp.status == 200, (path, headers)
    resp = await node.client.get("/metrics")
    await expect_error(resp, 401, "unauthorized")


async def test_read_key_alone_keys_the_node(start_node: StartNode) -> None:
    node = await start_node(read_key="read-key")
    c = node.client
    await expect_error(await c.get("/v1/collections"), 401, "unauthorized")
    await ok_json(await c.get("/v1/collections", headers=READ))
    resp = await c.put("/v1/collections/c", json={"dim": DIM}, headers=READ)
    await expect_error(resp, 403, "forbidden")


async def test_public_keys_never_open_peer_routes(start_node: StartNode) -> None:
    """With an API key and no secret, /internal/* wants a peer signature keyed by the API
    key: the key as a Bearer token is not one."""
    node = await keyed(start_node, api_key="full-key", read_key="read-key")
    c = node.client
    me = (await ok_json(await c.get("/v1/cluster", headers=FULL)))["node"]["id"]
    path = "/internal/v1/collections/c/write"
    body = orjson.dumps({"writes": [{"shard": 0, "docs": []}]})
    for headers in ({}, FULL, READ):
        resp = await c.post(path, data=body, headers=headers)
        await expect_error(resp, 401, "unauthorized")
    # Signed with another secret: refused too.
    raw = URL(path).raw_path_qs
    resp = await c.post(path, data=body, headers=PeerSigner("other", "rogue").headers(
        "POST", raw, body, me))
    await expect_error(resp, 401, "unauthorized")
    # Signed with the API key, as a peer of this cluster signs: accepted, once.
    stats = "/internal/v1/collections/c/stats"
    other = PeerSigner("full-key", "peer").headers("GET", stats, b"", "another-node")
    resp = await c.get(stats, headers=other)
    await expect_error(resp, 401, "unauthorized")
    headers = PeerSigner("full-key", "peer").headers("GET", stats, b"", me)
    resp = await c.get("/internal/v1/collections/c/stats", headers=headers)
    assert set(await ok_json(resp)) != set()
    resp = await c.get("/internal/v1/collections/c/stats", headers=headers)
    await expect_error(resp, 401, "unauthorized")
    assert await ids(node) == ["a", "b"]


@pytest.mark.parametrize(
    ("method", "route", "auth", "outcome"),
    [
        ("HEAD", "/readyz", "", None),
        ("HEAD", "/v1/collections/{name}", "Bearer r", None),
        ("POST", "/v1/collections/{name}/count", "Bearer r", None),
        ("POST", "/v1/collections/{name}/scroll", "Bearer r", None),
        ("POST", "/v1/collections/{name}/documents", "Bearer r", Forbidden),
        ("PATCH", "/v1/collections/x", "Bearer r", Forbidden),
        ("POST", "/v1/collections/{name}/documents", "Bearer k", None),
        ("GET", "/v1/collections", "Bearer é", Unauthorized),
        ("GET", "/v1/collections", "Bearer \udcff", Unauthorized),
        ("GET", "/v1/collections", "Bearer k ", Unauthorized),
        ("GET", "/v1/collections", "Bearer  k", Unauthorized),
        ("GET", "/internal/v1/collections/{name}/stats", "", None),
    ],
)
def test_access_table(method: str, route: str, auth: str, outcome: type[Exception] | None) -> None:
    config = NodeConfig(api_key="k", read_key="r")
    if outcome is None:
        check_access(config, method, route, auth)
    else:
        with pytest.raises(outcome):
            check_access(config, method, route, auth)
    # Without keys everything is open (peer routes are the peer signature's business).
    check_access(NodeConfig(), method, route, "")
