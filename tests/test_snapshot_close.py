"""A collection's close waits for the snapshot being written to end, also the one a training
starts after its swap (a task the close cancels): the thread writing it cannot be stopped,
and a close that returned before it ended let the file land in the folder of the collection's
next incarnation (or an older snapshot replace the one the close itself wrote)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.files import TMP_SUFFIX
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex
from tests.conftest import wait_for

SPEC = CollectionSpec("s", 4, "l2", 1, 1, IndexSpec("ivf_flat", nlist=4))


@pytest.fixture
async def blocking() -> AsyncIterator[Blocking]:
    b = Blocking(2)
    yield b
    b.close()


def doc(i: int) -> Incoming:
    v = np.random.default_rng(i).standard_normal(4).astype(np.float32)
    return Incoming(f"d{i}", v, b"{}", 1, "n1")


async def test_a_drop_waits_for_the_snapshot_a_training_is_writing(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = VectorIndex.stage
    started, ended, gate = threading.Event(), threading.Event(), threading.Event()

    def held(self: VectorIndex, path: Path, covered: dict[int, int]) -> Path:
        if self.trained:  # the snapshot the training takes after its swap
            started.set()
            try:
                gate.wait(3)  # a large index: its file takes a while (bounded, for the fix)
                return real(self, path, covered)
            finally:
                ended.set()
        return real(self, path, covered)

    monkeypatch.setattr(VectorIndex, "stage", held)
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

