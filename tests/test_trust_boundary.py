"""What a client or a peer sends is not trusted (contract v2 "Trust boundary"), on one real
node in-process: names checked everywhere, the data directory never left, a collection's
incarnation only from the node's own map, and the limits on the work one request asks for.
Each refused request changes nothing and the node keeps serving."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import zlib
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from aquila.cluster.model.bounds import (
    MAX_ANSWER_FLOATS,
    MAX_ANSWER_METADATA,
    MAX_DOCUMENT_METADATA,
    MAX_METADATA_DEPTH,
)
from aquila.cluster.model.errors import BadRequest
from aquila.cluster.peers.client import PeerError
from aquila.cluster.peers.http import Peers
from aquila.cluster.replication import reads
from aquila.node.http.columnar import parse_columnar, parse_columnar_fast
from aquila.node.http.fastparse import parse_documents_fast
from aquila.node.http.parse import parse_documents
from aquila.node.keys import CLUSTER, SERVICE
from aquila.node.storage import paging
from aquila.node.storage import search as storage_search
from tests.conftest import Node, StartNode, expect_error, ok_json

SPEC: dict[str, Any] = {"dim": 2, "metric": "l2", "shards": 2, "replication": 1,
                        "index": {"type": "flat", "nlist": None, "nprobe": 16}}


def peer_write(name: str, uid: str, docs: list[dict[str, Any]] | None = None,
               shard: int = 0) -> dict[str, Any]:
    return {"spec": {"name": name, **SPEC}, "uid": uid,
            "writes": [{"shard": shard, "docs": docs or []}] if docs is not None else []}


def doc(i: int, version: int = 1) -> dict[str, Any]:
    return {"id": f"d{i}", "v": "AACAPwAAAEA=", "m": {"i": i}, "ver": version, "w": "peer"}


async def post_raw(node: Node, path: str | URL, body: bytes,
                   headers: dict[str, str] | None = None) -> Any:
    return await node.client.post(
        path, data=body, headers={"Content-Type": "application/json", **(headers or {})})


async def count(node: Node, name: str = "c") -> int:
    return int((await node.describe(name))["count"])


@pytest.fixture
async def coll(node: Node) -> Node:
    await node.create("c", 2, shards=2)
    await node.upsert("c", [{"id": "keep", "vector": [1.0, 2.0], "metadata": {"a": 1}}])
    return node


def entries(node: Node) -> set[str]:
    return {p.name for p in (node.data_dir / "collections").iterdir()}


# --- names and paths ----------------------------------------------------------------------


async def test_dotdot_attack_is_refused_and_the_data_dir_is_intact(coll: Node) -> None:
    """The issue's two requests: a spec named `..` under two uids. Both are 400; nothing on
    disk moves; the collection still answers."""
    before = entries(coll)
    for uid in ("u1", "u2"):
        resp = await post_raw(coll, "/internal/v1/collections/x/write",
                              orjson.dumps(peer_write("..", uid)))
        await expect_error(resp, 400, "bad_request")
    assert (coll.data_dir / "collections").is_dir()
    assert entries(coll) == before
    assert await count(coll) == 1


@pytest.mark.parametrize("name", ["/tmp/evil", "..", ".", "a/b", "a\n", "", "x" * 65, "a b"])
async def test_bad_names_in_a_peer_spec_are_400(coll: Node, name: str, tmp_path: Any) -> None:
    resp = await post_raw(coll, "/internal/v1/collections/c/write",
                          orjson.dumps(peer_write(name, "u")))
    await expect_error(resp, 400, "bad_request")
    assert not (tmp_path / "evil").exists()
    assert await count(coll) == 1


@pytest.mark.parametrize("route", ["write", "search", "get", "stream", "digests", "buckets",
                                   "purge", "drop_shard"])
@pytest.mark.parametrize("name", ["%2E%2E", "a%0A", "%2Ftmp"])
async def test_bad_names_in_a_peer_path_are_400(coll: Node, route: str, name: str) -> None:
    url = URL(f"/internal/v1/collections/{name}/{route}", encoded=True)
    resp = await post_raw(coll, url, b'{"shard": 0}')
    await expect_error(resp, 400, "bad_request")
    assert await count(coll) == 1


async def test_stats_with_a_bad_name_is_400(coll: Node) -> None:
    resp = await coll.client.get(URL("/internal/v1/collections/a%0A/stats", encoded=True))
    await expect_error(resp, 400, "bad_request")


@pytest.mark.parametrize("name", ["a\n", "a%0A", "ab\r\n", "\na"])
async def test_public_names_may_not_end_in_a_newline(node: Node, name: str) -> None:
    url = URL(f"/v1/collections/{quote(name, safe='%')}", encoded=True)
    resp = await node.client.put(url, json={"dim": 2})
    await expect_error(resp, 400, "bad_request")
    assert entries(node) == set()


async def test_state_push_with_a_bad_name_is_refused(coll: Node) -> None:
    """A cluster-state entry naming `..` never reaches the map nor the disk."""
    runtime = coll.client.app[SERVICE].runtime
    good = runtime.state.get("c")
    assert good is not None
    bad = good.to_json()
    bad["spec"]["name"] = ".."
    bad["epoch"] = good.epoch + 10
    resp = await post_raw(coll, "/internal/v1/state", orjson.dumps([bad]))
    await expect_error(resp, 400, "bad_request")
    assert set(runtime.state.collections) == {"c"}
    assert entries(coll) == {"c"}


# --- incarnations come from the node's own map ----------------------------------------------


async def test_a_write_naming_another_uid_does_not_drop_the_live_incarnation(coll: Node) -> None:
    """A replayed request, or a coordinator that missed a delete-and-recreate: it names
    another uid than the map. The replica answers a transient error and keeps its data."""
    resp = await post_raw(coll, "/internal/v1/collections/c/write",
                          orjson.dumps(peer_write("c", "another-uid", [doc(1)])))
    await expect_error(resp, 503, "unavailable")
    assert await count(coll) == 1
    got = await coll.client.get("/v1/collections/c/documents/keep")
    assert (await ok_json(got))["id"] == "keep"


async def test_a_write_with_the_maps_uid_is_applied(coll: Node) -> None:
    uid = coll.client.app[SERVICE].runtime.state.get("c").uid  # type: ignore[union-attr]
    resp = await post_raw(coll, "/internal/v1/collections/c/write",
                          orjson.dumps(peer_write("c", uid, [doc(1)])))
    await ok_json(resp)
    assert await count(coll) == 2


async def test_a_write_for_a_collection_the_map_does_not_know_creates_nothing(
    coll: Node,
) -> None:
    resp = await post_raw(coll, "/internal/v1/collections/nope/write",
                          orjson.dumps(peer_write("nope", "u", [doc(1)])))
    await expect_error(resp, 503, "unavailable")
    assert entries(coll) == {"c"}


async def test_a_write_whose_spec_is_not_the_maps_is_refused(coll: Node) -> None:
    uid = coll.client.app[SERVICE].runtime.state.get("c").uid  # type: ignore[union-attr]
    body = peer_write("c", uid, [doc(1)])
    body["spec"]["dim"] = 3
    resp = await post_raw(coll, "/internal/v1/collections/c/write", orjson.dumps(body))
    await expect_error(resp, 503, "unavailable")
    assert await count(coll) == 1


async def test_a_write_to_a_shard_beyond_the_spec_is_400(coll: Node) -> None:
    uid = coll.client.app[SERVICE].runtime.state.get("c").uid  # type: ignore[union-attr]
    for shard in (2, 65536, -1, 2**70):
        body = orjson.dumps(peer_write("c", uid, [doc(1)], shard=shard)
                            if shard < 2**64 else {**peer_write("c", uid), "writes": []})
        if shard >= 2**64:
            body = body.replace(b'"writes":[]', b'"writes":[{"shard":%d,"docs":[]}]' % shard)
        resp = await post_raw(coll, "/internal/v1/collections/c/write", body)
        await expect_error(resp, 400, "bad_request")
    assert await count(coll) == 1


# --- numbers from peers ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [2**64 - 1, 2**63, 2**64, -1, 1e300, "1", True])
async def test_peer_versions_out_of_range_are_400(coll: Node, version: Any) -> None:
    uid = coll.client.app[SERVICE].runtime.state.get("c").uid  # type: ignore[union-attr]
    body = orjson.dumps(peer_write("c", uid, [doc(1, version=7)])).replace(
        b'"ver":7', b'"ver":' + str(version).lower().encode()
        if not isinstance(version, str) else b'"ver":"1"')
    resp = await post_raw(coll, "/internal/v1/collections/c/write", body)
    await expect_error(resp, 400, "bad_request")
    # Later writes are not poisoned: a normal upsert still works and is readable.
    await coll.upsert("c", [{"id": "after", "vector": [0.0, 1.0]}])
    assert await count(coll) == 2


async def test_a_version_near_the_top_does_not_poison_the_clock(coll: Node) -> None:
    """The largest accepted version is stored, but the node's clock does not adopt it: the
    versions it issues later still fit, so later writes keep working."""
    uid = coll.client.app[SERVICE].runtime.state.get("c").uid  # type: ignore[union-attr]
    body = peer_write("c", uid, [doc(1, version=2**63 - 1)])
    await ok_json(await post_raw(coll, "/internal/v1/collections/c/write", orjson.dumps(body)))
    for i in range(3):
        await coll.upsert("c", [{"id": f"after{i}", "vector": [0.0, 1.0]}])
    assert await count(coll) == 5


@pytest.mark.parametrize("epoch", [2**64 - 1, 2**63, 1e300, -1])
async def test_state_with_an_epoch_out_of_range_is_refused(coll: Node, epoch: Any) -> None:
    runtime = coll.client.app[SERVICE].runtime
    good = runtime.state.get("c")
    assert good is not None
    raw = orjson.dumps([{**good.to_json(), "epoch": 1}]).replace(
        b'"epoch":1', b'"epoch":' + str(epoch).encode())
    resp = await post_raw(coll, "/internal/v1/state", raw)
    await expect_error(resp, 400, "bad_request")
    assert runtime.state.get("c") == good
    # The state still persists and changes: a new collection can be made.
    await coll.create("after", 2)


@pytest.mark.parametrize(("route", "body"), [
    ("stream", {"shard": 0, "limit": 10**9}),
    ("stream", {"shard": 0, "limit": 0}),
    ("stream", {"shard": 0, "limit": 1e300}),
    ("stream", {"shard": 2**70}),
    ("digests", {"shard": 0, "buckets": 10**9}),
    ("digests", {"shard": 0, "buckets": 0}),
    ("buckets", {"shard": 0, "buckets": [0], "of": 10**9}),
    ("buckets", {"shard": 0, "buckets": [0], "of": 0}),
    ("buckets", {"shard": 0, "buckets": [300], "of": 256}),
    ("buckets", {"shard": 0, "buckets": list(range(5000)), "of": 256}),
    ("purge", {"shard": 0, "before": 2**64}),
    ("purge", {"shard": 0, "before": 1e300}),
    ("get", {"shard": 0, "id": ""}),
    ("get", {"shard": 0, "id": "x" * 257}),
    ("get", {"shard": 99, "id": "keep"}),
    ("search", {"vectors": "AACAPwAAAEA=", "nq": 10**6, "k": 1, "shards": [0]}),
    ("search", {"vectors": "AACAPwAAAEA=", "nq": 1, "k": 10**6, "shards": [0]}),
    ("search", {"vectors": "AACAPwAAAEA=", "nq": 1, "k": 1, "shards": [0], "nprobe": 2**70}),
    ("search", {"vectors": "AACAPwAAAEA=", "nq": 1, "k": 1, "shards": [2**63]}),
    ("search", {"vectors": "AACAPwAAAEA=", "nq": 1, "k": 1, "shards": [0, 0, 0]}),
    ("search", {"vectors": "AACAPwAAAEA=", "nq": 1, "k": 1, "shards": [1e300]}),
    ("drop_shard", {"shard": 2**70}),
])
async def test_peer_numbers_out_of_range_are_400(coll: Node, route: str,
                                                 body: dict[str, Any]) -> None:
    resp = await post_raw(coll, f"/internal/v1/collections/c/{route}", orjson.dumps(body)
                          if all(not isinstance(v, int) or v < 2**64 for v in body.values())
                          else _big(body))
    await expect_error(resp, 400, "bad_request")
    assert await count(coll) == 1


def _big(body: dict[str, Any]) -> bytes:
    """orjson cannot write integers of 2^64 and above; a forger can."""
    big = {k: v for k, v in body.items() if isinstance(v, int) and v >= 2**64}
    small = {k: (0 if k in big else v) for k, v in body.items()}
    raw = orjson.dumps(small)
    for k, v in big.items():
        raw = raw.replace(b'"%s":0' % k.encode(), b'"%s":%d' % (k.encode(), v))
    return raw


# --- limits of the public API ---------------------------------------------------------------


async def test_search_limits(coll: Node) -> None:
    url = "/v1/collections/c/search"
    ok = await coll.post_json(url, {"vectors": [[0.0, 1.0]] * 1000, "k": 100})
    assert len((await ok_json(ok))["results"]) == 1000
    resp = await coll.post_json(url, {"vectors": [[0.0, 1.0]] * 1001, "k": 1})
    await expect_error(resp, 400, "bad_request")
    resp = await coll.post_json(url, {"vectors": [[0.0, 1.0]] * 101, "k": 1000})
    await expect_error(resp, 400, "bad_request")
    for t in (0, 600_001, 2**70):
        resp = await post_raw(coll, url, b'{"vector":[0,1],"timeout_ms":%d}' % t)
        await expect_error(resp, 400, "bad_request")
    resp = await coll.post_json(url, {"vector": [0.0, 1.0], "timeout_ms": 600_000})
    await ok_json(resp)
    resp = await post_raw(coll, url, b'{"vector":[0,1],"nprobe":%d}' % 2**70)
    await expect_error(resp, 400, "bad_request")


async def test_an_answer_of_vectors_past_its_float_limit_is_400(node: Node) -> None:
    """queries × k × dim (a search's vectors) and limit × dim (a scroll page's) at most
    MAX_ANSWER_FLOATS: 100 queries of k 1,000 at dim 4,096 were 410 million floats built in
    the node's memory. Exactly at the limit it answers; without vectors, as before."""
    dim = 20_000
    at_limit = MAX_ANSWER_FLOATS // dim  # 838 results of dim 20,000
    await node.create("wide", dim, shards=1)
    rng = np.random.default_rng(3)
    docs = [{"id": f"d{i}", "vector": v} for i, v in enumerate(rng.random((5, dim)).tolist())]
    await ok_json(await node.post_json("/v1/collections/wide/documents", {"documents": docs}))
    q = rng.random(dim).tolist()
    search = "/v1/collections/wide/search"
    for queries, k in ((1, at_limit + 1), (2, at_limit // 2 + 1), (100, 1000)):
        msg = await expect_error(await node.post_json(search, {
            "vectors": [q] * queries, "k": k, "include": ["vector"]}), 400, "bad_request")
        assert "vector" in msg and f"{MAX_ANSWER_FLOATS:,}" in msg
    got = await ok_json(await node.post_json(search, {
        "vector": q, "k": at_limit, "include": ["vector"]}))
    assert len(got["results"][0]) == 5 and len(got["results"][0][0]["vector"]) == dim
    got = await ok_json(await node.post_json(search, {"vectors": [q] * 100, "k": 1000}))
    assert [len(r) for r in got["results"]] == [5] * 100
    scroll = "/v1/collections/wide/scroll"
    msg = await expect_error(await node.post_json(scroll, {
        "limit": at_limit + 1, "include": ["vector"]}), 400, "bad_request")
    assert "limit × dim" in msg
    page = await ok_json(await node.post_json(scroll, {"limit": at_limit, "include": ["vector"]}))
    assert len(page["documents"]) == 5 and len(page["documents"][0]["vector"]) == dim
    assert len((await ok_json(await node.post_json(scroll, {"limit": 1000})))["documents"]) == 5


async def test_an_answer_past_its_metadata_limit_is_400(node: Node) -> None:
    """A document found by every query is in the answer once a query: 9 documents of 1 MB
    of metadata, each found by 30 queries, would be 270 MB of JSON, over
    MAX_ANSWER_METADATA (256 MiB); refused before any of it is built, and the node answers
    the next search."""
    await node.create("fat", 2, shards=1)
    big = "x" * 1_000_000
    docs = [{"id": f"d{i}", "vector": [float(i), 1.0], "metadata": {"text": big}}
            for i in range(9)]
    await ok_json(await node.post_json("/v1/collections/fat/documents", {"documents": docs}))
    search = "/v1/collections/fat/search"
    msg = await expect_error(await node.post_json(search, {"vectors": [[0.0, 1.0]] * 30,
                                                           "k": 9}), 400, "bad_request")
    assert "metadata" in msg and f"{MAX_ANSWER_METADATA:,}" in msg
    got = await ok_json(await node.post_json(search, {"vectors": [[0.0, 1.0]] * 30, "k": 9,
                                                      "include": []}))
    assert all(len(r) == 9 for r in got["results"])
    got = await ok_json(await node.post_json(search, {"vector": [0.0, 1.0], "k": 3}))
    assert len(got["results"][0][0]["metadata"]["text"]) == len(big)


@pytest.mark.parametrize("form", ["documents", "columnar"])
async def test_a_document_past_its_metadata_limit_is_400(node: Node, form: str) -> None:
    """A document's metadata is at most MAX_DOCUMENT_METADATA bytes serialised, by every
    parser (simdjson's fast paths and the general ones): one over it refuses the whole
    batch, which writes nothing; at the limit it is stored."""
    await node.create("big", 2, shards=1)
    url = "/v1/collections/big/documents"
    room = MAX_DOCUMENT_METADATA - len(b'{"t":""}')  # the serialised object's own bytes

    def body(pad: int) -> dict[str, Any]:
        metas = [{"t": "a"}, {"t": "x" * pad}]
        if form == "columnar":
            vecs = np.array([[1.0, 0.0], [0.0, 1.0]], "<f4").tobytes()
            return {"ids": ["small", "large"], "metadata": metas,
                    "vectors_b64": base64.b64encode(vecs).decode()}
        return {"documents": [{"id": i, "vector": v, "metadata": m} for i, v, m in
                              zip(["small", "large"], [[1.0, 0.0], [0.0, 1.0]], metas,
                                  strict=True)]}

    msg = await expect_error(await node.post_json(url, body(room + 1)), 400, "bad_request")
    assert "document 1 (id 'large')" in msg and f"{MAX_DOCUMENT_METADATA:,}" in msg
    # The object is measured minified: whitespace in the body does not count.
    raw = orjson.dumps(body(room + 1), option=orjson.OPT_INDENT_2)
    resp = await node.client.post(url, data=io.BytesIO(raw),
                                  headers={"Content-Type": "application/json"})
    await expect_error(resp, 400, "bad_request")
    # Every parser refuses it itself (the fast ones may also leave it to the general one).
    fast, general = ((parse_columnar_fast, parse_columnar) if form == "columnar"
                     else (parse_documents_fast, parse_documents))
    with pytest.raises(BadRequest, match="document 1"):
        general(body(room + 1), 2)
    try:
        assert fast(orjson.dumps(body(room + 1)), 2) is None
    except BadRequest as exc:
        assert "document 1" in str(exc)
    count = await ok_json(await node.post_json("/v1/collections/big/count", {}))
    assert count["count"] == 0
    await ok_json(await node.post_json(url, body(room)))
    got = await ok_json(await node.client.get("/v1/collections/big/documents/large"))
    assert len(got["metadata"]["t"]) == room


async def test_a_scroll_page_ends_at_its_metadata_limit(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scroll page gathers at most about MAX_PAGE_METADATA bytes of metadata (here lowered
    to 20 kB, documents of 2 kB): fewer documents than its limit, and a cursor that goes on
    from there; every document comes once over the pages."""
    monkeypatch.setattr(paging, "MAX_PAGE_METADATA", 20_000)
    monkeypatch.setattr(reads, "MAX_PAGE_METADATA", 20_000)
    await node.create("pages", 2, shards=2)
    docs = [{"id": f"d{i:03}", "vector": [float(i), 0.0], "metadata": {"pad": "p" * 2000}}
            for i in range(100)]
    await ok_json(await node.post_json("/v1/collections/pages/documents", {"documents": docs}))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await ok_json(await node.post_json("/v1/collections/pages/scroll",
                                                  {"limit": 1000, "cursor": cursor}))
        pages += 1
        assert len(page["documents"]) <= 10 + 10  # a shard's 10, then at most one more's
        seen += [d["id"] for d in page["documents"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 50
    assert sorted(seen) == [d["id"] for d in docs] and len(seen) == len(set(seen))
    assert pages >= 5


async def test_filter_condition_limit_counts_every_clause(coll: Node) -> None:
    url = "/v1/collections/c/search"
    cond = {"key": "a", "match": 1}
    ok = {"must": [cond] * 40, "should": [cond] * 30, "must_not": [{"key": "b", "match": 1}] * 30}
    await ok_json(await coll.post_json(url, {"vector": [0.0, 1.0], "filter": ok}))
    too_many = {**ok, "must": [cond] * 41}
    resp = await coll.post_json(url, {"vector": [0.0, 1.0], "filter": too_many})
    await expect_error(resp, 400, "bad_request")
    resp = await coll.post_json(url, {"vector": [0.0, 1.0],
                                      "filter": {"must": [{"key": "a", "in": [1] * 1001}]}})
    await expect_error(resp, 400, "bad_request")


async def test_delete_ids_limit(coll: Node) -> None:
    url = "/v1/collections/c/documents/delete"
    resp = await coll.post_json(url, {"ids": [f"x{i}" for i in range(10_001)]})
    await expect_error(resp, 400, "bad_request")
    assert await count(coll) == 1
    resp = await coll.post_json(url, {"ids": [f"x{i}" for i in range(9_999)] + ["keep"]})
    assert (await ok_json(resp))["deleted"] == 1


def nested_raw(depth: int) -> bytes:
    """A metadata object `depth` deep, as JSON ({"a": 1} is depth 1)."""
    return b'{"a":' * (depth - 1) + b'{"a":1}' + b"}" * (depth - 1)


@pytest.mark.parametrize("depth", [MAX_METADATA_DEPTH + 1, 300, 1000])
async def test_deep_metadata_is_400(coll: Node, depth: int) -> None:
    raw = b'{"documents":[{"id":"deep","vector":[0.5,1.5],"metadata":%s}]}' % nested_raw(depth)
    resp = await post_raw(coll, "/v1/collections/c/documents", raw)
    await expect_error(resp, 400, "bad_request")
    assert await count(coll) == 1


@pytest.mark.parametrize("depth", [MAX_METADATA_DEPTH + 1, 300, 1000])
def test_deep_metadata_on_both_parsers(depth: int) -> None:
    """The fast parser leaves it to the general one, which says what is wrong."""
    raw = b'{"documents":[{"id":"deep","vector":[0.5,1.5],"metadata":%s}]}' % nested_raw(depth)
    assert parse_documents_fast(raw, 2) is None
    with pytest.raises(BadRequest, match="deep"):
        parse_documents(orjson.loads(raw), 2)


async def test_metadata_at_the_depth_limit_is_accepted(coll: Node) -> None:
    meta = orjson.loads(nested_raw(MAX_METADATA_DEPTH))
    await coll.upsert("c", [{"id": "deep", "vector": [0.0, 1.0], "metadata": meta}])
    got = await ok_json(await coll.client.get("/v1/collections/c/documents/deep"))
    assert got["metadata"] == meta
    raw = b'{"documents":[{"id":"deep2","vector":[0.5,1.5],"metadata":%s}]}' % nested_raw(
        MAX_METADATA_DEPTH)
    assert parse_documents_fast(raw, 2) is not None
    assert parse_documents(orjson.loads(raw), 2).ids == ["deep2"]


async def test_deeply_nested_bodies_are_400(coll: Node) -> None:
    for raw in (b'{"vector":[0,1],"filter":' + b"[" * 1000 + b"]" * 1000 + b"}",
                b'{"x":1e400,"y":' + b"[" * 1020 + b"]" * 1020 + b"}",
                b'{"vector":[0,1],"x":' + b"[" * 990 + b"]" * 990 + b"}" + b" " * 70_000):
        resp = await post_raw(coll, "/v1/collections/c/search", raw)
        await expect_error(resp, 400, "bad_request")


# --- compressed bodies ----------------------------------------------------------------------


@functools.cache
def bomb(encoding: str, mib: int = 256) -> bytes:
    """`mib` MiB of JSON whitespace, compressed to a few hundred KiB (made piece by piece:
    zlib lets go of the GIL while it works, a 256 MiB bytes object would not)."""
    packer = zlib.compressobj(9, wbits=31 if encoding == "gzip" else 15)
    spaces = b" " * (1 << 20)
    out = [packer.compress(b'{"documents": [')]
    out += [packer.compress(spaces) for _ in range(mib)]
    out += [packer.compress(b"]}"), packer.flush()]
    return b"".join(out)


async def gzip_bomb(start_node: StartNode, encoding: str) -> None:
    small = await start_node(max_body_bytes=64 * 1024)
    await small.create("c", 2)
    packed = await asyncio.to_thread(bomb, encoding)  # seconds of CPU: not on the loop
    assert len(packed) < 1024 * 1024
    resp = await small.client.post(
        "/v1/collections/c/documents", data=packed,
        headers={"Content-Type": "application/json", "Content-Encoding": encoding})
    await expect_error(resp, 413, "payload_too_large")
    assert await count(small) == 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compression_bomb_is_413(start_node: StartNode, encoding: str) -> None:
    await gzip_bomb(start_node, encoding)


async def test_compressed_bodies_within_the_limit_work(coll: Node) -> None:
    body = orjson.dumps({"documents": [{"id": "z", "vector": [3.0, 4.0]}]})
    raw_deflate = zlib.compressobj(wbits=-15)
    for encoding, packed in (("gzip", zlib.compress(body, wbits=31)),
                             ("deflate", zlib.compress(body)),
                             ("deflate", raw_deflate.compress(body) + raw_deflate.flush())):
        resp = await coll.client.post(
            "/v1/collections/c/documents", data=packed,
            headers={"Content-Type": "application/json", "Content-Encoding": encoding})
        await ok_json(resp)
    assert await count(coll) == 2
    for encoding, bad in (("gzip", b"\x1f\x8bnot gzip at all"),
                          ("gzip", zlib.compress(body, wbits=31)[:-6]),  # truncated
                          ("gzip", zlib.compress(body, wbits=31) + b"trailing"),
                          ("deflate", b"\x78\x9cnope")):
        resp = await coll.client.post(
            "/v1/collections/c/documents", data=bad,
            headers={"Content-Type": "application/json", "Content-Encoding": encoding})
        await expect_error(resp, 400, "bad_request")
    resp = await coll.client.post(
        "/v1/collections/c/documents", data=b"\x1f\x8bnot gzip at all",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    await expect_error(resp, 400, "bad_request")
    resp = await coll.client.post(
        "/v1/collections/c/documents", data=body,
        headers={"Content-Type": "application/json", "Content-Encoding": "br"})
    await expect_error(resp, 400, "bad_request")


# --- join -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [
    "127.0.0.1:1/path", "127.0.0.1:1#frag", "127.0.0.1:1?q=1", "http://127.0.0.1:1",
    "user@127.0.0.1:1", " 127.0.0.1:1", "127.0.0.1:1 ", "127.0.0.1 :1", "a b:1", "host:0",
    "host:65536", "host:+1", "host:１", "[::1:1", "-bad-.example:1", "a..b:1", "::1:1",
])
async def test_join_refuses_what_is_not_host_port(node: Node, seed: str) -> None:
    resp = await node.client.post("/v1/cluster/join", json={"seeds": [seed]})
    await expect_error(resp, 400, "bad_request")


async def test_join_takes_at_most_32_seeds(node: Node) -> None:
    seeds = [f"127.0.0.{i}:1" for i in range(1, 34)]
    resp = await node.client.post("/v1/cluster/join", json={"seeds": seeds})
    await expect_error(resp, 400, "bad_request")


# --- answers from peers ---------------------------------------------------------------------


async def test_a_peers_answer_is_read_within_a_limit_and_never_inflated() -> None:
    """What answers at an address given to join may be anything: a body without end, or a
    gzip bomb. The peer client stops at its limit and does not inflate."""
    packer = zlib.compressobj(9, wbits=31)
    bomb_body = b"".join([packer.compress(b" " * (1 << 20)) for _ in range(4)]
                         + [packer.flush()])

    async def endless(request: web.Request) -> web.Response:
        return web.Response(body=b"[" + b"0," * 5000 + b"0]", content_type="application/json")

    async def bomb_answer(request: web.Request) -> web.Response:
        return web.Response(body=bomb_body, content_type="application/json",
                            headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/big", endless)
    app.router.add_post("/bomb", bomb_answer)
    async with TestServer(app, host="127.0.0.1") as server:
        peers = Peers(None, sender="node-a", max_answer_bytes=8000)
        await peers.start()
        try:
            addr = f"127.0.0.1:{server.port}"
            with pytest.raises(PeerError, match="more than 8000 bytes"):
                await peers.request(addr, "POST", "/big", {}, to=None)
            assert len(bomb_body) < 8000  # 4 MiB once inflated
            with pytest.raises(PeerError, match="something else than JSON"):
                await peers.request(addr, "POST", "/bomb", {}, to=None)
        finally:
            await peers.close()


async def test_a_search_stops_reading_documents_past_the_metadata_limit(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hits' records are read a few thousand at a time and counted: past
    MAX_ANSWER_METADATA (here lowered to 100 kB, 16 records a read) the search is a 400
    without reading the rest, where it read every hit's record first (10,000 documents of
    1 MiB are 10 GiB). Fewer hits are answered."""
    monkeypatch.setattr(storage_search, "MAX_ANSWER_METADATA", 100_000)
    monkeypatch.setattr(storage_search, "_RECORDS_AT_ONCE", 16)
    await node.create("meta", 2, shards=1)
    pad = "m" * 2000
    docs = [{"id": f"d{i}", "vector": [float(i), 0.0], "metadata": {"pad": pad}}
            for i in range(300)]
    await ok_json(await node.post_json("/v1/collections/meta/documents", {"documents": docs}))
    store = node.client.app[CLUSTER].engine.get("meta").store
    read: list[int] = []
    real = store.raw_records

    def counted(keys: list[bytes]) -> list[bytes | None]:
        read.append(len(keys))
        return real(keys)

    monkeypatch.setattr(store, "raw_records", counted)
    search = "/v1/collections/meta/search"
    msg = await expect_error(await node.post_json(search, {"vector": [0.0, 0.0], "k": 300}),
                             400, "bad_request")
    assert "100,000 bytes" in msg
    # The ids by label (300), then records until past 100 kB (~2 kB each): 4 reads of 16.
    assert read[0] == 300 and sum(read[1:]) <= 16 * 4, read
    got = await ok_json(await node.post_json(search, {"vector": [0.0, 0.0], "k": 40}))
    assert [h["id"] for h in got["results"][0]][:3] == ["d0", "d1", "d2"]
