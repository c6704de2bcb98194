"""A close does not wait for a training (k-means cannot be stopped), which goes on in its
thread until it next reads the store. Past its last read (the calibration), it went on to
compact its lists: the whole new index written to a scratch file in the collection's folder
and read back, after the close, for a result nobody takes; dropped and created again, the
scratch file landed in the folder of the name's next incarnation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex
from tests.conftest import wait_for
from tests.small_ivf import SPEC, doc


async def test_a_training_past_its_last_read_compacts_nothing_after_the_close(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_calibrate = VectorIndex.calibrate_against
    calibrating, gate = threading.Event(), threading.Event()
    compactions: list[Path] = []

    def held(self: VectorIndex, *args: Any) -> Any:
        calibrating.set()
        gate.wait(3)  # a calibration at millions of vectors takes a while (bounded)
        return real_calibrate(self, *args)

    def compacted(index: VectorIndex, scratch: Path) -> VectorIndex:
        compactions.append(scratch)
        return index

    monkeypatch.setattr(VectorIndex, "calibrate_against", held)
    monkeypatch.setattr("aquila.node.storage.collection.compacted", compacted)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        try:
            await wait_for(calibrating.is_set, 30, what="the training's calibration")
            await engine.drop("s")
            again = await engine.ensure(SPEC, [0], "u2")
        finally:
            gate.set()
        await blocking.background(lambda: None)  # the training's thread has ended
        assert compactions == [], "the dropped collection's training compacted its index"
        assert again.count() == 0
    finally:
        await engine.close()
