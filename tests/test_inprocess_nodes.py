"""`make_app` with its clock, transport and peers given: two real nodes (engine, RocksDB,
FAISS, the HTTP API) in one process, talking to each other over the in-memory network, with a
clock that never moves. Their public API answers as over real sockets."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from aquila.cluster.clock import ManualClock
from aquila.cluster.membership.memnet import MemNetwork
from aquila.cluster.peers.memory import MemoryPeerNet
from aquila.node.app import make_app
from aquila.node.config import load_config
from aquila.node.keys import READY, SERVICE
from tests.conftest import brute_force, free_port, ok_json, wait_for


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], TestClient[Any, Any]]]:
    clock = ManualClock()
    net = MemNetwork(clock, random.Random(0))
    hub = MemoryPeerNet(net, clock)
    clients = []
    async with AsyncExitStack() as stack:
        first_addr = None
        for name in ("a", "b"):
            flags: dict[str, Any] = {"data_dir": tmp_path / name, "port": free_port(),
                                     "node_id": name, "search_threads": 2}
            if first_addr is not None:
                flags["seeds"] = first_addr
            config = load_config(flags, environ={})
            app = make_app(config, clock=clock, transport=net.transport(config.addr),
                           peers=hub.client(config.addr))
            client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1",
                                                                 port=config.port))
            await client.start_server()
            stack.push_async_callback(client.close)
            service = app[SERVICE]
            hub.serve(config.addr, service.peer_service)
            net.serve_push_pull(config.addr, service.gossip.handle_push_pull)
            await wait_for(lambda app=app: app[READY].is_set(), what=f"{name} ready")
            first_addr = first_addr or config.addr
            clients.append(client)
        yield clients[0], clients[1]


async def test_two_nodes_over_the_memory_network(
    pair: tuple[TestClient[Any, Any], TestClient[Any, Any]],
) -> None:
    a, b = pair
    cluster = await ok_json(await a.get("/v1/cluster"))
    assert {m["id"]: m["state"] for m in cluster["members"]} == {"a": "alive", "b": "alive"}
    desc = await ok_json(await a.put("/v1/collections/c", json={
        "dim": 8, "shards": 4, "replication": 1, "index": {"type": "flat"}}), 201)
    # Shards on both: every write, get and search below crosses the memory network.
    assert {r for st in desc["shard_states"] for r in st["replicas"]} == {"a", "b"}
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    docs = [{"id": f"d{i}", "vector": x[i].tolist(), "metadata": {"i": i}} for i in range(200)]
    await ok_json(await b.post("/v1/collections/c/documents",
                               json={"documents": docs, "consistency": "all"}))
    for client in (a, b):
        assert (await ok_json(await client.get("/v1/collections/c")))["count"] == 200
        for i in (3, 7, 11, 42):
            got = await ok_json(await client.get(f"/v1/collections/c/documents/d{i}?vector=true"))
            assert got["metadata"] == {"i": i} and np.allclose(got["vector"], x[i])
    q = rng.standard_normal((5, 8)).astype(np.float32)
    rows, _ = brute_force(x, q, 10, "l2")
    for client in (a, b):
        body = await ok_json(await client.post("/v1/collections/c/search",
                                               json={"vectors": q.tolist(), "k": 10}))
        assert not body["partial"]
        assert [[h["id"] for h in row] for row in body["results"]] == \
            [[f"d{j}" for j in row] for row in rows]


async def test_filtered_search_and_its_plans_across_two_nodes(
    pair: tuple[TestClient[Any, Any], TestClient[Any, Any]],
) -> None:
    """Each shard filters where it lives; the plans come back from both nodes."""
    a, b = pair
    await ok_json(await a.put("/v1/collections/f", json={
        "dim": 8, "shards": 4, "replication": 1, "index": {"type": "flat"}}), 201)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    docs = [{"id": f"d{i}", "vector": x[i].tolist(), "metadata": {"g": i % 3}}
            for i in range(300)]
    await ok_json(await b.post("/v1/collections/f/documents",
                               json={"documents": docs, "consistency": "all"}))
    q = rng.standard_normal((3, 8)).astype(np.float32)
    keep = np.array([i % 3 == 1 for i in range(300)])
    rows, _ = brute_force(x[keep], q, 10, "l2")
    ids = np.flatnonzero(keep)
    for client in (a, b):
        body = await ok_json(await client.post("/v1/collections/f/search", json={
            "vectors": q.tolist(), "k": 10, "explain": True,
            "filter": {"must": [{"key": "g", "match": 1}]}}))
        assert [[h["id"] for h in row] for row in body["results"]] == \
            [[f"d{ids[j]}" for j in row] for row in rows]
        plans = body["plans"]
        assert [p["shard"] for p in plans] == [0, 1, 2, 3]
        assert {p["node"] for p in plans} == {"a", "b"}
        assert {p["path"] for p in plans} == {"exact"}
        assert sum(p["matches"] for p in plans) == 100
        assert sum(p["documents"] for p in plans) == 300
