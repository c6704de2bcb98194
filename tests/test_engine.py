"""The node's engine below the HTTP layer: collection incarnations and restarts."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import settled, wait_for

SPEC = CollectionSpec("c", 4, "l2", 2, 1, IndexSpec("flat"))


def doc(i: int, version: int = 1, value: float | None = None) -> Incoming:
    v = float(i) if value is None else value
    return Incoming(f"d{i}", np.full(4, v, np.float32), b"{}", version, "n1")


async def test_recreated_collection_does_not_see_old_data(tmp_path: Path, blocking: Blocking) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "first")
    await coll.write({0: [doc(1)], 1: []})
    assert coll.count() == 1
    # The same name and settings, another incarnation: the old documents are gone.
    coll = await engine.ensure(SPEC, [0, 1], "second")
    assert coll.count() == 0 and coll.uid == "second"
    await coll.write({0: [doc(2)]})
    await engine.close()
    # A restart keeps the incarnation and its data.
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "second")
    assert coll.count() == 1
    await engine.close()


async def test_last_writer_wins_and_tombstones(tmp_path: Path, blocking: Blocking) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    await coll.write({0: [doc(1, version=5)]})
    # An older version arriving late (hinted hand-off, anti-entropy) changes nothing.
    assert await coll.write({0: [doc(1, version=3, value=7)]}) == {0: (0, 0)}
    rec = await coll.get(0, "d1")
    assert rec is not None and rec.vector_array()[0] == 1
    # A delete newer than the document wins, and the delete is kept as a tombstone ...
    tomb = Incoming("d1", None, b"", 6, "n1")
    assert await coll.write({0: [tomb]}) == {0: (1, 1)}
    assert await coll.get(0, "d1") is None
    # ... so that the older write, replayed afterwards, cannot resurrect it.
    await coll.write({0: [doc(1, version=5)]})
    assert await coll.get(0, "d1") is None and coll.count() == 0
    # A delete that reaches a replica before the write it deletes also wins.
    await coll.write({0: [Incoming("d9", None, b"", 10, "n2")]})
    await coll.write({0: [doc(9, version=8)]})
    assert await coll.get(0, "d9") is None
    hits = await coll.search(np.ones((1, 4), np.float32), 5, None)
    assert hits == [[]]
    await engine.close()


async def test_purged_tombstones_leave_no_trace(tmp_path: Path, blocking: Blocking) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    await coll.write({0: [doc(1, version=5), doc(2, version=5)]})
    await coll.write({0: [Incoming("d1", None, b"", 6, "n1"), Incoming("d2", None, b"", 9, "n1")]})
    # Only tombstones below the cutoff go.
    assert await coll.purge_tombstones(0, 8) == 1
    page, _ = await coll.stream_shard(0, None, 100)
    assert [(d.id, d.vector is None) for d in page] == [("d2", True)]
    # The id can be written again, afresh.
    await coll.write({0: [doc(1, version=20)]})
    assert coll.count() == 1
    hits = await coll.search(np.full((1, 4), 1, np.float32), 5, None)
    assert [h.id for h in hits[0]] == ["d1"]
    await engine.close()


async def test_purge_after_the_snapshot_does_not_resurrect_at_restart(
    tmp_path: Path, blocking: Blocking
) -> None:
    """A document live in the last snapshot, deleted and its tombstone purged since, then a
    crash (no snapshot at close): the restart's replay of the change log must not leave it
    in the index and the live bitmap (the purge took its change key with it)."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    await coll.write({0: [doc(1, version=5), doc(2, version=5)]})
    await coll.snapshot()
    await coll.write({0: [Incoming("d1", None, b"", 6, "n1")]})
    assert await coll.purge_tombstones(0, 8) == 1
    await coll.close(snapshot=False)  # as a SIGKILL leaves it: the last snapshot
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    assert coll.count() == 1 and coll.index.ntotal == 1
    assert coll.shards[0].live_labels().tolist() == [2]
    hits = await coll.search(np.full((1, 4), 1, np.float32), 2, None)
    assert [h.id for h in hits[0]] == ["d2"]
    await engine.close()


