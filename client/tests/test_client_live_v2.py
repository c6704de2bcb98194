"""The client against real nodes on the v2 routes: columnar upsert, count, scroll, search by
stored id, recall, and read-only keys. Written to the contract."""

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
    in_private_netns,
    sample_rows,
    start_cluster3,
    start_node,
)

import aquila_client as aq

N = 1000


@pytest.fixture(scope="module", params=["node", "cluster3"])
def deployment(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if request.param == "cluster3" and not in_private_netns():
        pytest.skip("a 3-node cluster runs inside the private network namespace "
                    "(scripts/test.sh as root)")
    root = tmp_path_factory.mktemp(f"client-v2-{request.param}")
    dep = start_node(root) if request.param == "node" else start_cluster3(root)
    try:
        yield dep
    finally:
        dep.stop()


@pytest.fixture(params=["sync", "async"])
def db(request: pytest.FixtureRequest, deployment: Deployment) -> Iterator[Driver]:
    d = Driver(request.param, deployment.addrs, None, api_key=API_KEY, timeout=60)
    yield d
    d.close()


@pytest.fixture
def loaded(db: Driver) -> Iterator[str]:
    """A fresh collection holding the first N sample rows, upserted by the client itself."""
    name = f"wn-{uuid.uuid4().hex[:8]}"
    _, base, ids, meta = sample_rows(N)
    db.create_collection(name, 384, metric="cosine", shards=3, index="flat")
    for lo in range(0, N, 300):
        res = db.upsert(name, base[lo:lo + 300], ids=ids[lo:lo + 300], metadata=meta[lo:lo + 300])
        assert res.ids == ids[lo:lo + 300] and res.upserted == len(res.ids)
    yield name
    db.delete_collection(name)


def test_upsert_round_trips_exactly(db: Driver, loaded: str) -> None:
    _, base, ids, meta = sample_rows(N)
    for i in (0, 1, 499, N - 1):
        doc = db.get_document(loaded, ids[i], vector=True)
        assert doc.metadata == meta[i]
        assert doc.vector is not None and doc.vector.tobytes() == base[i].tobytes()
    assert db.get_collection(loaded).count == N
    # Generated ids: made by the client, returned by the node, each one stored.
    extra = np.random.default_rng(5).standard_normal((3, 384)).astype(np.float32)
    res = db.upsert(loaded, extra, metadata=[{"pos": "noun"}] * 3)
    assert len(set(res.ids)) == 3 and res.upserted == 3
    for doc_id, vec in zip(res.ids, extra, strict=True):
        got = db.get_document(loaded, doc_id, vector=True)
        assert got.vector is not None and got.vector.tobytes() == vec.tobytes()
    # The same ids again replace, not add.
    db.upsert(loaded, extra[::-1], ids=res.ids, consistency="all")
    assert db.count(loaded).count == N + 3
    got = db.get_document(loaded, res.ids[0], vector=True)
    assert got.vector is not None and got.vector.tobytes() == extra[2].tobytes()
    assert db.delete_documents(loaded, res.ids) == 3


def test_bad_batches_are_rejected_whole(db: Driver, loaded: str) -> None:
    bad = np.ones((4, 384), np.float32)
    bad[2, 7] = np.nan
    with pytest.raises(aq.InvalidVector) as info:
        db.upsert(loaded, bad, ids=[f"bad{i}" for i in range(4)])
    assert "2" in info.value.message  # names the position of the bad document
    with pytest.raises(aq.DimensionMismatch):
        db.upsert(loaded, np.ones((2, 383), np.float32), ids=["x", "y"])
    assert db.count(loaded).count == N
    with pytest.raises(aq.NotFound):
        db.get_document(loaded, "bad0")


def test_count_against_the_sample(db: Driver, loaded: str) -> None:
    _, _, _, meta = sample_rows(N)
    total = db.count(loaded)
    assert (total.count, total.partial, total.missing_shards) == (N, False, [])
    for pos in ("noun", "verb", "adj", "adv"):
        flt = {"must": [{"key": "pos", "match": pos}]}
        assert db.count(loaded, filter=flt).count == sum(m["pos"] == pos for m in meta)
    either: dict[str, Any] = {"should": [{"key": "pos", "in": ["verb", "adv"]}]}
    assert db.count(loaded, filter=either).count == sum(m["pos"] in ("verb", "adv") for m in meta)


def test_scroll_returns_every_document_once(db: Driver, loaded: str) -> None:
    _, base, ids, meta = sample_rows(N)
    page = db.scroll(loaded, limit=100)
    assert 0 < len(page.documents) <= 100 and page.next_cursor is not None
    docs = db.scroll_all(loaded, limit=64, include=["metadata", "vector"])
    seen = [d.id for d in docs]
    assert len(seen) == len(set(seen)) == N and set(seen) == set(ids)
    row = {doc_id: i for i, doc_id in enumerate(ids)}
    for d in docs:
        assert d.metadata == meta[row[d.id]]
        assert d.vector is not None and d.vector.tobytes() == base[row[d.id]].tobytes()
    flt = {"must_not": [{"key": "pos", "match": "noun"}]}
    some = db.scroll_all(loaded, filter=flt, limit=37)
    assert sorted(d.id for d in some) == sorted(i for i, m in zip(ids, meta, strict=True)
                                                if m["pos"] != "noun")
    assert all(d.vector is None for d in some)


def test_search_by_stored_id(db: Driver, loaded: str) -> None:
    _, base, ids, _ = sample_rows(N)
    rows = [5, 250, 777]
    want, _ = cosine_top(base, base[rows], 10, exclude=rows)
    one = db.search(loaded, id=ids[5], k=10)
    assert len(one) == 1 and one[0].ids == [ids[j] for j in want[0]]
    assert ids[5] not in one[0].ids
    many = db.search(loaded, ids=[ids[r] for r in rows], k=10)
    assert many.ids == [[ids[j] for j in w] for w in want]
    with pytest.raises(aq.NotFound):
        db.search(loaded, id="no-such-document")


def test_search_by_recall_reports_its_nprobe(db: Driver) -> None:
    s, base, ids, meta = sample_rows(N)
    name = "recall_" + db.mode
    db.create_collection(name, 384, metric="cosine", shards=1, index="ivf_flat", nlist=16)
    try:
        db.upsert(name, base, ids=ids, metadata=meta)
        res = db.search(name, s.queries[:20], k=10, recall=0.95)
        assert res.nprobe is not None and 1 <= res.nprobe <= 16
        assert res.nprobes and max(res.nprobes.values()) == res.nprobe
        with pytest.raises(aq.BadRequest):
            db.search(name, s.queries[:1], recall=1.5)
    finally:
        db.delete_collection(name)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_read_key_reads_and_may_not_write(tmp_path: Path, mode: str) -> None:
    dep = start_node(tmp_path, read_key="reader")
    admin = Driver(mode, dep.addrs, None, api_key=API_KEY)
    reader = Driver(mode, dep.addrs, None, api_key="reader")
    try:
        admin.create_collection("ro", 4)
        admin.upsert("ro", np.eye(4, dtype=np.float32), ids=list("abcd"))
        assert reader.search("ro", np.ones(4), k=2)[0].ids
        assert reader.count("ro").count == 4
        assert len(reader.scroll_all("ro")) == 4
        assert reader.get_document("ro", "a").id == "a"
        calls: list[Callable[[], Any]] = [
            lambda: reader.upsert("ro", np.ones((1, 4)), ids=["e"]),
            lambda: reader.delete_document("ro", "a"),
            lambda: reader.delete_documents("ro", ["a"]),
            lambda: reader.create_collection("other", 4),
            lambda: reader.delete_collection("ro"),
        ]
        for call in calls:
            with pytest.raises(aq.Forbidden):
                call()
        assert admin.count("ro").count == 4
    finally:
        admin.close()
        reader.close()
        dep.stop()
