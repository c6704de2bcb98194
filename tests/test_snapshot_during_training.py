"""Snapshots taken while an index trains (which a restart needs, or it replays all the writes
made meanwhile) must not leave the trained index unsaved once it serves."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import wait_for


@pytest.fixture
async def blocking() -> AsyncIterator[Blocking]:
    b = Blocking(2)
    yield b
    b.close()


def doc(i: int) -> Incoming:
    v = np.random.default_rng(i).standard_normal(4).astype(np.float32)
    return Incoming(f"d{i}", v, b"{}", 1, "n1")


async def test_a_trained_index_is_snapshotted_after_a_snapshot_during_its_training(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aquila.node.storage.training import train_streamed as real

    gate, started = threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr("aquila.node.storage.collection.train_streamed", slow)
    spec = CollectionSpec("s", 4, "l2", 1, 1, IndexSpec("ivf_flat", nlist=4))
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    coll = await engine.ensure(spec, [0], "u")
    try:
        # A bulk load, then no more writes: the training starts, and a periodic snapshot
        # comes while it runs (here called; main skips it, t-big writes the serving index).
        await coll.write({0: [doc(i) for i in range(150)]})
        await wait_for(started.is_set, what="the training to start")
        await coll.snapshot()
    finally:
        gate.set()
    await wait_for(lambda: not coll.training and coll.index.trained, 30,
                   what="the training to end")
    await engine.close()
    monkeypatch.setattr("aquila.node.storage.collection.train_streamed", real)
    # A restart serves the trained index from its snapshot: no training again.
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    coll = await engine.ensure(spec, [0], "u")
    try:
        assert coll.index.trained, "the restart loaded an untrained index"
        assert coll.count() == 150
    finally:
        await engine.close()
