"""A training's catch-up does not take the write threads from other collections: its slices
that hold no lock run on a thread of their own (`Blocking.catch_up`), and its last phase,
which holds its collection's writes, on a write thread (never queued behind another
collection's slice on the catch-up thread, its writes held meanwhile)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import pytest

from aquila.node.blocking import Blocking
from aquila.node.storage import collection as collection_module
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex
from tests.conftest import settled, wait_for
from tests.small_ivf import SPEC, doc

WRITE_TIMEOUT_S = 20.0


async def test_trainings_catching_up_leave_the_write_threads_to_other_collections(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Collection._catch_up_sync
    go_on = threading.Event()

    def held(self: Collection, new: VectorIndex, upto: dict[int, int],
             seconds: float | None = None, until: dict[int, int] | None = None
             ) -> dict[int, int] | None:
        go_on.wait(60)  # a long slice: a big catch-up, on a busy machine
        return real(self, new, upto, seconds, until)

    monkeypatch.setattr(Collection, "_catch_up_sync", held)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        # Three collections train (as many as there are write threads) and catch up.
        trained: set[str] = set()
        training = []
        for i in range(3):
            c = await engine.ensure(dataclasses.replace(SPEC, name=f"t{i}"), [0], f"u{i}")
            c.on_trained = lambda _s, name=c.spec.name: trained.add(name)
            training.append(c)
        other = await engine.ensure(dataclasses.replace(SPEC, name="other"), [0], "u9")
        for c in training:
            await c.write({0: [doc(i) for i in range(150)]})
        # Each catch-up is asked for as soon as its training has ended.
        await wait_for(lambda: len(trained) == 3, 60, what="three trainings to end")
        try:
            # Another collection's write goes through while the three catch up.
            await asyncio.wait_for(other.write({0: [doc(1)]}), WRITE_TIMEOUT_S)
        finally:
            go_on.set()
        assert other.count() == 1
        for c in training:
            await settled(c, 60)
            assert c.count() == 150 and c.index.ntotal == 150
    finally:
        go_on.set()
        await engine.close()


async def test_the_catch_up_with_writes_held_runs_on_a_write_thread(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Collection._catch_up_sync
    threads: list[tuple[bool, str]] = []

    def recorded(self: Collection, new: VectorIndex, upto: dict[int, int],
                 seconds: float | None = None, until: dict[int, int] | None = None
                 ) -> dict[int, int] | None:
        locked = self.write_mutex.locked() and self.apply_lock.locked()
        threads.append((locked, threading.current_thread().name))
        return real(self, new, upto, seconds, until)

    monkeypatch.setattr(Collection, "_catch_up_sync", recorded)
    # No unlocked rounds: straight to the phase that holds the writes.
    monkeypatch.setattr(collection_module, "CATCH_UP_ROUNDS", 0)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        c = await engine.ensure(SPEC, [0], "u")
        await c.write({0: [doc(i) for i in range(150)]})
        await settled(c, 60)
        assert c.index.ntotal == 150
    finally:
        await engine.close()
    locked = [name for held, name in threads if held]
    assert locked and all(name.startswith("aq-write") for name in locked), threads
