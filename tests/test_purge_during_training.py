"""A purge while an index trains: the training's catch-up replays the writes made since its
start from the change log, and a purge takes a tombstone's change key with it. A delete made
during the training and purged before the catch-up read it was never replayed into the new
index: the deleted document's vector stayed in it (a hit slot lost to every search near it),
and after a restart its label was counted live (the live bitmap comes from the index's keys).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from aquila.cluster.model.documents import Incoming
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex
from tests.conftest import wait_for
from tests.small_ivf import SPEC, doc


async def test_a_purge_during_a_training_leaves_no_deleted_vector_in_the_new_index(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_catch_up = Collection._catch_up_sync
    trained, go_on = threading.Event(), threading.Event()

    def catch_up(self: Collection, new: VectorIndex, upto: dict[int, int]) -> None:
        trained.set()
        go_on.wait(30)  # the delete and the purge below come now, before the catch-up
        real_catch_up(self, new, upto)

    monkeypatch.setattr(Collection, "_catch_up_sync", catch_up)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        try:
            await wait_for(trained.is_set, 30, what="the training to reach its catch-up")
            await coll.write({0: [Incoming("d0", None, b"", 2, "n1")]})
            await coll.snapshot()  # of the serving index: it covers the delete
            await coll.purge_tombstones(0, 10)
        finally:
            go_on.set()
        await wait_for(lambda: coll.index.trained and not coll.training, 30,
                       what="the training to end")
        assert coll.count() == 149
        assert coll.index.ntotal == 149, "the purged delete was not replayed into the new index"
        # Once the training is in, the tombstone goes at the next pass.
        assert await coll.purge_tombstones(0, 10) == 1
        page, _ = await coll.stream_shard(0, None, 200)
        assert "d0" not in {d.id for d in page}
    finally:
        await engine.close()
    monkeypatch.setattr(Collection, "_catch_up_sync", real_catch_up)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        assert coll.count() == 149 and coll.index.ntotal == 149
        assert len(coll.shards[0].live_labels()) == 149
    finally:
        await engine.close()
