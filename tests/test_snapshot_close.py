"""A collection's close waits for the snapshot being written to end, also the one a training
starts after its swap (a task the close cancels): the thread writing it cannot be stopped,
and a close that returned before it ended let the file land in the folder of the collection's
next incarnation (or an older snapshot replace the one the close itself wrote)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.model.errors import Unavailable
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.files import TMP_SUFFIX
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex
from tests.conftest import wait_for
from tests.small_ivf import SPEC, doc


def hold_the_trained_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[threading.Event, threading.Event, threading.Event]:
    """The first snapshot of a trained index (the one a training takes after its swap) held
    until `gate` is set (3 s at most: a large index's file takes a while): `started` when it
    is held, `ended` when it is written."""
    real = VectorIndex.stage
    started, ended, gate = threading.Event(), threading.Event(), threading.Event()

    def held(self: VectorIndex, path: Path, covered: dict[int, int]) -> Path:
        if self.trained and not started.is_set():
            started.set()
            try:
                gate.wait(3)
                return real(self, path, covered)
            finally:
                ended.set()
        return real(self, path, covered)

    monkeypatch.setattr(VectorIndex, "stage", held)
    return started, ended, gate


async def test_a_drop_waits_for_the_snapshot_a_training_is_writing(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, ended, gate = hold_the_trained_snapshot(monkeypatch)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        await wait_for(started.is_set, 30, what="the snapshot after the training")
        try:
            await engine.drop("s")
            # A collection of that name again, in the same folder.
            again = await engine.ensure(SPEC, [0], "u2")
            returned_before_the_snapshot_ended = not ended.is_set()
        finally:
            gate.set()
        await wait_for(ended.is_set, 30, what="the snapshot thread to end")
        left = [p.name for p in again.root.iterdir() if p.name.endswith(TMP_SUFFIX)]
        assert not left, f"the dropped collection's snapshot landed in the new folder: {left}"
        assert not returned_before_the_snapshot_ended
    finally:
        await engine.close()


async def test_a_close_waits_for_the_snapshot_a_training_is_writing(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a stop: the close's own snapshot is the last one written, and nothing is left."""
    started, ended, gate = hold_the_trained_snapshot(monkeypatch)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    root = coll.root
    await coll.write({0: [doc(i) for i in range(150)]})
    await wait_for(started.is_set, 30, what="the snapshot after the training")
    try:
        await engine.close()
        returned_before_the_snapshot_ended = not ended.is_set()
    finally:
        gate.set()
    await wait_for(ended.is_set, 30, what="the snapshot thread to end")
    left = [p.name for p in root.iterdir() if p.name.endswith(TMP_SUFFIX)]
    assert not left, f"a snapshot's temporary file outlived the close: {left}"
    assert not returned_before_the_snapshot_ended
    # The restart serves the trained index with every document.
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        assert coll.index.trained and coll.count() == 150
    finally:
        await engine.close()


async def test_a_close_during_a_trainings_swap_loses_no_write_from_the_restarted_index(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes made while a trained index catches up are replayed into it by the swap, under
    the collection's locks. A close (SIGTERM) during that replay must not snapshot the new
    index half caught up with change-log positions saying it holds every write: the restart
    would replay nothing, and those documents would never be found again."""
    from aquila.node.storage.collection import Collection
    from aquila.node.storage.shard import Shard

    real_catch_up, real_replay = Collection._catch_up_sync, Shard.replay
    caught_up, go_on = threading.Event(), threading.Event()
    swapping, swapped = threading.Event(), threading.Event()

    def catch_up(self: Collection, new: VectorIndex, upto: dict[int, int],
                 *more: Any) -> dict[int, int] | None:
        out = real_catch_up(self, new, upto, *more)
        caught_up.set()
        go_on.wait(30)  # the writes below come now: the swap replays them
        return out

    def replay(self: Shard, after_seq: int, chunk: int = 16_384) -> Any:
        if go_on.is_set() and threading.current_thread().name.startswith("aq-write"):
            swapping.set()  # the swap's replay (writes and snapshots never replay)
            try:
                swapped.wait(3)  # a replay of many writes takes a while (bounded, for the fix)
                yield from real_replay(self, after_seq, chunk)
            finally:
                swapped.set()
            return
        yield from real_replay(self, after_seq, chunk)

    monkeypatch.setattr(Collection, "_catch_up_sync", catch_up)
    monkeypatch.setattr(Shard, "replay", replay)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    await coll.write({0: [doc(i) for i in range(150)]})
    try:
        await wait_for(caught_up.is_set, 30, what="the training to catch up")
        late = [doc(i) for i in range(150, 170)]
        await coll.write({0: late})  # acknowledged: durable
        go_on.set()
        await wait_for(swapping.is_set, 30, what="the swap's replay")
        await engine.close()
    finally:
        go_on.set()
        swapped.set()
    monkeypatch.setattr(Collection, "_catch_up_sync", real_catch_up)
    monkeypatch.setattr(Shard, "replay", real_replay)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        assert coll.count() == 170
        assert coll.index.ntotal == 170, "documents written during the catch-up are not indexed"
        queries = np.stack([d.vector for d in late if d.vector is not None])
        rows = await coll.search(queries, 1, 4)  # every list probed: exact
        assert [r[0].id for r in rows] == [d.id for d in late]
    finally:
        await engine.close()


async def test_a_close_writes_no_snapshot_while_a_write_is_applied_to_the_index(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close cancels the task applying a durable write to the index; the thread applying
    it goes on. The close's snapshot must wait for it: FAISS writing an index into the file
    while another thread adds to it reads lists being reallocated (a torn snapshot, or a
    crash at the stop)."""
    from aquila.node.storage.collection import Collection

    real_apply, real_stage = Collection._apply_all_sync, VectorIndex.stage
    applying, released = threading.Event(), threading.Event()
    inside: list[int] = []
    clashes: list[str] = []

    def apply(self: Collection, ops: Any) -> None:
        inside.append(1)
        try:
            applying.set()
            released.wait(3)  # a large group's vectors take a while to add (bounded, for the fix)
            real_apply(self, ops)
        finally:
            inside.pop()

    def stage(self: VectorIndex, path: Path, covered: dict[int, int]) -> Path:
        if inside:
            clashes.append("a snapshot was written while a write was applied to its index")
        return real_stage(self, path, covered)

    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    await coll.write({0: [doc(i) for i in range(10)]})
    monkeypatch.setattr(Collection, "_apply_all_sync", apply)
    monkeypatch.setattr(VectorIndex, "stage", stage)
    writing = asyncio.ensure_future(coll.write({0: [doc(i) for i in range(10, 20)]}))
    try:
        await wait_for(applying.is_set, 30, what="the write to reach the index")
        await engine.close()
    finally:
        released.set()
    with pytest.raises(Unavailable):  # durable, but the close came first: not acknowledged
        await writing
    assert not clashes, clashes
    monkeypatch.setattr(Collection, "_apply_all_sync", real_apply)
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        assert coll.count() == 20 and coll.index.ntotal == 20
    finally:
        await engine.close()


async def test_a_stop_whose_last_snapshot_fails_still_closes_everything(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close's snapshot only spares the next start a replay: when it cannot be written
    (the disk full, say), the stop must still close every store (and go on to the other
    collections). It raised out of the close instead: the stores stayed open (this process
    could not open the folder again: RocksDB's lock) and `aquila serve`'s cleanup stopped
    there, leaving its thread pools to Python's exit, which waits for a training to end."""
    other = CollectionSpec("t", 4, "l2", 1, 1, IndexSpec("flat"))
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    for spec in (SPEC, other):
        coll = await engine.ensure(spec, [0], "u")
        await coll.write({0: [doc(i) for i in range(20)]})

    def full(*_: Any) -> Path:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(VectorIndex, "stage", full)
        await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        for spec in (SPEC, other):
            coll = await engine.ensure(spec, [0], "u")
            assert coll.count() == 20 and coll.index.ntotal == 20
    finally:
        await engine.close()
