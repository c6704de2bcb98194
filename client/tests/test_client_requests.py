"""Every method's request (method, path, query, headers, body) and how its reply is read, for
the sync and the async client alike, over a mock transport."""

from __future__ import annotations

import base64
import inspect
import json
import uuid
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Driver, FakeNodes, reply

from aquila_client import (
    AsyncClient,
    Client,
    Collection,
    Document,
    InvalidVector,
    QueryResult,
    SearchResult,
)

DESC = {
    "name": "docs", "dim": 3, "metric": "cosine", "shards": 2, "replication": 1,
    "index": {"type": "ivf_flat", "nlist": None, "nprobe": 16}, "count": 5,
    "shard_states": [
        {"shard": 0, "replicas": ["n1"], "count": 2, "index_state": "buffering"},
        {"shard": 1, "replicas": ["n1"], "count": 3, "index_state": "trained"},
    ],
}


def test_both_clients_have_the_same_methods() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {n: inspect.signature(f) for n, f in vars(cls).items()
                if callable(f) and not n.startswith("_")}

    sync, asyn = public(Client), public(AsyncClient)
    assert set(sync) == set(asyn)
    for name, sig in sync.items():
        if name == "__init__":
            continue
        assert list(sig.parameters) == list(asyn[name].parameters), name
        for p, q in zip(sig.parameters.values(), asyn[name].parameters.values(), strict=True):
            assert (p.kind, p.default) == (q.kind, q.default), (name, p.name)
    for name in sync:
        if name not in ("close", "scroll_all"):
            assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name


def test_api_key_and_user_agent_on_every_request(make_driver: Any, fake: FakeNodes) -> None:
    fake.answer({"collections": []})
    db = make_driver(api_key="s3cret")
    db.list_collections()
    assert fake.last.headers["authorization"] == "Bearer s3cret"
    assert fake.last.headers["user-agent"].startswith("aquila-client/")
    db2 = make_driver()
    db2.list_collections()
    assert "authorization" not in fake.last.headers


# -- collections --------------------------------------------------------------------------
def test_create_collection_sends_only_the_settings_given(db: Driver, fake: FakeNodes) -> None:
    fake.answer(DESC, status=201)
    col = db.create_collection("docs", 3)
    assert (fake.last.method, fake.last.url.path) == ("PUT", "/v1/collections/docs")
    assert fake.last.headers["content-type"] == "application/json"
    assert fake.body() == {"dim": 3}
    assert isinstance(col, Collection)
    assert (col.name, col.dim, col.metric, col.count, col.index.nlist) == ("docs", 3, "cosine", 5,
                                                                           None)
    assert [s.index_state for s in col.shard_states] == ["buffering", "trained"]
    assert col.shard_states[1].replicas == ("n1",)

    db.create_collection("docs", 3, metric="cosine", shards=2, replication=1, index="flat",
                         nlist=8, nprobe=4)
    assert fake.body() == {"dim": 3, "metric": "cosine", "shards": 2, "replication": 1,
                           "index": {"type": "flat", "nlist": 8, "nprobe": 4}}


def test_get_list_delete_collection(db: Driver, fake: FakeNodes) -> None:
    fake.answer(DESC)
    assert db.get_collection("docs").shards == 2
    assert (fake.last.method, fake.last.url.path) == ("GET", "/v1/collections/docs")
    fake.answer({"collections": [DESC, {**DESC, "name": "b"}]})
    assert [c.name for c in db.list_collections()] == ["docs", "b"]
    assert (fake.last.method, fake.last.url.path) == ("GET", "/v1/collections")
    fake.answer({"deleted": True})
    assert db.delete_collection("docs") is True
    assert (fake.last.method, fake.last.url.path) == ("DELETE", "/v1/collections/docs")
    assert fake.last.content == b""


# -- documents ----------------------------------------------------------------------------
def _columnar(body: dict[str, Any], dim: int) -> np.ndarray:
    raw = base64.b64decode(body["vectors_b64"])
    return np.frombuffer(raw, dtype="<f4").reshape(len(body["ids"]), dim)


