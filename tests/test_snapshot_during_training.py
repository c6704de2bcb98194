"""Snapshots taken while an index trains (which a restart needs, or it replays all the writes
made meanwhile) must not leave the trained index unsaved once it serves."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import wait_for
from tests.small_ivf import SPEC, doc


async def started_with_a_load(tmp_path: Path, blocking: Blocking) -> tuple[Engine, Any]:
    """An engine whose collection has just had the bulk load that starts its training."""
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    await coll.write({0: [doc(i) for i in range(150)]})
    return engine, coll


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
    # A bulk load, then no more writes: the training starts, and a periodic snapshot comes
    # while it runs (here called: it writes the index that serves).
    engine, coll = await started_with_a_load(tmp_path, blocking)
    try:
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
    coll = await engine.ensure(SPEC, [0], "u")
    try:
        assert coll.index.trained, "the restart loaded an untrained index"
        assert coll.count() == 150
    finally:
        await engine.close()


async def test_a_close_during_a_training_neither_waits_for_it_nor_lets_it_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop (SIGTERM) while millions of vectors train must not wait for the training: the
    pool does not wait for the background thread, and the training stops at its next chunk of
    the store once the collection is closed (starting again at the next start)."""
    from aquila.node.storage import training

    real = training.train_streamed
    gate, started, ended = threading.Event(), threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    def held(spec: Any, n: int, chunks: Any, seed: int = 0, **kwargs: Any) -> Any:
        def gated() -> Any:
            for i, chunk in enumerate(chunks()):
                if i == 0:
                    started.set()
                    gate.wait(60)  # a long k-means, say, between two chunks
                yield chunk

        try:
            return real(spec, n, gated, seed, **kwargs)
        except BaseException as exc:
            outcome.append(exc)
            raise
        finally:
            ended.set()

    monkeypatch.setattr("aquila.node.storage.collection.train_streamed", held)
    monkeypatch.setattr("aquila.node.storage.collection.TRAIN_CHUNK", 16)
    blocking = Blocking(2)
    engine, coll = await started_with_a_load(tmp_path, blocking)
    try:
        await wait_for(started.is_set, what="the training to start")
        await engine.close()
        blocking.close()  # returns with the training still held: it does not wait for it
        assert not ended.is_set()
    finally:
        gate.set()
    await wait_for(ended.is_set, 30, what="the training thread to end")
    assert outcome and type(outcome[0]).__name__ == "TrainingStopped", outcome
    # The store is whole: a restart finds every document and trains again.
    blocking = Blocking(2)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        assert coll.count() == 150
    finally:
        await engine.close()
        blocking.close()


def test_serve_exits_without_waiting_only_when_a_background_job_runs() -> None:
    """`aquila serve` skips Python's wait for the pool's threads at exit only when a job (a
    training) is still running in one; idle threads end at the pool's shutdown."""
    from aquila.node.cli import _abandoned_background

    idle = Blocking(2)
    idle.close()
    assert not _abandoned_background()
    busy = Blocking(2)
    gate, started = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        gate.wait(30)

    busy._background.submit(job)
    assert started.wait(10)
    busy.close()
    try:
        assert _abandoned_background()
    finally:
        gate.set()
    assert not _abandoned_background()


def _serve_whose_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException,
                     abandoned: bool) -> Any:
    """`cli.serve` with its event loop's run failing with `error`, a training left running
    or not, and `os._exit` raising SystemExit: the config to call it with."""
    import uvloop

    from aquila.node import cli, logs
    from aquila.node.config import NodeConfig

    def run(coro: Any) -> None:
        coro.close()
        raise error

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(uvloop, "install", lambda: None)
    monkeypatch.setattr(logs, "configure", lambda *a: None)
    monkeypatch.setattr(asyncio, "run", run)
    monkeypatch.setattr(cli, "_abandoned_background", lambda: abandoned)
    monkeypatch.setattr(os, "_exit", exit_now)
    return NodeConfig(data_dir=tmp_path).validate()


@pytest.mark.parametrize("abandoned", [True, False])
def test_serve_that_fails_does_not_wait_for_a_training(
        abandoned: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A stop that ends on an error exits at once (code 1, the error logged) when a training
    still runs; with nothing left running, the error goes up as any other."""
    from aquila.node import cli

    config = _serve_whose_run(monkeypatch, tmp_path, RuntimeError("cleanup failed"), abandoned)
    if abandoned:
        with pytest.raises(SystemExit) as stop:
            cli.serve(config)
        assert stop.value.code == 1
    else:
        with pytest.raises(RuntimeError, match="cleanup failed"):
            cli.serve(config)


@pytest.mark.parametrize("abandoned", [True, False])
def test_serve_that_cannot_bind_does_not_wait_for_a_training(
        abandoned: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`aquila serve` that cannot bind its port (another process holds it) exits with code 1.
    The start had opened the collections by then, and one not trained yet starts its training
    at the open: the bind error returned from `serve`, and Python's exit then waited for the
    training's thread (k-means, an hour at 10M vectors) before the process ended."""
    from aquila.node import cli

    config = _serve_whose_run(monkeypatch, tmp_path, OSError(98, "Address already in use"),
                              abandoned)
    if abandoned:
        with pytest.raises(SystemExit) as stop:
            cli.serve(config)
        assert stop.value.code == 1
    else:
        assert cli.serve(config) == 1
    assert "Address already in use" in capsys.readouterr().err
