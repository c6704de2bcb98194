"""A crash at any point of a create, a drop, a shard's drop or add, or a file rewrite leaves
the old state or the new one, never a deleted or half-dropped one; and a node's start never
deletes what it does not know to be its own leftovers."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.node.blocking import Blocking
from aquila.node.files import remove_stale_temps, write_atomic
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import free_port, wait_for
from tests.crash_points import SCENARIOS, SPEC, doc, observe, prepare
from tests.procs import NodeProc, wait_until

ROOT = Path(__file__).resolve().parent.parent


# -- write_atomic ---------------------------------------------------------------------------
def test_concurrent_writers_of_one_file_each_write_whole(tmp_path: Path) -> None:
    """Writers of one file never share a temporary file: every write lands whole (the last
    rename wins) and nothing is left behind."""
    path = tmp_path / "state.json"
    contents = [bytes([65 + w]) * (1000 * (w + 1)) for w in range(6)]
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for _ in range(40):
                write_atomic(path, contents[w][:10], contents[w][10:])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(len(contents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() in contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    write_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_atomic(path, b"new", "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]


def test_the_directory_is_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a directory fsync after the rename, a power failure may lose the rename."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "node_id", b"n1")
    assert events == ["fsync file", "rename", "fsync dir"]


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".cluster_state.json.k2j3h4.tmp").write_bytes(b"half")
    (tmp_path / "spec.json.tmp").write_bytes(b"half")  # the name earlier versions used
    (tmp_path / "cluster_state.json").write_bytes(b"{}")
    (tmp_path / "keep.tmp").mkdir()
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster_state.json", "keep.tmp"]


# -- a real crash at every step ---------------------------------------------------------------
def _run_child(data: Path, scenario: str, crash_at: int) -> tuple[bool, list[str]]:
    """(crashed, steps made when it ran to the end)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.crash_points", str(data), scenario, str(crash_at)],
        cwd=ROOT, capture_output=True, timeout=120,
    )
    if proc.returncode == -signal.SIGKILL:
        return True, []
    assert proc.returncode == 0, proc.stderr.decode()
    return False, orjson.loads(proc.stdout)


def _leftovers(data: Path) -> list[str]:
    root = data / "collections"
    names = [p.name for p in root.iterdir() if p.name.startswith(".")]
    temps = [p.name for d in (data, *root.iterdir()) if d.is_dir()
             for p in d.iterdir() if p.name.endswith(".tmp")]
    return names + temps


