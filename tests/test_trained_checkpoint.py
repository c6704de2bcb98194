"""A training's trained quantizer is kept until a snapshot holds the index it trained
(`node/storage/trained_checkpoint.py`): a node stopped between the k-means and the swap does
not train again from the start, and a file that is not of this training is never used."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage import trained_checkpoint, training
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex
from aquila.node.storage.trained_checkpoint import FILE, MAGIC, Checkpoint
from tests.conftest import settled, wait_for
from tests.small_ivf import SPEC, doc


def trained(spec: CollectionSpec, n: int = 400) -> Any:
    index = VectorIndex.new_ivf(spec, 4, n).index
    index.train(np.random.default_rng(0).standard_normal((n, spec.dim)).astype(np.float32))
    return index


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_sq8", "ivf_pq"])
def test_a_kept_quantizer_comes_back_as_it_was(tmp_path: Path, kind: str) -> None:
    spec = CollectionSpec("c", 8, "l2", 1, 1, IndexSpec(kind, nlist=4))
    index = trained(spec, 1000)
    assert Checkpoint(tmp_path, "u1", lambda: True).save(index, 1000)
    got = Checkpoint(tmp_path, "u1", lambda: True).load(spec, 1500)
    assert got is not None and got[1] == 1000
    assert faiss.serialize_index(got[0]).tobytes() == faiss.serialize_index(index).tobytes()
    assert (tmp_path / FILE).exists()  # kept until a snapshot holds the index


def test_what_is_not_of_this_training_is_removed_and_not_used(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Quietly: an earlier training's file, not yet removed when the next one starts (its
    snapshot still being written in a bulk load), is the common case, not a warning."""
    caplog.set_level(logging.INFO, "aquila.node.storage.trained_checkpoint")
    index = trained(SPEC)
    cases = {
        "another incarnation": lambda: Checkpoint(tmp_path, "u2", lambda: True).load(SPEC, 400),
        "trained on too few": lambda: Checkpoint(tmp_path, "u1", lambda: True).load(SPEC, 900),
        "another dim": lambda: Checkpoint(tmp_path, "u1", lambda: True).load(
            dataclasses.replace(SPEC, dim=5), 400),
        "another type": lambda: Checkpoint(tmp_path, "u1", lambda: True).load(
            dataclasses.replace(SPEC, index=IndexSpec("ivf_sq8", nlist=4)), 400),
        "another metric": lambda: Checkpoint(tmp_path, "u1", lambda: True).load(
            dataclasses.replace(SPEC, metric="ip"), 400),
    }
    for what, load in cases.items():
        assert Checkpoint(tmp_path, "u1", lambda: True).save(index, 400)
        assert load() is None, what
        assert not (tmp_path / FILE).exists(), what
    assert caplog.records and all(r.levelno == logging.INFO for r in caplog.records)


