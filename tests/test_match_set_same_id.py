"""A batch that names a document twice with a delete among its writes (the store's general
path, which a write frame may carry: the public API sends deletes and upserts apart, and a
group commit never puts one id twice, so today only a peer's frame does): the cached match
sets of filters are updated with the labels deleted and the labels written, and one label
was in both. Its bit was cleared after it was set, and the count moved twice: the document,
live and admitted by the filter, was missing from filtered searches, counts and scrolls for
as long as the filter stayed cached."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import wait_for

SPEC = CollectionSpec("c", 4, "l2", 1, 1, IndexSpec("flat"))
FLT = parse_filter({"must": [{"key": "k", "match": "a"}]})


def put(i: int, version: int, k: str) -> Incoming:
    vec = np.full(4, float(i), np.float32)
    return Incoming(f"d{i}", vec, orjson.dumps({"k": k}), version, "n")


def delete(i: int, version: int) -> Incoming:
    return Incoming(f"d{i}", None, b"", version, "n")


async def admitted(coll: object) -> tuple[int, list[str], list[str]]:
    from aquila.node.storage.collection import Collection

    assert isinstance(coll, Collection) and FLT is not None
    count = (await coll.count_matching([0], FLT))[0]
    page, _ = await coll.scroll(0, None, 100, FLT, False)
    rows = await coll.search(np.zeros((1, 4), np.float32), 10, None, FLT)
    return count, sorted(h.id for h in page), sorted(h.id for h in rows[0])


async def test_a_document_deleted_and_written_again_in_one_batch_stays_matched(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [put(1, 1, "a"), put(2, 1, "a"), put(3, 1, "b")]})
        assert await admitted(coll) == (2, ["d1", "d2"], ["d1", "d2"])  # now cached
        await coll.write({0: [delete(1, 2), put(1, 3, "a")]})
        assert await admitted(coll) == (2, ["d1", "d2"], ["d1", "d2"])
        # Deleted twice with a write between: gone once.
        await coll.write({0: [delete(2, 2), put(2, 3, "a"), delete(2, 4)]})
        assert await admitted(coll) == (1, ["d1"], ["d1"])
        # Written again, then a write that does not match the filter.
        await coll.write({0: [delete(1, 4), put(1, 5, "a"), put(1, 6, "b"), put(3, 7, "a")]})
        assert await admitted(coll) == (1, ["d3"], ["d3"])
    finally:
        await engine.close()


async def test_a_cancelled_count_caches_no_match_set_older_than_a_write(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A count (or a scroll) cancelled while its thread evaluates a filter: a hedge that
    lost, a deadline. The read lock was let go with the cancellation, a write reached the
    index and the cached match sets, and the thread then cached the set it had evaluated
    before the write: the filter's answers stayed without the written document for as long
    as it stayed cached."""
    from aquila.node.storage import collection as collection_module
    from aquila.node.storage.payload_index import PayloadIndex

    real_mask, real_count = PayloadIndex.mask, collection_module.count_shards
    evaluating, gate, ended = threading.Event(), threading.Event(), threading.Event()

    def mask(self: PayloadIndex, *args: Any) -> Any:
        out = real_mask(self, *args)
        if not evaluating.is_set():
            evaluating.set()
            gate.wait(3)  # a shard of millions of labels takes a while (bounded)
        return out

    def count(*args: Any) -> Any:
        try:
            return real_count(*args)
        finally:
            ended.set()

    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [put(1, 1, "a"), put(2, 1, "b")]})
        monkeypatch.setattr(PayloadIndex, "mask", mask)
        monkeypatch.setattr(collection_module, "count_shards", count)
        assert FLT is not None
        counting = asyncio.ensure_future(coll.count_matching([0], FLT))
        try:
            await wait_for(evaluating.is_set, 30, what="the filter's evaluation")
            counting.cancel()
            await asyncio.gather(counting, return_exceptions=True)
            await coll.write({0: [put(2, 2, "a")]})
        finally:
            gate.set()
        await wait_for(ended.is_set, 30, what="the count's thread to end")
        assert await admitted(coll) == (2, ["d1", "d2"], ["d1", "d2"])
    finally:
        await engine.close()
