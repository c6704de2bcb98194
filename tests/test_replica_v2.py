"""Count and scroll on the replica seam: the same answers from this node's replica and from a
peer's through the wire codecs, the in-memory twin against the real engine, and the checks
the codecs make on what a peer answers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aquila.cluster.model.bounds import BoundsError
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.operations import CountRequest, ScrollRequest
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.cluster.replication.membackend import MemoryBackend
from aquila.cluster.replication.remote import decode_counts, decode_page_of
from aquila.cluster.replication.replica import Replica
from aquila.node.storage import paging
from aquila.node.storage.backend import EngineBackend
from tests.test_replica import SPEC, Pair, doc, engine, pair  # noqa: F401 - fixtures

__all__ = ["engine", "pair"]


def counting(flt: Any = None) -> CountRequest:
    return CountRequest(flt, parse_filter(flt), True, None)


def scrolling(flt: Any = None, vector: bool = False) -> ScrollRequest:
    return ScrollRequest(flt, parse_filter(flt), 100, None, True, vector, False, None)


async def test_count_per_shard_with_and_without_a_filter(pair: tuple[Pair, Replica]) -> None:
    _, rep = pair
    await rep.write(SPEC, "u1", {0: [doc(i) for i in range(10)], 1: [doc(i) for i in range(10, 14)]})
    await rep.write(SPEC, "u1", {0: [doc(2, 20, deleted=True)]})
    assert await rep.count(SPEC, counting(), [0, 1], 5.0) == {0: 9, 1: 4}
    odd = {"must": [{"key": "i", "in": [1, 3, 5, 11, 2]}]}
    assert await rep.count(SPEC, counting(odd), [0, 1], 5.0) == {0: 3, 1: 1}
    assert await rep.count(SPEC, counting(odd), [1], 5.0) == {1: 1}


async def test_scroll_pages_a_shard_in_id_order(pair: tuple[Pair, Replica]) -> None:
    _, rep = pair
    docs = [doc(i) for i in range(30)]
    await rep.write(SPEC, "u1", {0: docs})
    await rep.write(SPEC, "u1", {0: [doc(4, 20, deleted=True)]})
    live = sorted(d.id for d in docs if d.id != "d4")
    seen: list[str] = []
    after = None
    while True:
        page, after = await rep.scroll(SPEC, scrolling(vector=True), 0, after, 7, 5.0)
        assert len(page) <= 7
        seen += [h.id for h in page]
        for h in page:
            assert h.shard == 0 and h.metadata == b'{"i":%d}' % int(h.id[1:])
            assert np.frombuffer(h.vector, "<f4").tolist() == [float(h.id[1:]), 1, 0, 0]
        if after is None:
            break
    assert seen == live
    flt = {"must": [{"key": "i", "range": {"gte": 20}}]}
    page, after = await rep.scroll(SPEC, scrolling(flt), 0, "d25", 100, 5.0)
    assert [h.id for h in page] == ["d26", "d27", "d28", "d29"] and after is None
    assert all(h.vector == b"" for h in page)


async def test_twin_counts_and_scrolls_as_the_engine_does(
    engine: EngineBackend, monkeypatch: pytest.MonkeyPatch,  # noqa: F811 - fixture
) -> None:
    spec = CollectionSpec("c", 4, "l2", 3, 1, IndexSpec("flat"))
    mem = MemoryBackend(scan_limit=9)
    monkeypatch.setattr(paging, "SCAN_LIMIT", 9)
    rng = np.random.default_rng(3)
    writes: dict[int, list[Incoming]] = {0: [], 1: [], 2: []}
    for i in range(90):
        writes[shard_of(f"k{i}", 3)].append(Incoming(
            f"k{i}", rng.standard_normal(4).astype(np.float32), b'{"g":%d}' % (i % 5), 10, "n"))
    gone = {s: [Incoming(d.id, None, b"", 20, "n") for d in ds[::4]] for s, ds in writes.items()}
    for backend in (engine, mem):
        await backend.ensure(spec, [0, 1, 2], "u")
        await backend.write(spec, writes)
        await backend.write(spec, gone)
    for flt in (None, {"must": [{"key": "g", "in": [1, 2]}]}, {"must_not": [{"key": "g", "match": 0}]}):
        pred = parse_filter(flt)
        assert await engine.count(spec, [0, 1, 2], pred) == await mem.count(spec, [0, 1, 2], pred)
        for s in range(3):
            after: str | None = None
            while True:
                a, a_next = await engine.scroll(spec, s, after, 4, pred, True)
                b, b_next = await mem.scroll(spec, s, after, 4, pred, True)
                assert (a_next, [(h.id, h.metadata, h.vector) for h in a]) == \
                    (b_next, [(h.id, h.metadata, h.vector) for h in b])
                if a_next is None:
                    break
                after = a_next


# -- what a peer answers, checked ---------------------------------------------------------
def test_counts_from_a_peer_are_bounded_and_complete() -> None:
    assert decode_counts({"counts": {"0": 3, "2": 0}}, [0, 2]) == {0: 3, 2: 0}
    for bad in ({"counts": {"0": 3}}, {"counts": {"0": 3, "1": 1, "2": 0}},
                {"counts": {"0": -1, "2": 0}}, {"counts": {"0": 2**60, "2": 0}},
                {"counts": {"0": 1.5, "2": 0}}, {"counts": [1, 2]}, {}, [], None):
        with pytest.raises((BoundsError, ValueError)):
            decode_counts(bad, [0, 2])


def test_scroll_pages_from_a_peer_are_checked() -> None:
    vec = "AACAPwAAAAAAAAAAAAAAAA=="  # [1, 0, 0, 0]
    good = {"docs": [["a", "{}", vec], ["b", '{"x":1}', vec]], "next": "b"}
    docs, nxt = decode_page_of(good, SPEC, 0, None, 2, True)
    assert [h.id for h in docs] == ["a", "b"] and nxt == "b" and len(docs[0].vector) == 16
    for bad in (
        {"docs": [["b", "{}", vec], ["a", "{}", vec]], "next": None},  # out of order
        {"docs": [["a", "{}", vec]] * 2, "next": None},  # repeated
        {"docs": [["a", "{}", vec], ["b", "{}", vec], ["c", "{}", vec]], "next": None},  # > limit
        {"docs": [["a", "[1]", vec]], "next": None},  # metadata not an object
        {"docs": [["a", "{", vec]], "next": None},  # not JSON
        {"docs": [["a", "{}", "AACAPw=="]], "next": None},  # wrong dimension
        {"docs": [["", "{}", vec]], "next": None},  # not an id
        {"docs": [["c", "{}", vec]], "next": "b"},  # goes on from behind its documents
        {"docs": [], "next": 5},
        {"docs": "x", "next": None},
        [],
    ):
        with pytest.raises((BoundsError, ValueError)):
            decode_page_of(bad, SPEC, 0, None, 2, True)
    with pytest.raises(BoundsError):  # nothing at or before where it was asked to start
        decode_page_of({"docs": [["a", "{}", None]], "next": None}, SPEC, 0, "a", 5, False)


def test_the_twin_looks_at_as_many_records_a_page_as_the_engine() -> None:
    assert MemoryBackend().scan_limit == paging.SCAN_LIMIT
