"""What a training leaves in memory once its index is swapped in: the index it replaced is
freed at the swap (not kept until the next snapshot ends, past the heap trim that follows the
swap), and the writes made during the training are added before the new index's lists are
compacted (added after, they grew every list by doubling again: 350 MiB of RSS above the same
node restarted after a training at 2.46M vectors caught up to 3M)."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.node.blocking import Blocking
from aquila.node.storage import collection as collection_module
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex
from tests.conftest import settled, wait_for
from tests.small_ivf import SPEC, doc

# Retrainings wait for writes to pause this long.
TUNING = Tuning(train_min=100, retrain_quiet_s=0.2)


async def test_the_replaced_index_is_freed_at_the_swap(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    gate, held = threading.Event(), threading.Event()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        await settled(coll, what="the first training")
        await coll.snapshot()
        first = weakref.ref(coll.index)
        first_faiss = weakref.ref(coll.index.index)
        real = VectorIndex.stage

        def stage(self: VectorIndex, path: Path, covered: dict[int, int]) -> Path:
            """The snapshot of the retrained index held until the test looked."""
            if self.trained_at == 300:
                held.set()
                gate.wait(10)
            return real(self, path, covered)

        monkeypatch.setattr(VectorIndex, "stage", stage)
        await coll.write({0: [doc(i) for i in range(150, 300)]})
        await wait_for(held.is_set, 30, what="the snapshot after the retraining")
        assert coll.index.trained_at == 300
        assert first() is None and first_faiss() is None, \
            "the replaced index outlived the swap"
    finally:
        gate.set()
        await engine.close()


async def test_writes_made_during_a_training_are_added_before_its_compaction(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained, go_on = threading.Event(), threading.Event()
    real_train, real_compacted = collection_module.train_streamed, collection_module.compacted
    compacted_sizes: list[int] = []

    def train(*args: Any, **kwargs: Any) -> Any:
        out = real_train(*args, **kwargs)
        trained.set()
        go_on.wait(10)  # the writes below come now, while the training "runs"
        return out

    def compacted(index: VectorIndex, scratch: Path) -> VectorIndex:
        compacted_sizes.append(index.ntotal)
        return real_compacted(index, scratch)

    monkeypatch.setattr(collection_module, "train_streamed", train)
    monkeypatch.setattr(collection_module, "compacted", compacted)
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        try:
            await wait_for(trained.is_set, 30, what="the training")
            late = [doc(i) for i in range(150, 190)]
            await coll.write({0: late})
        finally:
            go_on.set()
        await settled(coll, what="the swap")
        assert compacted_sizes == [190], "the writes made meanwhile were added after it"
        assert coll.index.ntotal == 190
        queries = np.stack([d.vector for d in late if d.vector is not None])
        rows = await coll.search(queries, 1, 4)  # every list probed: exact
        assert [r[0].id for r in rows] == [d.id for d in late]
    finally:
        await engine.close()


async def test_a_catch_up_the_writes_outpace_ends_with_them_held(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that come faster than a training's catch-up replays them (the replay is slow
    here unless the writes are held, as a replay at nice 10 on busy cores was beside a bulk
    load): the catch-up ends with the writes held, a slice at a time, and the swap, made
    while the writes still go on, replays only the few that came between; the index holds
    every document after it."""
    from aquila.node.storage.shard import Shard

    monkeypatch.setattr(collection_module, "CATCH_UP_TAIL", 30)
    monkeypatch.setattr(collection_module, "CATCH_UP_SLICE_S", 0.05)
    colls: list[Any] = []
    real_replay = Shard.replay

    def replay(self: Shard, after_seq: int, chunk: int = 2048) -> Any:
        for ops in real_replay(self, after_seq, 10):
            if colls and colls[0].training and not colls[0].write_mutex.locked():
                time.sleep(0.05)  # 200 changes a second, beside the writes
            yield ops

    real_swap = collection_module.Collection._swap_sync
    swap_replayed: list[int] = []

    def swap(self: Any, new: VectorIndex, upto: dict[int, int], same: bool = False) -> None:
        swap_replayed.append(sum(self._applied()[s] - q for s, q in upto.items()))
        real_swap(self, new, upto, same)

    monkeypatch.setattr(Shard, "replay", replay)
    monkeypatch.setattr(collection_module.Collection, "_swap_sync", swap)
    engine = Engine(tmp_path, blocking,
                    Tuning(train_min=100, retrain_quiet_s=0.2, retrain_max_wait_s=0.2),
                    fsync=False)
    await engine.start()
    stop = asyncio.Event()
    written = [150]

    async def writer() -> None:
        while not stop.is_set():
            n = written[0]
            await coll.write({0: [doc(i) for i in range(n, n + 20)]})
            written[0] = n + 20
            await asyncio.sleep(0.005)

    try:
        coll = await engine.ensure(SPEC, [0], "u")
        colls.append(coll)
        await coll.write({0: [doc(i) for i in range(150)]})
        await settled(coll, what="the first training")
        task = asyncio.create_task(writer())
        try:
            await wait_for(lambda: coll.index.trained_at >= 300, 60,
                           what="the retraining swapped in while the writes go on")
            assert not task.done()
        finally:
            stop.set()
            await task
        assert len(swap_replayed) >= 2  # the first training's and the retraining's
        during = written[0] - 300
        assert during > 200, "too few writes beside the retraining to tell"
        assert swap_replayed[-1] <= 60, (swap_replayed, during)  # a write or two
        await settled(coll, what="the last training")
        await wait_for(lambda: not coll.training, 60, what="no training left")
        assert coll.index.ntotal == written[0] == coll.count()
        probe = [doc(i) for i in range(0, written[0], max(1, written[0] // 25))]
        rows = await coll.search(np.stack([d.vector for d in probe if d.vector is not None]),
                                 1, 4)  # every list probed: exact
        assert [r[0].id for r in rows] == [d.id for d in probe]
    finally:
        stop.set()
        await engine.close()


async def test_a_search_is_answered_while_a_catch_up_and_a_write_take_the_write_threads(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training's catch-up replays on a write thread, a second at a time; a write's index
    update holds the index's write lock (every search waits) from before it has a thread.
    With the next write being made durable on the other write thread (its fsync), the update
    had none until the slice or that write ended, and searches waited as long: the update
    needs a thread of its own beside the two."""
    from aquila.cluster.model.documents import Incoming
    from tests.held_training import hold_catch_up

    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    reached, go_on = hold_catch_up(monkeypatch)
    staging, stage_go = threading.Event(), threading.Event()
    real_write = collection_module.Collection._write_sync

    def write_sync(self: Any, group: list[dict[int, list[Any]]]) -> Any:
        if any(d.id == "d300" and d.version == 2 for by in group for d in by.get(0, [])):
            staging.set()  # the next write being made durable: held until the test looked
            stage_go.wait(30)
        return real_write(self, group)

    monkeypatch.setattr(collection_module.Collection, "_write_sync", write_sync)
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        reached.set()  # the first training's catch-up is not held
        go_on.set()
        await coll.write({0: [doc(i) for i in range(150)]})
        await settled(coll, what="the first training")
        reached.clear()
        go_on.clear()
        await coll.write({0: [doc(i) for i in range(150, 300)]})
        await wait_for(reached.is_set, 30, what="the retraining's catch-up on a write thread")
        # Two writes of one id (two groups): the first's update waits for a thread while
        # the second's is made durable.
        one = doc(300)
        first = asyncio.create_task(coll.write({0: [one]}))
        second = asyncio.create_task(coll.write(
            {0: [Incoming(one.id, one.vector, one.metadata, 2, one.writer)]}))
        await wait_for(staging.is_set, 30, what="the second write on the other write thread")
        rows = await asyncio.wait_for(coll.search(doc(5).vector[None, :], 1, 4), 10)
        assert rows[0][0].id == doc(5).id
        stage_go.set()
        go_on.set()
        await asyncio.gather(first, second)
    finally:
        stage_go.set()
        go_on.set()
        await engine.close()


async def test_a_held_catch_up_ends_though_the_writes_let_through_outrun_its_slices(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two held slices of a catch-up the writes queued meanwhile go, as one group
    (up to GROUP_MAX_DOCS): when that group brings more changes than a slice replays, each
    slice fell further behind, the training was never swapped in and the load went on at
    its own pace. A held slice that finds no fewer changes left than the one before replays
    the rest to the end, the writes held: the load slows to the replay's pace."""
    from aquila.node.storage.shard import Shard

    monkeypatch.setattr(collection_module, "CATCH_UP_TAIL", 30)
    monkeypatch.setattr(collection_module, "CATCH_UP_ROUNDS", 1)
    monkeypatch.setattr(collection_module, "CATCH_UP_SLICE_S", 0.02)
    colls: list[Any] = []
    real_replay = Shard.replay

    def replay(self: Shard, after_seq: int, chunk: int = 2048) -> Any:
        for ops in real_replay(self, after_seq, 10):
            if colls and colls[0].training:
                time.sleep(0.005)  # 2,000 changes a second, held or not
            yield ops

    monkeypatch.setattr(Shard, "replay", replay)
    engine = Engine(tmp_path, blocking,
                    Tuning(train_min=100, retrain_quiet_s=0.2, retrain_max_wait_s=0.2),
                    fsync=False)
    await engine.start()
    stop = asyncio.Event()
    written = [150]

    async def writer() -> None:  # eight of them: a group of 160 between two slices
        while not stop.is_set():
            n = written[0]
            written[0] = n + 20
            await coll.write({0: [doc(i) for i in range(n, n + 20)]})
            await asyncio.sleep(0)

    try:
        coll = await engine.ensure(SPEC, [0], "u")
        colls.append(coll)
        await coll.write({0: [doc(i) for i in range(150)]})
        await settled(coll, what="the first training")
        tasks = [asyncio.create_task(writer()) for _ in range(8)]
        try:
            await wait_for(lambda: coll.index.trained_at >= 300, 60,
                           what="the retraining swapped in while the writes go on")
            assert not any(t.done() for t in tasks)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        await wait_for(lambda: not coll.training, 120, what="no training left")
        assert coll.index.ntotal == written[0] == coll.count()
    finally:
        stop.set()
        await engine.close()
