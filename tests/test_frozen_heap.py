"""`aquila serve` freezes the heap its start built out of the garbage collector (gc.freeze):
the collections opened then included. A collection and a shard sit in reference cycles (a
collection's batchers hold its bound methods): one dropped, replaced or moved away later was
never freed, its index and arrays with it, until the process ended."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.small_ivf import SPEC, doc


@pytest.fixture
def frozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # what a test froze goes back to the collector


async def test_what_the_start_opened_is_freed_once_let_go(
    tmp_path: Path, blocking: Blocking, frozen: None
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        spec = replace(SPEC, shards=2)
        coll = await engine.ensure(spec, [0, 1], "u")
        await coll.write({0: [doc(i) for i in range(10)], 1: [doc(20)]})
        other = await engine.ensure(replace(SPEC, name="t"), [0], "u")
        await other.write({0: [doc(1)]})
        moved = weakref.ref(coll.shards[1])
        dropped = [weakref.ref(coll), weakref.ref(coll.index)]
        replaced = [weakref.ref(other), weakref.ref(other.index)]
        del coll, other
        gc.collect()
        gc.freeze()  # as `aquila serve` does once started

        await engine.drop_shard("s", 1)  # moved away
        await engine.drop("s")
        await engine.ensure(replace(SPEC, name="t"), [0], "u2")  # created again
        gc.collect()
        assert moved() is None, "a shard moved away stays in memory"
        assert [r() for r in dropped] == [None, None], "a dropped collection stays in memory"
        assert [r() for r in replaced] == [None, None], "a replaced collection stays in memory"
    finally:
        await engine.close()