def test_a_damaged_file_is_removed_and_not_used(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "aquila.node.storage.trained_checkpoint")
    assert Checkpoint(tmp_path, "u1", lambda: True).save(trained(SPEC), 400)
    good = (tmp_path / FILE).read_bytes()
    head = len(MAGIC)
    damaged = {
        "truncated": good[: len(good) // 2],
        "header only": good[: head + 10],
        "a flipped byte": good[:-7] + bytes([good[-7] ^ 1]) + good[-6:],
        "another magic": b"AQTQ9\n" + good[head:],
        "a huge length": good[:head] + b"\xff" * 8 + good[head + 8:],
        "empty": b"",
    }
    for what, raw in damaged.items():
        (tmp_path / FILE).write_bytes(raw)
        assert Checkpoint(tmp_path, "u1", lambda: True).load(SPEC, 400) is None, what
        assert not (tmp_path / FILE).exists(), what
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == len(damaged)


def test_a_dropped_collections_training_leaves_no_file(tmp_path: Path) -> None:
    index = trained(SPEC)
    assert not Checkpoint(tmp_path, "u1", lambda: False).save(index, 400)
    # Dropped while the file was being written: nothing is renamed into place.
    answers = itertools.chain([True], itertools.repeat(False))
    assert not Checkpoint(tmp_path, "u1", lambda: next(answers)).save(index, 400)
    assert list(tmp_path.iterdir()) == []
    # A folder it cannot write in (gone, a full disk): not kept, and the training goes on.
    assert not Checkpoint(tmp_path / "gone", "u1", lambda: True).save(index, 400)


async def test_a_node_stopped_before_the_swap_does_not_train_again(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "aquila.node.storage.training")
    real_catch_up, real_train = Collection._catch_up_sync, training.train_quantizer
    reached, go_on = threading.Event(), threading.Event()
    trainings = []

    def held(self: Collection, *args: Any) -> Any:
        reached.set()
        go_on.wait(30)
        return real_catch_up(self, *args)

    def counted(*args: Any) -> None:
        trainings.append(1)
        real_train(*args)

    monkeypatch.setattr(Collection, "_catch_up_sync", held)
    monkeypatch.setattr(training, "train_quantizer", counted)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        await wait_for(reached.is_set, 30, what="the training to reach its catch-up")
        assert trainings == [1] and (coll.root / FILE).exists()
        root = coll.root
        closing = asyncio.ensure_future(engine.close())
        await wait_for(lambda: coll.closed, 30, what="the close to begin")
    finally:
        go_on.set()  # the catch-up goes on, sees the close: no swap
    await closing
    assert (root / FILE).exists()
    monkeypatch.setattr(Collection, "_catch_up_sync", real_catch_up)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        assert not coll.index.trained  # the swap never happened: the restart trains
        await settled(coll, 60)
        assert coll.index.trained and coll.index.ntotal == 150
        assert trainings == [1], "trained again instead of taking the kept quantizer"
        assert "the trained quantizer an earlier training kept is used" in caplog.text
        # Once a snapshot holds the trained index, the kept quantizer goes.
        await wait_for(lambda: not (coll.root / FILE).exists(), 30,
                       what="the kept quantizer to be removed")
    finally:
        await engine.close()


def test_a_quantizer_no_newer_than_the_serving_index_is_removed_and_not_used(
    tmp_path: Path
) -> None:
    """Left behind (stopped after the snapshot, before the removal): the serving index was
    trained on as many vectors, and a retraining must train, not take it back."""
    index = trained(SPEC)
    assert Checkpoint(tmp_path, "u1", lambda: True).save(index, 400)
    assert Checkpoint(tmp_path, "u1", lambda: True).load(SPEC, 600, trained_at=400) is None
    assert not (tmp_path / FILE).exists()
    assert Checkpoint(tmp_path, "u1", lambda: True).save(index, 400)
    got = Checkpoint(tmp_path, "u1", lambda: True).load(SPEC, 600, trained_at=200)
    assert got is not None and got[1] == 400


def test_a_quantizer_trained_on_far_more_than_there_are_is_removed(tmp_path: Path) -> None:
    """Most of the collection deleted since: its lists were chosen for many more vectors."""
    assert Checkpoint(tmp_path, "u1", lambda: True).save(trained(SPEC), 400)
    assert Checkpoint(tmp_path, "u1", lambda: True).load(SPEC, 150) is None
    assert not (tmp_path / FILE).exists()


def test_dropped_while_the_file_was_made_durable_nothing_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """live() is asked after the temporary file's fsync, right before the rename."""
    dropped = threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        dropped.set()  # the drop came while the file was made durable

    monkeypatch.setattr(os, "fsync", fsync)
    assert not Checkpoint(tmp_path, "u1", lambda: not dropped.is_set()).save(trained(SPEC), 400)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_file_that_faiss_cannot_read_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the reading raises, the start goes on: the file is removed, None returned."""
    assert Checkpoint(tmp_path, "u1", lambda: True).save(trained(SPEC), 400)

    def unreadable(_payload: Any) -> Any:
        raise TypeError("not an index")

    monkeypatch.setattr(trained_checkpoint.faiss, "deserialize_index", unreadable)
    assert Checkpoint(tmp_path, "u1", lambda: True).load(SPEC, 400) is None
    assert not (tmp_path / FILE).exists()


async def test_a_quantizer_left_behind_does_not_stand_in_for_a_retraining(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after the snapshot that holds the trained index, before the file's removal:
    the retraining at `retrain_growth` (1.5 here) runs its k-means, not the left file's."""
    trainings = counted_trainings(monkeypatch)
    real_remove = Checkpoint.remove
    monkeypatch.setattr(Checkpoint, "remove", lambda self, upto=None: None)  # stopped before it
    tuning = Tuning(train_min=100, retrain_growth=1.5, retrain_quiet_s=0.0)
    engine = Engine(tmp_path, blocking, tuning, fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        await settled(coll, 60)
        assert trainings == [1] and coll.index.trained_at == 150
        await wait_for(lambda: coll._saved is coll.index, 30, what="the snapshot")
        assert (coll.root / FILE).exists()
        await ended(coll)
        monkeypatch.setattr(Checkpoint, "remove", real_remove)
        await coll.write({0: [doc(i) for i in range(150, 230)]})
        await wait_for(lambda: coll.index.trained_at >= 225 and not coll.training, 60,
                       what="the retraining")
        assert trainings == [1, 1], "the left file stood in for the retraining's k-means"
    finally:
        await engine.close()


async def test_a_retraining_that_fails_after_its_k_means_keeps_the_quantizer(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No swap, no removal: the next attempt takes the quantizer instead of training again."""
    trainings = counted_trainings(monkeypatch)
    real_compacted = Collection._compacted_sync
    failures: list[int] = []

    def fails_once(self: Collection, index: VectorIndex) -> VectorIndex:
        if self.index.trained and not failures:
            failures.append(1)
            raise RuntimeError("a failure after the k-means")
        return real_compacted(self, index)

    monkeypatch.setattr(Collection, "_compacted_sync", fails_once)
    tuning = Tuning(train_min=100, retrain_growth=1.5, retrain_quiet_s=0.0)
    engine = Engine(tmp_path, blocking, tuning, fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        await settled(coll, 60)
        await ended(coll)
        await coll.write({0: [doc(i) for i in range(150, 230)]})
        await wait_for(lambda: coll.index.trained_at >= 225 and not coll.training, 60,
                       what="the retraining, after its failure")
        assert failures == [1]
        assert trainings == [1, 1], "the retraining's k-means ran again after its failure"
        await wait_for(lambda: not (coll.root / FILE).exists(), 30,
                       what="the kept quantizer to be removed once the swap is durable")
    finally:
        await engine.close()


async def test_a_collection_dropped_during_its_k_means_leaves_no_file_to_its_successor(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_train, real_save = training.train_quantizer, Checkpoint.save
    in_k_means, go_on = threading.Event(), threading.Event()
    saves: list[bool] = []

    def held(*args: Any) -> None:
        if not in_k_means.is_set():
            in_k_means.set()
            go_on.wait(60)
        real_train(*args)

    def recorded(self: Checkpoint, index: Any, trained_on: int) -> bool:
        saves.append(real_save(self, index, trained_on))
        return saves[-1]

    monkeypatch.setattr(training, "train_quantizer", held)
    monkeypatch.setattr(Checkpoint, "save", recorded)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u1")
        await coll.write({0: [doc(i) for i in range(150)]})
        await wait_for(in_k_means.is_set, 30, what="the k-means")
        await engine.drop(SPEC.name)
        successor = await engine.ensure(SPEC, [0], "u2")
        assert successor.root == coll.root
        go_on.set()
        await wait_for(lambda: saves, 30, what="the dropped one's save")
        assert saves == [False] and not (successor.root / FILE).exists()
    finally:
        go_on.set()
        await engine.close()


def counted_trainings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The k-means runs from now on (`training.train_quantizer` calls)."""
    real = training.train_quantizer
    calls: list[int] = []

    def counted(*args: Any) -> None:
        calls.append(1)
        real(*args)

    monkeypatch.setattr(training, "train_quantizer", counted)
    return calls


def test_the_removal_after_a_swap_spares_a_later_trainings_file(tmp_path: Path) -> None:
    kept = Checkpoint(tmp_path, "u1", lambda: True)
    assert kept.save(trained(SPEC), 400)
    kept.remove(200)  # the swap of a training on 200: the file is a later training's
    assert (tmp_path / FILE).exists()
    kept.remove(400)
    assert not (tmp_path / FILE).exists()
    assert Checkpoint(tmp_path, "u2", lambda: True).save(trained(SPEC), 400)
    kept.remove(200)  # another incarnation's: removed
    assert not (tmp_path / FILE).exists()


async def test_a_retraining_started_before_the_last_ones_removal_keeps_its_file(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training's `training` flag is down before its snapshot and its file's removal: a
    retraining can start and keep its quantizer meanwhile, which that removal must spare."""
    real_snapshot, real_catch_up, real_remove = (
        Collection.snapshot, Collection._catch_up_sync, Checkpoint.remove)
    tail, tail_reached = asyncio.Event(), asyncio.Event()
    in_catch_up, go_on = threading.Event(), threading.Event()
    removals: list[int | None] = []

    async def snapshot(self: Collection) -> None:
        if self.index.trained and self.index.trained_at == 150 and not tail_reached.is_set():
            tail_reached.set()  # the first training's, after its swap
            await tail.wait()
        await real_snapshot(self)

    def catch_up(self: Collection, *args: Any) -> Any:
        if self.index.trained:  # the retraining's: held once it has kept its quantizer
            in_catch_up.set()
            go_on.wait(60)
        return real_catch_up(self, *args)

    def remove(self: Checkpoint, upto: int | None = None) -> None:
        real_remove(self, upto)
        removals.append(upto)

    monkeypatch.setattr(Collection, "snapshot", snapshot)
    monkeypatch.setattr(Collection, "_catch_up_sync", catch_up)
    monkeypatch.setattr(Checkpoint, "remove", remove)
    tuning = Tuning(train_min=100, retrain_growth=1.5, retrain_quiet_s=0.0)
    engine = Engine(tmp_path, blocking, tuning, fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        await wait_for(tail_reached.is_set, 60, what="the first training's snapshot")
        await coll.write({0: [doc(i) for i in range(150, 230)]})
        await wait_for(in_catch_up.is_set, 60, what="the retraining to keep its quantizer")
        # (The retraining removed the first one's file at its start: no newer than the
        # index that serves.)
        before = len(removals)
        tail.set()  # the first training's snapshot, then its removal
        await wait_for(lambda: len(removals) > before, 30, what="the first training's removal")
        got = Checkpoint(coll.root, "u", lambda: True).load(SPEC, 230, 150)
        assert got is not None and got[1] == 230, "the retraining's quantizer was removed"
    finally:
        tail.set()
        go_on.set()
        await engine.close()


async def ended(coll: Collection) -> None:
    """Until the training's task has ended (past its snapshot and its look for the next):
    a retraining it started while the writes that follow were counted but not yet in the
    index would train on the vectors of the last one."""
    await wait_for(lambda: coll.idle, 30, what="the training's task to end")
