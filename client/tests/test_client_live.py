"""The client against real nodes: a single `aquila serve` (anywhere) and a 3-node cluster (in
the private network namespace), sync and async alike, for every route the server has today.
Tests of the v2 routes are in test_client_live_v2.py."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Driver
from live import (
    API_KEY,
    Deployment,
    cosine_top,
    create,
    in_private_netns,
    sample_rows,
    seed,
    start_cluster3,
    start_node,
)

import aquila_client as aq

N = 800  # sample rows seeded into the shared collection
WN = "wn"


@pytest.fixture(scope="module", params=["node", "cluster3"])
def deployment(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if request.param == "cluster3" and not in_private_netns():
        pytest.skip("a 3-node cluster runs inside the private network namespace "
                    "(scripts/test.sh as root)")
    root = tmp_path_factory.mktemp(f"client-{request.param}")
    dep = start_node(root) if request.param == "node" else start_cluster3(root)
    try:
        _, vecs, ids, meta = sample_rows(N)
        # Exact (flat) so search answers can be checked against brute force.
        create(dep.nodes[0], WN, 384, metric="cosine", shards=3,
               replication=2 if dep.kind == "cluster3" else 1, index={"type": "flat"})
        seed(dep.nodes[0], WN, vecs, ids, meta)
        yield dep
    finally:
        dep.stop()


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest,
            deployment: Deployment) -> Iterator[Callable[..., Driver]]:
    made: list[Driver] = []

    def make(nodes: list[str] | None = None, **settings: Any) -> Driver:
        settings.setdefault("api_key", API_KEY)
        d = Driver(request.param, nodes or deployment.addrs, None, **settings)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def db(connect: Callable[..., Driver]) -> Driver:
    return connect()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- operations and cluster ---------------------------------------------------------------
def test_health_ready_cluster_and_shards(db: Driver, deployment: Deployment) -> None:
    for addr in deployment.addrs:
        assert db.healthz(node=addr) is True
        assert db.readyz(node=addr) is True
    info = db.cluster()
    assert info.node_addr in deployment.addrs
    assert {m.addr for m in info.members} == set(deployment.addrs)
    assert all(m.state == "alive" for m in info.members)
    first = db.cluster(node=deployment.addrs[-1])
    assert first.node_addr == deployment.addrs[-1]
    smap = db.shards()
    assert smap.epoch >= 1
    placements = smap.collections[WN]
    assert [p.shard for p in placements] == [0, 1, 2]
    member_ids = {m.id for m in info.members}
    for p in placements:
        assert p.moving is None and set(p.replicas) <= member_ids
        assert len(p.replicas) == (2 if deployment.kind == "cluster3" else 1)
    plan = db.rebalance(dry_run=True)
    assert isinstance(plan.moves, list)
    text = db.metrics()
    assert "# TYPE" in text
    spec = db.openapi()
    assert "/v1/collections/{name}/search" in spec["paths"]


# -- collections --------------------------------------------------------------------------
def test_collection_lifecycle(db: Driver) -> None:
    name = unique("col")
    col = db.create_collection(name, 8, metric="ip", shards=2, index="ivf_flat", nprobe=4)
    assert (col.name, col.dim, col.metric, col.shards, col.replication) == (name, 8, "ip", 2, 1)
    assert (col.index.type, col.index.nlist, col.index.nprobe) == ("ivf_flat", None, 4)
    again = db.create_collection(name, 8, metric="ip", shards=2, index="ivf_flat", nprobe=4)
    assert again.name == name  # the same settings again: fine
    with pytest.raises(aq.AlreadyExists):
        db.create_collection(name, 16)
    got = db.get_collection(name)
    assert got.count == 0 and len(got.shard_states) == 2
    assert name in [c.name for c in db.list_collections()]
    assert db.delete_collection(name) is True
    with pytest.raises(aq.NotFound):
        db.get_collection(name)
    with pytest.raises(aq.NotFound):
        db.delete_collection(name)
    with pytest.raises(aq.BadRequest):
        db.create_collection("bad name!", 8)


# -- documents ----------------------------------------------------------------------------
def test_documents_round_trip_exactly(db: Driver, deployment: Deployment) -> None:
    name = unique("docs")
    create(deployment.nodes[0], name, 5, shards=2)
    rng = np.random.default_rng(7)
    vecs = rng.standard_normal((6, 5)).astype(np.float32)
    vecs[0, :] = np.array([1e-38, -0.0, 9.9e14, 1.0000001, np.pi], dtype=np.float32)
    # "." and "..": path segments a URL library would resolve away (GET .../documents/..
    # is GET /v1/collections/{name}) unless they are percent-encoded.
    ids = ["a/b c?#%", "ünï/cødé", "plain", "x" * 256, "..", "."]
    meta = [{"n": i, "nested": {"tags": ["t", i]}} for i in range(6)]
    seed(deployment.nodes[0], name, vecs, ids, meta)
    for i, doc_id in enumerate(ids):
        doc = db.get_document(name, doc_id, vector=True)
        assert doc.id == doc_id and doc.metadata == meta[i]
        assert doc.vector is not None and doc.vector.dtype == np.float32
        assert doc.vector.tobytes() == vecs[i].tobytes()  # bit for bit
        assert db.get_document(name, doc_id).vector is None
    with pytest.raises(aq.NotFound):
        db.get_document(name, "absent")
    assert db.delete_document(name, ids[0]) == 1
    with pytest.raises(aq.NotFound):
        db.get_document(name, ids[0])
    with pytest.raises(aq.NotFound):
        db.delete_document(name, ids[0])
    assert db.delete_documents(name, [ids[1], ids[2], "never-there"]) == 2
    assert db.delete_document(name, "..") == 1 and db.get_document(name, ".").id == "."
    assert db.get_collection(name).count == 2
    with pytest.raises(aq.NotFound):
        db.get_document(unique("no-such-collection"), "a")
    db.delete_collection(name)


# -- search -------------------------------------------------------------------------------
def test_search_matches_brute_force(db: Driver) -> None:
    s, base, ids, meta = sample_rows(N)
    queries = s.queries[:12]
    res = db.search(WN, queries, k=10, include=["metadata", "vector"], allow_partial=False,
                    timeout_ms=20_000)
    assert len(res) == 12 and not res.partial and res.missing_shards == [] and res.took_ms >= 0
    want, want_scores = cosine_top(base, queries, 10)
    for qi, r in enumerate(res):
        assert r.ids == [ids[j] for j in want[qi]], qi
        np.testing.assert_allclose(r.scores, want_scores[qi], rtol=0, atol=1e-5)
        assert r.metadata == [meta[j] for j in want[qi]]
        assert r.vectors is not None
        assert r.vectors.tobytes() == base[want[qi]].tobytes()  # stored float32, exact
    one = db.search(WN, queries[3], k=5)  # one vector: one result list
    assert len(one) == 1 and one[0].ids == res[3].ids[:5]
    assert one[0].vectors is None and one[0].metadata[0] is not None


def test_search_with_a_filter_returns_the_k_best_matches(db: Driver) -> None:
    s, base, ids, meta = sample_rows(N)
    queries = s.queries[20:26]
    for pos in ("verb", "adv"):
        flt = {"must": [{"key": "pos", "match": pos}]}
        res = db.search(WN, queries, k=7, filter=flt, nprobe=4)
        allowed = np.array([m["pos"] == pos for m in meta])
        want, _ = cosine_top(base, queries, 7, allowed=allowed)
        for qi, r in enumerate(res):
            expected = [ids[j] for j in want[qi] if allowed[j]]
            assert r.ids == expected
            assert all(m is not None and m["pos"] == pos for m in r.metadata)


# -- errors ---------------------------------------------------------------------------------
def test_error_classes_from_a_real_node(db: Driver, connect: Callable[..., Driver]) -> None:
    q = np.ones(384, np.float32)
    with pytest.raises(aq.BadRequest):
        db.search(WN, q, k=0)
    with pytest.raises(aq.DimensionMismatch):
        db.search(WN, np.ones(3, np.float32))
    with pytest.raises(aq.InvalidVector):  # JSON cannot carry NaN: refused before sending
        db.search(WN, np.full(384, np.nan, np.float32))
    with pytest.raises(aq.NotFound):
        db.search(unique("none"), q)
    with pytest.raises(aq.Unauthorized):
        connect(api_key=None).list_collections()
    with pytest.raises(aq.Unauthorized):
        connect(api_key="wrong").search(WN, q)
    assert connect(api_key=None).healthz() is True  # the probe is open


def test_payload_too_large(tmp_path: Path) -> None:
    dep = start_node(tmp_path, max_body_bytes=4096)
    try:
        with aq.Client(dep.addrs, api_key=API_KEY, trust_env=False) as c:
            c.create_collection("big", 384)
            with pytest.raises(aq.PayloadTooLarge) as info:
                c.search("big", np.random.default_rng(0).standard_normal((40, 384)))
            assert info.value.status == 413
    finally:
        dep.stop()