async def test_a_shard_dropped_and_taken_again_is_not_read_from_the_older_snapshot(
    tmp_path: Path, blocking: Blocking
) -> None:
    """A shard moved away and back (its labels given afresh), then a crash before the next
    snapshot: the restart must not load the older snapshot's vectors of that shard under
    labels that now name other documents."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "u")
    await coll.write({1: [doc(i) for i in range(1, 4)]})
    await coll.snapshot()
    await coll.drop_shard(1)
    await coll.add_shards([1])
    await coll.write({1: [doc(50, value=50.0)]})  # label 1 again
    await coll.close(snapshot=False)  # as a SIGKILL leaves it
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "u")
    assert coll.count() == 1 and coll.index.ntotal == 1
    hits = await coll.search(np.full((1, 4), 1, np.float32), 5, None)
    assert [(h.id, h.score) for h in hits[0]] == [("d50", 4 * 49.0**2)]
    await engine.close()


async def test_same_id_twice_in_one_batch(tmp_path: Path, blocking: Blocking) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    q = np.full((1, 4), 3, np.float32)
    # Written, then deleted, in one batch: gone from the store and the index.
    await coll.write({0: [doc(3, version=1), Incoming("d3", None, b"", 2, "n1")]})
    assert await coll.get(0, "d3") is None and coll.count() == 0
    assert await coll.search(q, 5, None) == [[]]
    # Deleted, then written again, in one batch: present once, with the last vector.
    await coll.write({0: [Incoming("d3", None, b"", 3, "n1"), doc(3, version=4, value=9)]})
    hits = await coll.search(q, 5, None, with_vectors=True)
    assert [h.id for h in hits[0]] == ["d3"] and coll.count() == 1
    assert np.frombuffer(hits[0][0].vector, "<f4")[0] == 9
    # Written twice: the later version only.
    await coll.write({0: [doc(3, version=5, value=1), doc(3, version=6, value=2)]})
    assert coll.index.ntotal == 1
    rec = await coll.get(0, "d3")
    assert rec is not None and rec.vector_array()[0] == 2
    await engine.close()


async def test_kept_digests_equal_a_full_scan(tmp_path: Path, blocking: Blocking) -> None:
    """Anti-entropy digests are kept up to date write by write; they must always equal the
    digests computed from scratch over the stored records (and survive a restart)."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "u")

    async def check() -> None:
        for s in (0, 1):
            kept = await coll.digests(s, 256)
            assert kept == coll._digests_sync(s, 256), s

    await coll.write({0: [doc(i, version=1) for i in range(20)]})
    await check()
    await coll.write({0: [doc(3, version=5), doc(3, version=6), Incoming("d4", None, b"", 7, "n1"),
                          Incoming("zz", None, b"", 8, "n2"), doc(5, version=0)]})
    await check()
    assert await coll.purge_tombstones(0, 8) == 1
    await check()
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "u")
    await check()
    await engine.close()


async def test_writes_during_training_all_reach_the_trained_index(
    tmp_path: Path, blocking: Blocking
) -> None:
    """Upserts, updates and deletes keep coming while the IVF index trains in the background;
    once it is swapped in, it holds exactly the live documents, each findable by its vector."""
    spec = CollectionSpec("t", 8, "l2", 2, 1, IndexSpec("ivf_flat", nlist=16))
    engine = Engine(tmp_path, blocking, Tuning(train_min=300, retrain_growth=100), fsync=False)
    await engine.start()
    coll = await engine.ensure(spec, [0, 1], "u")
    rng = np.random.default_rng(5)
    vectors: dict[str, np.ndarray] = {}
    version = 0

    async def write(docs: list[Incoming]) -> None:
        from aquila.cluster.model.sharding import shard_of

        by: dict[int, list[Incoming]] = {}
        for d in docs:
            by.setdefault(shard_of(d.id, 2), []).append(d)
            if d.vector is None:
                vectors.pop(d.id, None)
            else:
                vectors[d.id] = d.vector
        await coll.write(by)

    saw_training = False
    for _round in range(60):
        docs = []
        for _ in range(20):
            version += 1
            i = int(rng.integers(0, 600))
            if rng.random() < 0.15:
                docs.append(Incoming(f"x{i}", None, b"", version, "n1"))
            else:
                docs.append(Incoming(f"x{i}", rng.standard_normal(8).astype(np.float32),
                                     b"{}", version, "n1"))
        await write(docs)
        saw_training |= coll.training
    await wait_for(lambda: not coll.training and coll.index.trained, 30)
    assert saw_training
    assert coll.index.ntotal == len(vectors) == coll.count()
    ids = sorted(vectors)
    q = np.stack([vectors[i] for i in ids])
    hits = await coll.search(q, 1, 16)  # nprobe = nlist: exact for ivf_flat
    assert [h[0].id for h in hits] == ids
    await engine.close()



