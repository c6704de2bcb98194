"""A dropped collection is freed at its drop, its index with it, not at the garbage
collector's next full pass (which an idle node may not make for a long time): nothing it
holds holds it back in a reference cycle. Its search batchers held its bound methods."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aquila.cluster.model.filters import parse_filter
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import settled
from tests.small_ivf import SPEC, doc


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_collector")
async def test_a_dropped_collection_is_freed_at_once(tmp_path: Path, blocking: Blocking) -> None:
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        rows = await coll.search(np.stack([doc(i).vector for i in range(3)]), 1, 4)
        assert [r[0].id for r in rows] == ["d0", "d1", "d2"]
        flt = parse_filter({"must": [{"key": "g", "match": 3}]})
        assert await coll.search(np.stack([doc(0).vector]), 1, 4, flt) == [[]]
        # A training's thread holds its collection until it ends (a drop does not wait for
        # it): the drop is measured once the training the writes started is in.
        await settled(coll, 60)
        gone, index = weakref.ref(coll), weakref.ref(coll.index)
        del coll, rows
        await engine.drop("s")
        assert gone() is None and index() is None
    finally:
        await engine.close()


@pytest.mark.usefixtures("no_collector")
async def test_a_dropped_shard_is_freed_at_once(tmp_path: Path, blocking: Blocking) -> None:
    """Its live bitmap, digests and payload columns with it (a filter built them)."""
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        spec = dataclasses.replace(SPEC, shards=2)
        coll = await engine.ensure(spec, [0, 1], "u")
        await coll.write({0: [doc(i) for i in range(50)], 1: [doc(i) for i in range(50, 100)]})
        flt = parse_filter({"must": [{"key": "g", "match": 3}]})
        assert await coll.search(np.stack([doc(0).vector]), 1, 4, flt) == [[]]
        gone = weakref.ref(coll.shards[1])
        await engine.drop_shard("s", 1)
        assert 1 not in coll.shards and gone() is None
    finally:
        await engine.close()
