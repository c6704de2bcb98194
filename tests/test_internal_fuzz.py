"""Fuzz the peer routes (`/internal/v1/...`) of one real node in-process (real engine,
RocksDB and FAISS in a tmp dir): random bodies and mutated valid ones are answered with a 2xx
or a 4xx/503 in the contract's error shape, never a 500, and the node keeps serving.

Hypothesis drives the examples from a worker thread (it has no async support); each request
runs on the test's event loop through `run_coroutine_threadsafe`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aquila.cluster.membership.messages import PushPull, to_obj
from aquila.cluster.membership.table import MemberRow
from aquila.cluster.model.documents import Incoming
from aquila.cluster.peers.client import FRAME_TYPE
from aquila.cluster.replication import frames
from aquila.node.keys import SERVICE
from tests.conftest import Node, ok_json
from tests.fuzz import dumps, mutate

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def valid_bodies(node: Node) -> dict[str, Any]:
    """One valid body per route, for collection "c" of `node` as its map has it."""
    cluster = node.client.app[SERVICE]
    entry = cluster.runtime.state.get("c")
    assert entry is not None
    vec = base64.b64encode(np.array([1.0, 2.0], dtype="<f4").tobytes()).decode()
    doc = {"id": "fz", "v": vec, "m": {"k": [1, {"x": "y"}]}, "ver": 5 << 16, "w": "peer"}
    push_pull = to_obj(PushPull(False, (MemberRow("z", "10.0.0.9:8470", "alive", 3, {}),),
                                cluster.runtime.state.encode()))
    return {
        "write": {"spec": entry.spec.to_json(), "uid": entry.uid,
                  "writes": [{"shard": 0, "docs": [doc, {**doc, "id": "gone", "v": None}]}]},
        "search": {"vectors": vec, "nq": 1, "k": 3, "nprobe": 4, "shards": [0, 1],
                   "include": ["metadata", "vector"],
                   "filter": {"must": [{"key": "a", "in": [1, 2]}],
                              "must_not": [{"key": "b", "range": {"gte": 1}}]}},
        "get": {"shard": 0, "id": "keep"},
        "count": {"shards": [0, 1], "filter": {"must": [{"key": "a", "match": 1}]}},
        "scroll": {"shard": 1, "after": "a", "limit": 5, "vector": True,
                   "filter": {"should": [{"key": "a", "range": {"lt": 3}}]}},
        "stream": {"shard": 1, "after": None, "limit": 10},
        "digests": {"shard": 0, "buckets": 256},
        "buckets": {"shard": 0, "buckets": [0, 7, 255], "of": 256},
        "purge": {"shard": 0, "before": 1 << 16},
        "drop_shard": {"shard": 1},
        "state": [entry.to_json()],
        "pushpull": push_pull,
    }


def url(route: str) -> str:
    if route in ("state", "pushpull"):
        return f"/internal/v1/{route}"
    return f"/internal/v1/collections/c/{route}"


@pytest.fixture
async def coll(node: Node) -> Node:
    await node.create("c", 2, shards=2)
    await node.upsert("c", [{"id": "keep", "vector": [1.0, 2.0], "metadata": {"a": 1}}])
    return node


async def fuzz_routes(node: Node, bodies: st.SearchStrategy[tuple[str, bytes]]) -> list[int]:
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    async def send(route: str, body: bytes) -> tuple[int, Any]:
        kind = "application/json"
        if route.endswith(FRAME):
            route, kind = route.removesuffix(FRAME), FRAME_TYPE
        resp = await node.client.post(url(route), data=body, headers={"Content-Type": kind})
        raw = await resp.read()
        return resp.status, raw

    @FUZZ
    @given(bodies)
    def check(case: tuple[str, bytes]) -> None:
        route, body = case
        status, raw = asyncio.run_coroutine_threadsafe(send(route, body), loop).result(60)
        seen.append(status)
        assert status < 500 or status == 503, (route, body[:300], status, raw[:300])
        if status >= 400:
            err = orjson.loads(raw)["error"]
            assert set(err) == {"code", "message"} and err["code"] != "internal", err

    await asyncio.to_thread(check)
    health = await node.client.get("/healthz")
    assert (await ok_json(health))["status"] == "ok"
    return seen


ROUTES = ["write", "search", "get", "count", "scroll", "stream", "digests", "buckets", "purge", "drop_shard",
          "state", "pushpull"]


async def test_random_bodies_are_never_a_500(coll: Node) -> None:
    bodies = st.tuples(st.sampled_from(ROUTES), st.binary(max_size=300)
                       | st.builds(dumps, st.dictionaries(st.text(max_size=8), st.none()
                                                          | st.integers() | st.text())))
    seen = await fuzz_routes(coll, bodies)
    assert all(s == 400 for s in seen)


@pytest.mark.parametrize("route", ROUTES)
async def test_mutated_valid_bodies_are_never_a_500(coll: Node, route: str) -> None:
    valid = valid_bodies(coll)[route]
    first = await coll.client.post(url(route), data=orjson.dumps(valid),
                                   headers={"Content-Type": "application/json"})
    assert first.status == (503 if route == "drop_shard" else 200), await first.text()

    @st.composite
    def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
        return route, dumps(mutate(draw, json.loads(json.dumps(valid))))

    seen = await fuzz_routes(coll, bodies())
    assert any(s < 300 for s in seen) or route == "drop_shard"  # valid ones got through too
    assert any(400 <= s < 500 for s in seen)


FRAME = "+frame"


def valid_frames() -> dict[str, bytes]:
    """One valid binary frame per route that takes them, for collection "c" (dim 2, 2 shards)."""
    vec = np.array([1.0, 2.0], dtype="<f4")
    doc = Incoming("fz", vec, b'{"k":[1,{"x":"y"}]}', 5 << 16, "peer")
    return {
        "search": frames.encode_search(vec.reshape(1, 2), 3, 4, [0, 1],
                                       {"must": [{"key": "a", "in": [1, 2]}]},
                                       frames.WITH_METADATA | frames.WITH_VECTOR | frames.EXPLAIN),
        "write": frames.encode_write(None, None, 2, {0: [doc, Incoming("gone", None, b"", 6 << 16,
                                                                         "peer")]}),
        "get": frames.encode_get(0, "keep"),
    }


@pytest.mark.parametrize("route", ["search", "write", "get"])
async def test_frames_cut_or_mutated_are_never_a_500(coll: Node, route: str) -> None:
    """The binary frames: the valid one is served; every truncation is a 400; random byte
    changes (lengths, counts, flags, version) a 2xx or a 4xx, never a 500."""
    valid = valid_frames()[route]
    first = await coll.client.post(url(route), data=valid, headers={"Content-Type": FRAME_TYPE})
    assert first.status == 200, await first.text()
    for cut in range(len(valid)):
        resp = await coll.client.post(url(route), data=valid[:cut],
                                      headers={"Content-Type": FRAME_TYPE})
        assert resp.status == 400, (cut, await resp.text())
        assert (await resp.json())["error"]["code"] == "bad_request"

    @st.composite
    def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
        raw = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return route + FRAME, bytes(raw)

    seen = await fuzz_routes(coll, bodies())
    assert any(400 <= s < 500 for s in seen)
