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


async def test_a_slice_held_on_the_catch_up_thread_holds_no_other_collections_writes(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t0's unlocked slice is held on the catch-up thread; t1 then catches up with its writes
    held at once (no unlocked rounds): that phase, and t1's writes, must not queue behind
    t0's slice (on the catch-up thread they would, t1's writes held all the while)."""
    real = Collection._catch_up_sync
    reached, go_on = threading.Event(), threading.Event()

    def held(self: Collection, new: VectorIndex, upto: dict[int, int],
             seconds: float | None = None, until: dict[int, int] | None = None
             ) -> dict[int, int] | None:
        if self.spec.name == "t0" and threading.current_thread().name.startswith("aq-catchup"):
            reached.set()
            go_on.wait(60)
        return real(self, new, upto, seconds, until)

    monkeypatch.setattr(Collection, "_catch_up_sync", held)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        t0 = await engine.ensure(dataclasses.replace(SPEC, name="t0"), [0], "u0")
        await t0.write({0: [doc(i) for i in range(150)]})
        await wait_for(reached.is_set, 60, what="t0's slice on the catch-up thread")
        # t0 is in its unlocked rounds already; t1 goes straight to the writes-held phase.
        monkeypatch.setattr(collection_module, "CATCH_UP_ROUNDS", 0)
        t1 = await engine.ensure(dataclasses.replace(SPEC, name="t1"), [0], "u1")
        try:
            await asyncio.wait_for(t1.write({0: [doc(i) for i in range(150)]}),
                                   WRITE_TIMEOUT_S)
            await settled(t1, WRITE_TIMEOUT_S, what="t1's training, t0's slice held")
            await asyncio.wait_for(t1.write({0: [doc(150)]}), WRITE_TIMEOUT_S)
            assert not go_on.is_set() and t0.training  # t0's slice was held all along
        finally:
            go_on.set()
        assert t1.count() == 151 and t1.index.ntotal == 151
        await settled(t0, 60)
        assert t0.count() == 150 and t0.index.ntotal == 150
    finally:
        go_on.set()
        await engine.close()
