"""What the node's start made is frozen out of the garbage collector's sight once it is ready
(`node.collector`): a reference cycle through a collection would then never be collected, so a
closed collection lets its index go itself, whatever still refers to it."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.errors import Unavailable
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node import collector
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import wait_for

DIM = 8


async def test_a_dropped_collection_lets_its_index_go_while_still_referred_to(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(train_min=500), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(CollectionSpec("c", DIM, "l2", 2, 1, IndexSpec("ivf_flat")),
                                   range(2), "u")
        rng = np.random.default_rng(0)
        for lo in range(0, 1500, 500):
            await coll.write({s: [Incoming(f"d{s}-{i}", rng.standard_normal(DIM).astype(
                np.float32), b"{}", 1, "w") for i in range(lo, lo + 500)] for s in (0, 1)})
        await wait_for(lambda: coll.state == "trained" and not coll.training,
                       what="the index trained")
        await coll.snapshot()
        assert (await coll.search(rng.standard_normal((4, DIM)).astype(np.float32), 3, None))[0]
        trained = weakref.ref(coll.index)
        gc.disable()  # only references count, as for a frozen cycle
        try:
            await engine.drop("c")
            assert trained() is None, gc.get_referrers(trained())
        finally:
            gc.enable()
        assert coll.closed and coll.index.ntotal == 0  # `coll` still refers to the collection
        # A search through it now fails as a shard that did not answer, not with no hits.
        q = rng.standard_normal((1, DIM)).astype(np.float32)
        with pytest.raises(Unavailable, match="closed"):
            await coll.search(q, 3, None)
        with pytest.raises(Unavailable, match="closed"):
            await coll.search_found(q, 3, None)
    finally:
        await engine.close()


def test_figures_count_and_time_collections() -> None:
    collector.watch()
    collector.watch()  # once a process
    assert gc.callbacks.count(collector._timed) == 1
    before = collector.figures()
    gc.collect()
    after = collector.figures()
    assert after["collections"][2] == before["collections"][2] + 1
    assert after["seconds"][2] > before["seconds"][2]
    assert after["frozen"] == gc.get_freeze_count()