def test_upsert_sends_the_columnar_form_exactly(db: Driver, fake: FakeNodes) -> None:
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((5, 7)).astype(np.float32)
    vecs[0, 0] = np.float32(1e-40)  # a subnormal survives too
    ids = [f"d{i}" for i in range(5)]
    meta = [{"i": i, "tags": ["a"]} for i in range(5)]
    fake.answer({"ids": ids, "upserted": 5})
    res = db.upsert("docs", vecs, ids=ids, metadata=meta, consistency="all")
    assert (fake.last.method, fake.last.url.path) == ("POST", "/v1/collections/docs/documents")
    body = fake.body()
    assert set(body) == {"ids", "vectors_b64", "metadata", "consistency"}
    assert body["ids"] == ids and body["metadata"] == meta and body["consistency"] == "all"
    sent = _columnar(body, 7)
    assert sent.tobytes() == vecs.tobytes()  # bit for bit
    assert (res.ids, res.upserted) == (ids, 5)


def test_upsert_casts_to_float32_and_takes_one_vector(db: Driver, fake: FakeNodes) -> None:
    fake.on("n1:1", lambda r: reply(
        {"ids": json.loads(r.content)["ids"], "upserted": 1}))
    v64 = np.array([0.1, 0.2, 0.3])
    db.upsert("docs", v64, ids=["x"])
    body = fake.body()
    assert "metadata" not in body and "consistency" not in body
    assert _columnar(body, 3).tolist() == [v64.astype(np.float32).tolist()]
    db.upsert("docs", [[1, 2, 3], [4, 5, 6]], ids=["a", "b"], metadata=[None, {"k": 1}])
    assert _columnar(fake.body(), 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    assert fake.body()["metadata"] == [{}, {"k": 1}]


def test_numpy_values_in_metadata_and_filters_are_sent_as_json(db: Driver,
                                                               fake: FakeNodes) -> None:
    fake.on("n1:1", lambda r: reply({"ids": ["a"], "upserted": 1}))
    meta = {"score": np.float32(0.5), "n": np.int64(3), "ok": np.bool_(True),
            "tags": np.array([1, 2]), "nested": {"x": np.float64(0.25)}}
    db.upsert("docs", [[1.0, 2.0]], ids=["a"], metadata=[meta])
    assert fake.body()["metadata"] == [{"score": 0.5, "n": 3, "ok": True, "tags": [1, 2],
                                        "nested": {"x": 0.25}}]
    with pytest.raises(ValueError):  # NaN is no more JSON as a numpy scalar
        db.upsert("docs", [[1.0, 2.0]], ids=["a"], metadata=[{"x": np.float32("nan")}])
    with pytest.raises(TypeError, match="not JSON"):
        db.upsert("docs", [[1.0, 2.0]], ids=["a"], metadata=[{"x": object()}])


def test_upsert_without_ids_generates_uuids_here(db: Driver, fake: FakeNodes) -> None:
    fake.on("n1:1", lambda r: reply(
        {"ids": json.loads(r.content)["ids"], "upserted": 3}))
    res = db.upsert("docs", np.zeros((3, 2), np.float32))
    sent = fake.body()["ids"]
    assert res.ids == sent and len(set(sent)) == 3
    for s in sent:
        assert uuid.UUID(s).version == 4


@pytest.mark.parametrize("kwargs, exc", [
    ({"ids": ["a"]}, ValueError),  # 1 id, 2 vectors
    ({"ids": ["a", 2]}, TypeError),
    ({"metadata": [{}]}, ValueError),
    ({"metadata": [{}, "x"]}, TypeError),
])
def test_upsert_refuses_mismatched_arguments_before_sending(
    db: Driver, fake: FakeNodes, kwargs: dict[str, Any], exc: type[Exception]
) -> None:
    with pytest.raises(exc):
        db.upsert("docs", np.zeros((2, 2)), **kwargs)
    with pytest.raises(ValueError):
        db.upsert("docs", np.zeros((2, 2, 2)))
    with pytest.raises(TypeError):
        db.upsert("docs", np.array([["a", "b"]]))
    assert fake.seen == []


def test_get_document_quotes_the_id_and_reads_the_vector(db: Driver, fake: FakeNodes) -> None:
    vec = np.array([0.1, -2.5, 3e-8], dtype=np.float32)
    fake.answer({"id": "a/b c?#%", "metadata": {"pos": "noun"}, "vector": vec.tolist()})
    doc = db.get_document("docs", "a/b c?#%", vector=True)
    assert fake.last.url.raw_path == b"/v1/collections/docs/documents/a%2Fb%20c%3F%23%25?vector=true"
    assert isinstance(doc, Document)
    assert doc.id == "a/b c?#%" and doc.metadata == {"pos": "noun"}
    assert doc.vector is not None and doc.vector.dtype == np.float32
    assert doc.vector.tobytes() == vec.tobytes()
    fake.answer({"id": "x", "metadata": {}})
    doc = db.get_document("docs", "x")
    assert fake.last.url.query == b"" and doc.vector is None


def test_delete_documents_and_document(db: Driver, fake: FakeNodes) -> None:
    fake.answer({"deleted": 2})
    assert db.delete_documents("docs", ["a", "b", "c"]) == 2
    assert (fake.last.method, fake.last.url.path) == ("POST", "/v1/collections/docs/documents/delete")
    assert fake.body() == {"ids": ["a", "b", "c"]}
    fake.answer({"deleted": 1})
    assert db.delete_document("docs", "a b") == 1
    assert fake.last.method == "DELETE"
    assert fake.last.url.raw_path == b"/v1/collections/docs/documents/a%20b"


# -- search -------------------------------------------------------------------------------
def _hits(n: int, dim: int | None = None) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        h: dict[str, Any] = {"id": f"d{i}", "score": 0.5 - i / 10, "metadata": {"i": i}}
        if dim is not None:
            h["vector"] = [float(np.float32(i + 0.1))] * dim
        out.append(h)
    return out


def test_search_one_vector(db: Driver, fake: FakeNodes) -> None:
    fake.answer({"results": [_hits(3)], "partial": False, "missing_shards": [], "took_ms": 1.5})
    q = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    res = db.search("docs", q, k=3)
    assert (fake.last.method, fake.last.url.path) == ("POST", "/v1/collections/docs/search")
    body = fake.body()
    assert body == {"vector": q.tolist(), "k": 3}
    assert np.array(body["vector"], dtype=np.float32).tobytes() == q.tobytes()
    assert isinstance(res, SearchResult) and len(res) == 1
    r = res[0]
    assert isinstance(r, QueryResult)
    assert r.ids == ["d0", "d1", "d2"] and r.scores.dtype == np.float32
    assert np.allclose(r.scores, [0.5, 0.4, 0.3])
    assert r.metadata == [{"i": 0}, {"i": 1}, {"i": 2}] and r.vectors is None
    assert [h[0] for h in r] == r.ids
    assert (res.partial, res.missing_shards, res.took_ms, res.nprobe) == (False, [], 1.5, None)


def test_search_matrix_with_every_option(db: Driver, fake: FakeNodes) -> None:
    fake.answer({"results": [_hits(2, 4), []], "partial": True, "missing_shards": [3],
                 "took_ms": 9.0})
    qs = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    flt = {"must": [{"key": "pos", "match": "noun"}]}
    res = db.search("docs", qs, k=2, nprobe=8, filter=flt, include=["metadata", "vector"],
                    allow_partial=True, timeout_ms=500)
    body = fake.body()
    assert body == {"vectors": qs.tolist(), "k": 2, "nprobe": 8, "filter": flt,
                    "include": ["metadata", "vector"], "allow_partial": True, "timeout_ms": 500}
    assert np.array(body["vectors"], dtype=np.float32).tobytes() == qs.tobytes()
    assert res.partial and res.missing_shards == [3]
    assert res[0].vectors is not None and res[0].vectors.shape == (2, 4)
    assert res[0].vectors.dtype == np.float32
    assert res[1].ids == [] and res[1].scores.shape == (0,)
    assert res.ids == [["d0", "d1"], []]


def test_search_by_id_ids_and_recall(db: Driver, fake: FakeNodes) -> None:
    fake.answer({"results": [_hits(1)], "partial": False, "missing_shards": [], "took_ms": 1,
                 "nprobe": 12})
    res = db.search("docs", id="a/b", k=1, recall=0.95)
    assert fake.body() == {"id": "a/b", "k": 1, "recall": 0.95}
    assert res.nprobe == 12
    db.search("docs", ids=["a", "b"])
    assert fake.body() == {"ids": ["a", "b"]}


def test_search_refuses_bad_arguments_before_sending(db: Driver, fake: FakeNodes) -> None:
    q = np.ones(3, np.float32)
    for kwargs in ({}, {"vectors": q, "id": "a"}, {"id": "a", "ids": ["b"]}):
        with pytest.raises(ValueError, match="exactly one"):
            db.search("docs", **kwargs)
    with pytest.raises(ValueError, match="nprobe or recall"):
        db.search("docs", q, nprobe=2, recall=0.9)
    with pytest.raises(ValueError, match="include"):
        db.search("docs", q, include=["scores"])
    bad = np.ones((3, 3), np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(InvalidVector, match=r"vectors\[2\]"):
        db.search("docs", bad)
    with pytest.raises(InvalidVector):
        db.search("docs", np.array([1.0, np.inf, 0.0]))
    assert fake.seen == []


def test_search_timeout_ms_outlasts_the_client_timeout(make_driver: Any, fake: FakeNodes) -> None:
    fake.answer({"results": [[]], "partial": False, "missing_shards": [], "took_ms": 1})
    db = make_driver(timeout=2.0)
    db.search("docs", np.ones(2), timeout_ms=100)
    assert fake.last.extensions["timeout"]["read"] == 2.0
    db.search("docs", np.ones(2), timeout_ms=10_000)
    assert fake.last.extensions["timeout"]["read"] == 11.0


# -- count and scroll ---------------------------------------------------------------------
def test_count(db: Driver, fake: FakeNodes) -> None:
    fake.answer({"count": 42, "partial": True, "missing_shards": [1]})
    res = db.count("docs", filter={"must": [{"key": "pos", "match": "verb"}]})
    assert (fake.last.method, fake.last.url.path) == ("POST", "/v1/collections/docs/count")
    assert fake.body() == {"filter": {"must": [{"key": "pos", "match": "verb"}]}}
    assert (res.count, res.partial, res.missing_shards) == (42, True, [1])
    db.count("docs")
    assert fake.body() == {}


def test_scroll_page_and_all(db: Driver, fake: FakeNodes) -> None:
    pages = {
        None: ({"documents": [{"id": "a", "metadata": {"i": 0}, "vector": [1.0, 2.0]},
                              {"id": "b", "metadata": {"i": 1}, "vector": [3.0, 4.0]}],
                "next_cursor": "c1"}),
        "c1": {"documents": [{"id": "c", "metadata": {"i": 2}, "vector": [5.0, 6.0]}],
               "next_cursor": None},
    }
    fake.on("n1:1", lambda r: reply(pages[json.loads(r.content)["cursor"]]))
    page = db.scroll("docs", limit=2, include=["metadata", "vector"])
    assert (fake.last.method, fake.last.url.path) == ("POST", "/v1/collections/docs/scroll")
    assert fake.body() == {"cursor": None, "limit": 2, "include": ["metadata", "vector"]}
    assert [d.id for d in page.documents] == ["a", "b"] and page.next_cursor == "c1"
    assert page.documents[1].vector is not None
    assert page.documents[1].vector.tolist() == [3.0, 4.0]
    fake.seen.clear()
    flt = {"must_not": [{"key": "i", "match": 5}]}
    docs = db.scroll_all("docs", filter=flt, limit=2, include=["metadata", "vector"])
    assert [d.id for d in docs] == ["a", "b", "c"]
    assert [fake.body(i)["cursor"] for i in range(len(fake.seen))] == [None, "c1"]
    assert all(fake.body(i)["filter"] == flt for i in range(len(fake.seen)))


# -- cluster and operations ---------------------------------------------------------------
def test_cluster_and_shards(db: Driver, fake: FakeNodes) -> None:
    fake.answer({"node": {"id": "n1", "addr": "127.0.0.2:8470"}, "epoch": 7, "members": [
        {"id": "n1", "addr": "127.0.0.2:8470", "state": "alive", "incarnation": 2},
        {"id": "n2", "addr": "127.0.0.3:8470", "state": "dead", "incarnation": 0}]})
    info = db.cluster()
    assert (fake.last.method, fake.last.url.path) == ("GET", "/v1/cluster")
    assert (info.node_id, info.node_addr, info.epoch) == ("n1", "127.0.0.2:8470", 7)
    assert [(m.id, m.state, m.incarnation) for m in info.members] == [("n1", "alive", 2),
                                                                     ("n2", "dead", 0)]
    fake.answer({"epoch": 7, "collections": {"docs": [
        {"shard": 0, "replicas": ["n1", "n2"], "moving": None},
        {"shard": 1, "replicas": ["n2"], "moving": {"from": "n2", "to": "n1", "progress": 0.5}}]}})
    m = db.shards()
    assert fake.last.url.path == "/v1/cluster/shards"
    assert m.epoch == 7 and m.collections["docs"][0].replicas == ("n1", "n2")
    mv = m.collections["docs"][1].moving
    assert mv is not None and (mv.from_node, mv.to_node, mv.progress) == ("n2", "n1", 0.5)


def test_join_leave_rebalance(db: Driver, fake: FakeNodes) -> None:
    fake.answer({"joined": 1, "members": 3})
    res = db.join(["127.0.0.2:8470"])
    assert (fake.last.method, fake.last.url.path) == ("POST", "/v1/cluster/join")
    assert fake.body() == {"seeds": ["127.0.0.2:8470"]}
    assert (res.joined, res.members) == (1, 3)
    moves = [{"collection": "docs", "shard": 1, "from": "n1", "to": "n2"}]
    fake.answer({"moves": moves, "left": True})
    out = db.leave(max_wait=120)
    assert (fake.last.method, fake.last.url.path) == ("POST", "/v1/cluster/leave")
    assert fake.last.extensions["timeout"]["read"] == 120
    assert out.left and out.moves[0].to_node == "n2"
    fake.answer({"moves": moves})
    plan = db.rebalance(dry_run=True)
    assert fake.body() == {"dry_run": True}
    assert [(p.collection, p.shard, p.from_node, p.to_node) for p in plan.moves] == [
        ("docs", 1, "n1", "n2")]
    db.rebalance()
    assert fake.body() == {"dry_run": False}


def test_health_ready_metrics_openapi(db: Driver, fake: FakeNodes) -> None:
    fake.answer({"status": "ok"})
    assert db.healthz() is True and fake.last.url.path == "/healthz"
    fake.answer({"status": "ready"})
    assert db.readyz() is True and fake.last.url.path == "/readyz"
    fake.answer({"error": {"code": "unavailable", "message": "starting"}}, status=503)
    assert db.readyz() is False
    assert db.healthz() is False
    fake.on("n1:1", lambda r: httpx.Response(200, text="# HELP x\nx 1\n"))
    assert db.metrics().startswith("# HELP") and fake.last.url.path == "/metrics"
    fake.on("n1:1", lambda r: reply({"openapi": "3.0.3", "paths": {}}))
    assert db.openapi()["openapi"] == "3.0.3" and fake.last.url.path == "/openapi.json"