def _crash_points(steps: list[str]) -> list[int]:
    """Before every step, except that of a run of unlinks (a folder being removed) only the
    first two and the last are taken: the ones between crash the same way."""
    points = []
    for i, step in enumerate(steps):
        run_start = i >= 2 and steps[i - 1] == steps[i - 2] == step
        run_end = i + 1 == len(steps) or steps[i + 1] != step
        if step != "os.unlink" or not run_start or run_end:
            points.append(i)
    return [*points, len(steps)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_crash_at_any_step_leaves_the_old_or_the_new_state(
    tmp_path: Path, scenario: str
) -> None:
    """The operation runs in its own process, SIGKILLed just before one of its steps (each
    in turn), or run to the end. After each, a restart finds exactly the state before the
    operation or the state after it, and once it finds the new one it keeps finding it: one
    commit point."""
    base = tmp_path / "base"
    asyncio.run(prepare(scenario, base))
    old = asyncio.run(observe(base))
    data = tmp_path / "full"
    shutil.copytree(base, data)
    crashed, steps = _run_child(data, scenario, 1_000_000)
    assert not crashed
    new = asyncio.run(observe(data))
    assert new != old and new["other"] == old["other"]
    seen: list[str] = []
    for crash_at in _crash_points(steps):
        data = tmp_path / f"run{crash_at}"
        shutil.copytree(base, data)
        crashed, _ = _run_child(data, scenario, crash_at)
        assert crashed == (crash_at < len(steps))
        found = asyncio.run(observe(data))
        assert _leftovers(data) == [], (crash_at, _leftovers(data))
        assert found in (old, new), f"crash before step {crash_at} of {steps}: {found}"
        seen.append("old" if found == old else "new")
        shutil.rmtree(data)
    assert seen[-1] == "new" and seen == sorted(seen, key=lambda s: s == "new"), (seen, steps)


# -- what a start may delete ------------------------------------------------------------------
async def test_start_leaves_what_is_not_a_collection_alone(
    tmp_path: Path, blocking: Blocking, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder without spec.json (a lost spec, or something that is no collection) is never
    deleted at start: it is logged and left alone; only the leftovers of this node's own
    creates and drops, named so, are removed."""
    root = tmp_path / "collections"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "readme.txt").write_text("mine")
    (root / "stray.txt").write_text("also mine")
    (root / ".dropping-0123").mkdir()
    (root / ".dropping-0123" / "junk").write_bytes(b"x")
    (root / ".creating-4567").mkdir()  # its spec.json never written
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    with caplog.at_level(logging.WARNING, logger="aquila.node.storage.engine"):
        await engine.start()
    assert engine.collections == {}
    assert (root / "notes" / "readme.txt").read_text() == "mine"
    assert (root / "stray.txt").read_text() == "also mine"
    assert sorted(p.name for p in root.iterdir()) == ["notes", "stray.txt"]
    assert any("notes" in r.getMessage() and "left alone" in r.getMessage()
               for r in caplog.records)
    await engine.close()


async def test_a_collection_folder_holding_another_name_is_left_alone(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    await engine.ensure(SPEC, [0, 1], "u1")
    await engine.close()
    root = tmp_path / "collections"
    (root / "c").rename(root / "elsewhere")
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    assert engine.collections == {}
    assert (root / "elsewhere" / "spec.json").exists()
    await engine.close()


async def test_a_folder_in_the_way_of_a_create_is_moved_aside_and_kept(
    tmp_path: Path, blocking: Blocking
) -> None:
    root = tmp_path / "collections"
    (root / "c").mkdir(parents=True)
    (root / "c" / "precious").write_text("keep me")
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "u1")
    await coll.write({0: [doc(1)]})
    aside = [p for p in root.iterdir() if p.name.startswith(".lost-c-")]
    assert len(aside) == 1 and (aside[0] / "precious").read_text() == "keep me"
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()  # kept at start too
    assert (aside[0] / "precious").read_text() == "keep me"
    assert engine.get("c").count() == 1
    await engine.close()


# -- a shard's drop -----------------------------------------------------------------------------
async def test_a_failed_drop_record_changes_nothing(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record of the shards held is rewritten before anything else: when that fails
    (disk full, say), the shard is still held, whole, in memory and on disk."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "u1")
    await coll.write({1: [doc(i) for i in range(4)]})

    def full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("aquila.node.storage.collection.write_atomic", full)
    with pytest.raises(OSError):
        await engine.drop_shard("c", 1)
    monkeypatch.undo()
    assert sorted(coll.shards) == [0, 1] and coll.count() == 4
    hits = await coll.search(np.full((1, 4), 2, np.float32), 1, None)
    assert [h.id for h in hits[0]] == ["d2"]
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    assert sorted(engine.get("c").shards) == [0, 1] and engine.get("c").count() == 4
    await engine.close()


async def test_keys_left_by_an_interrupted_drop_never_come_back(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drop is committed by the record; when its key deletion then fails, the keys left
    are not the shard's any more: taking the shard on again starts it empty, and so does a
    restart."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "u1")
    await coll.write({1: [doc(i) for i in range(4)]})

    def interrupted(*_: Any) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(coll.store, "drop_shard", interrupted)
        with pytest.raises(OSError):
            await engine.drop_shard("c", 1)
    # Shard 0 has no key yet (nothing was written to it); shard 1's are left.
    assert sorted(coll.shards) == [0] and coll.store.shards_present() == {1}
    # Moved back here: it starts empty, without the old documents.
    await engine.ensure(SPEC, [0, 1], "u1")
    assert coll.count() == 0 and await coll.get(1, "d2") is None
    assert coll.store.shards_present() == set()
    await coll.write({1: [doc(7)]})
    await engine.drop_shard("c", 1)
    # Interrupted again, then a restart: the keys are removed at open.
    await coll.write({0: [doc(8)]})
    await engine.ensure(SPEC, [0, 1], "u1")
    await coll.write({1: [doc(9)]})
    with monkeypatch.context() as m:
        m.setattr(coll.store, "drop_shard", interrupted)
        with pytest.raises(OSError):
            await engine.drop_shard("c", 1)
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = engine.get("c")
    assert sorted(coll.shards) == [0] and coll.store.shards_present() == {0}
    assert coll.count() == 1 and coll.index.ntotal == 1
    await engine.close()


# -- a real node -------------------------------------------------------------------------------
def test_a_node_killed_while_collections_come_and_go_restarts_whole(tmp_path: Path) -> None:
    """A real node SIGKILLed while a client creates, fills and drops collections in a loop:
    at restart a collection written before is whole, one cut off is whole or gone, and what
    the node does not know to be its own stays where it was."""
    data = tmp_path / "node"
    notes = data / "collections" / "notes"
    notes.mkdir(parents=True)
    (notes / "readme.txt").write_text("not a collection")
    node = NodeProc(data, port=free_port(), fsync="true").start()
    try:
        assert node.call("PUT", "/v1/collections/keep", {"dim": 4, "shards": 2})[0] == 201
        docs = [{"id": f"k{i}", "vector": [float(i)] * 4} for i in range(20)]
        assert node.call("POST", "/v1/collections/keep/documents", {"documents": docs})[0] == 200
        cycles = 0
        stop = threading.Event()

        def churn() -> None:
            nonlocal cycles
            while not stop.is_set():
                try:
                    statuses = (
                        node.call("PUT", "/v1/collections/churn", {"dim": 4, "shards": 2})[0],
                        node.call("POST", "/v1/collections/churn/documents",
                                  {"documents": [{"id": "x", "vector": [1.0] * 4}]})[0],
                        node.call("DELETE", "/v1/collections/churn")[0],
                    )
                except OSError:
                    return
                if statuses == (201, 200, 200):
                    cycles += 1

        t = threading.Thread(target=churn)
        t.start()
        wait_until(lambda: cycles >= 3, 60, "three create-fill-drop cycles")
        node.kill()
        stop.set()
        t.join(30)
        node.start()
        status, desc = node.call("GET", "/v1/collections/keep")
        assert status == 200 and desc["count"] == 20, desc
        status, desc = node.call("GET", "/v1/collections/churn")
        assert status in (200, 404), desc
        if status == 200:
            assert desc["count"] in (0, 1), desc
        assert (notes / "readme.txt").read_text() == "not a collection"
        assert [p.name for p in (data / "collections").iterdir() if p.name.startswith(".")] == []
    finally:
        node.stop()


async def test_a_snapshot_being_written_never_lands_in_the_next_incarnation(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collection re-created while its old incarnation's index snapshot is being written:
    the new incarnation must not find the old index in its folder."""
    from aquila.node.storage.index import VectorIndex

    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0, 1], "u1")
    await coll.write({0: [doc(i) for i in range(6)]})
    started, gate = threading.Event(), threading.Event()
    real_save = VectorIndex.save

    def slow_save(self: VectorIndex, *args: Any) -> None:
        started.set()
        gate.wait(30)
        real_save(self, *args)

    monkeypatch.setattr(VectorIndex, "save", slow_save)
    snap = asyncio.create_task(coll.snapshot())
    await wait_for(started.is_set, what="the snapshot to start writing")
    recreate = asyncio.create_task(engine.ensure(SPEC, [0, 1], "u2"))
    # The re-create goes as far as it can while the old snapshot is being written: to its
    # end, or to waiting for the snapshot in the old incarnation's close.
    await wait_for(lambda: recreate.done() or getattr(coll._saving, "_waiters", None),
                   what="the re-create to go as far as it can")
    gate.set()
    await snap
    new = await recreate
    monkeypatch.undo()
    assert new.uid == "u2" and new.count() == 0 and new.index.ntotal == 0
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = engine.get("c")
    assert coll.uid == "u2" and coll.count() == 0 and coll.index.ntotal == 0
    await engine.close()


async def test_a_shard_drop_racing_a_re_create_keeps_the_new_incarnation_s_record(
    tmp_path: Path, blocking: Blocking
) -> None:
    """A shard's drop that waited while the collection was re-created must not write the old
    incarnation's record into the new one's folder."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    await engine.ensure(SPEC, [0, 1], "u1")
    recreate = asyncio.create_task(engine.ensure(SPEC, [0, 1], "u2"))
    drop = asyncio.create_task(engine.drop_shard("c", 1))
    await asyncio.gather(recreate, drop)
    held = sorted(engine.get("c").shards)
    assert engine.get("c").uid == "u2"
    await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    assert engine.get("c").uid == "u2" and sorted(engine.get("c").shards) == held
    await engine.close()
