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


@pytest.mark.parametrize("way", ["moved", "dropped", "replaced"])
async def test_what_the_start_opened_is_freed_once_let_go(
    tmp_path: Path, blocking: Blocking, frozen: None, way: str
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        spec = replace(SPEC, shards=2)
        coll = await engine.ensure(spec, [0, 1], "u")
        await coll.write({0: [doc(i) for i in range(10)], 1: [doc(20)]})
        gone = ([weakref.ref(coll.shards[1])] if way == "moved"
                else [weakref.ref(coll), weakref.ref(coll.index)])
        del coll
        gc.collect()
        gc.freeze()  # as `aquila serve` does once started
        if way == "moved":
            await engine.drop_shard("s", 1)
        elif way == "dropped":
            await engine.drop("s")
        else:
            await engine.ensure(spec, [0, 1], "u2")  # the name created again
        gc.collect()
        assert [r() for r in gone] == [None] * len(gone), f"{way}, it stays in memory"
    finally:
        await engine.close()