async def test_a_shard_dropped_and_taken_again_while_training_is_not_swapped_in_stale(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard moved away and back while the index trains (its labels given afresh): the
    trained index, which holds the shard's old vectors by their old labels, is not swapped
    in as if the shard were the same."""
    spec = CollectionSpec("t", 4, "l2", 2, 1, IndexSpec("ivf_flat", nlist=4))
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    coll = await engine.ensure(spec, [0, 1], "u")
    trained, go = threading.Event(), threading.Event()
    catch_up = coll._catch_up_sync

    def held(*args: Any) -> None:
        trained.set()
        go.wait(30)
        catch_up(*args)

    monkeypatch.setattr(coll, "_catch_up_sync", held)
    rng = np.random.default_rng(7)
    await coll.write({s: [Incoming(f"s{s}-{i}", rng.standard_normal(4).astype(np.float32), b"{}",
                                   1, "n1") for i in range(60)] for s in (0, 1)})
    await wait_for(trained.is_set, 30)
    await coll.drop_shard(1)
    await coll.add_shards([1])
    await coll.write({1: [doc(7, value=7.0)]})  # label 1 of shard 1 again
    go.set()
    await wait_for(lambda: not coll.training, 30)
    assert coll.count() == 61 and coll.index.ntotal == 61
    hits = await coll.search(np.full((1, 4), 7, np.float32), 1, 4)
    assert [(h.id, h.score) for h in hits[0]] == [("d7", 0.0)]
    await engine.close()


async def test_retraining_waits_for_a_stream_of_writes_to_pause(
    tmp_path: Path, blocking: Blocking
) -> None:
    """The first training starts as soon as there is enough to train on; a retraining waits
    while writes keep arriving (a bulk load) and starts once they pause, or once it has waited
    retrain_max_wait_s though they go on."""
    spec = CollectionSpec("r", 8, "l2", 1, 1, IndexSpec("ivf_flat", nlist=8))
    tuning = Tuning(train_min=200, retrain_growth=2, retrain_quiet_s=0.5,
                    retrain_max_wait_s=3600)
    engine = Engine(tmp_path, blocking, tuning, fsync=False)
    await engine.start()
    coll = await engine.ensure(spec, [0], "u")
    rng = np.random.default_rng(3)
    written = 0

    async def batch(n: int) -> None:
        nonlocal written
        await coll.write({0: [Incoming(f"x{written + i}", rng.standard_normal(8).astype(np.float32),
                                       b"{}", 1, "n1") for i in range(n)]})
        written += n

    await batch(250)  # past train_min: the first training starts at once
    await settled(coll)
    first = coll.index.trained_at
    assert first >= 200
    # Past retrain_growth × first, writes still streaming: no retraining yet.
    await batch(2 * first + 10 - written)
    assert coll.wants_training() and not coll.training
    assert coll.index.trained_at == first
    # Once writes pause for retrain_quiet_s, the retraining starts by itself.
    await wait_for(lambda: coll.index.trained_at > first and not coll.training, 30)
    second = coll.index.trained_at
    assert second >= 2 * first
    # Writes that never pause: the retraining waits retrain_max_wait_s, then starts anyway.
    coll.tuning = replace(tuning, retrain_max_wait_s=0.3)
    await batch(2 * second + 10 - written)
    assert not coll.training and coll.index.trained_at == second
    deadline = time.monotonic() + 30
    while not coll.training and coll.index.trained_at == second:
        assert time.monotonic() < deadline, "the retraining never started"
        await batch(5)  # back to back: never a pause of retrain_quiet_s
    await wait_for(lambda: not coll.training and coll.index.trained_at > second, 30)
    await engine.close()


async def test_the_engine_starts_without_a_child_process(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting (and trimming the C heap) forks nothing: a fork of the node from the event
    loop held it for half a second on a busy machine (the C library was looked up by name,
    which runs `ldconfig -p`)."""
    import subprocess

    from aquila.node.storage.heap import trim

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("a child process was started")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", no_child)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    await engine.ensure(SPEC, [0, 1], "u")
    trim()
    await engine.close()


async def test_background_work_yields_the_cores_to_serving(blocking: Blocking) -> None:
    """Training and snapshots run at a lower priority than the threads that serve (a write
    batch waited seconds for a core while millions of vectors trained)."""
    import os

    from aquila.node.blocking import BACKGROUND_NICE

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    own = await blocking.write(nice)
    assert await blocking.background(nice) == max(own, BACKGROUND_NICE)
    assert await blocking.search(nice) == own


async def test_snapshots_go_on_while_an_index_trains(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot of the serving index is written while a training runs (skipped, the change
    log a restart replays grew for as long as the training took), and a restart then
    replays only what came after it."""
    from aquila.node.storage import collection as collection_mod

    gate, started = threading.Event(), threading.Event()
    real = collection_mod.train_streamed

    def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(collection_mod, "train_streamed", slow)
    spec = CollectionSpec("s", 4, "l2", 1, 1, IndexSpec("ivf_flat", nlist=4))
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    coll = await engine.ensure(spec, [0], "u")
    try:
        await coll.write({0: [doc(i) for i in range(150)]})
        await wait_for(started.is_set, what="the training to start")
        await coll.write({0: [doc(i) for i in range(150, 180)]})
        assert coll.training
        await coll.snapshot()
        assert coll.snapshot_seqs == {0: coll.shards[0].applied_seq}
        assert coll.snap_path.exists()
    finally:
        gate.set()
    await wait_for(lambda: not coll.training, 30, what="the training to end")
    await engine.close()
