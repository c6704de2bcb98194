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
