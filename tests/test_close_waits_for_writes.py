"""A collection's close cancels the group commit's driver; the thread writing its group to the
store goes on. The close must wait for it to end: the write lock the driver held is let go
with the cancellation, and the close then closed the store under a thread still writing to it
(rocksdict lets the GIL go in the WAL's fsync, and a close meanwhile fails with "Already
borrowed": the store stayed open and the engine's close stopped there)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from aquila.cluster.model.errors import Unavailable
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import wait_for
from tests.small_ivf import SPEC, doc


async def test_a_close_waits_for_the_group_being_written_to_the_store(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Collection._write_sync
    writing, ended, released = threading.Event(), threading.Event(), threading.Event()

    def held(self: Collection, group: Any) -> Any:
        writing.set()
        try:
            released.wait(3)  # a group of 20k documents and its fsync take a while (bounded)
            return real(self, group)
        finally:
            ended.set()

    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    await coll.write({0: [doc(i) for i in range(10)]})
    monkeypatch.setattr(Collection, "_write_sync", held)
    writing_task = asyncio.ensure_future(coll.write({0: [doc(i) for i in range(10, 20)]}))
    try:
        await wait_for(writing.is_set, 30, what="the group to reach the store")
        await engine.close()
        returned_before_the_write_ended = not ended.is_set()
    finally:
        released.set()
    with pytest.raises(Unavailable):
        await writing_task
    await wait_for(ended.is_set, 30, what="the write thread to end")
    assert not returned_before_the_write_ended
    monkeypatch.setattr(Collection, "_write_sync", real)
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        # The group either made it before the close or not at all; the index follows the store.
        assert coll.count() in (10, 20) and coll.index.ntotal == coll.count()
    finally:
        await engine.close()


async def test_a_cancelled_shard_drop_ends_before_the_close_snapshots_the_index(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard's drop (a move's last step) cancelled at a stop: its thread removing the
    shard's vectors from the index goes on, the collection's locks were let go with the
    cancellation, and the close's snapshot had FAISS write the index while that thread
    changed it (a torn snapshot, or a crash at the stop)."""
    from aquila.cluster.model.spec import CollectionSpec, IndexSpec
    from aquila.node.storage.index import VectorIndex

    spec = CollectionSpec("c", 4, "l2", 2, 1, IndexSpec("flat"))
    real_remove, real_stage = VectorIndex.remove, VectorIndex.stage
    armed, removing, released = threading.Event(), threading.Event(), threading.Event()
    inside: list[int] = []
    clashes: list[str] = []

    def remove(self: VectorIndex, keys: Any) -> None:
        if not armed.is_set() or not len(keys):
            return real_remove(self, keys)
        inside.append(1)
        try:
            removing.set()
            released.wait(3)  # a shard of millions of vectors takes a while (bounded)
            return real_remove(self, keys)
        finally:
            inside.pop()

    def stage(self: VectorIndex, path: Path, covered: dict[int, int]) -> Path:
        if inside:
            clashes.append("a snapshot was written while the drop removed vectors from it")
        return real_stage(self, path, covered)

    monkeypatch.setattr(VectorIndex, "remove", remove)
    monkeypatch.setattr(VectorIndex, "stage", stage)
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    coll = await engine.ensure(spec, [0, 1], "u")
    await coll.write({0: [doc(i) for i in range(10)], 1: [doc(i) for i in range(10, 20)]})
    armed.set()
    dropping = asyncio.ensure_future(engine.drop_shard("c", 1))
    try:
        await wait_for(removing.is_set, 30, what="the drop to reach the index")
        dropping.cancel()
        await asyncio.gather(dropping, return_exceptions=True)
        await engine.close()
    finally:
        released.set()
    assert not clashes, clashes
