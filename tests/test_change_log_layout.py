"""Layout 6 (issue 14): the change log (Q keys) in a column family of its own, without bloom
filters (it is only scanned; its keys' filter bits, a deleted document's too until its purge,
were cache nobody read). Writes, overwrites, deletes, purges and a dropped shard keep it
exactly the documents' latest changes; a restart replays from it; a layout 5 store (the log in
the default column family) is moved once at its first open, also after a move killed
midway."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.store import CHANGES_CF, LAYOUT, Store
from tests.layouts import as_layout_5, killed_after_writes

DIM = 4
SHARDS = 2
FLAT = CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec("flat"))


def vec(i: int) -> np.ndarray:
    return np.full(DIM, float(i), np.float32)


def log_of(store: Store) -> dict[int, list[tuple[int, str]]]:
    return {s: list(store.iter_changes(s, 0)) for s in range(SHARDS)}


def expected(coll: Collection) -> dict[int, list[tuple[int, str]]]:
    """Each document's latest change (tombstones too), by seq: what the log must hold."""
    return {s: sorted((r.seq, d) for d, r in coll.store.iter_docs(s, vectors=False))
            for s in range(SHARDS)}


def q_keys_in_default(store: Store) -> int:
    return sum(1 for _ in store._scan(b"Q"))


async def _written(tmp_path: Path, blocking: Blocking) -> dict[int, list[tuple[int, str]]]:
    """A collection with overwrites, deletes and a snapshot followed by more writes (which
    only the change log brings back at a restart); its log, checked against its records."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(FLAT, range(SHARDS), "u")
        for s in range(SHARDS):
            await coll.write({s: [Incoming(f"d{i}", vec(i), b'{"i":%d}' % i, 1, "w")
                                  for i in range(30)]})
            await coll.write({s: [Incoming(f"d{i}", None, b"", 2, "w") for i in range(0, 30, 3)]
                              + [Incoming(f"d{i}", vec(100 + i), b"{}", 2, "w")
                                 for i in range(1, 30, 3)]})
        await coll.snapshot()
        await coll.write({0: [Incoming("late", vec(500), b'{"late":1}', 1, "w")]})
        log = log_of(coll.store)
        assert log == expected(coll)
        assert q_keys_in_default(coll.store) == 0
        assert len(log[0]) == 31 and len(log[1]) == 30
    finally:
        await engine.close()
    return log


async def _reopened(tmp_path: Path, blocking: Blocking,
                    log: dict[int, list[tuple[int, str]]]) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        assert coll.store.layout() == LAYOUT == 7
        assert log_of(coll.store) == log and q_keys_in_default(coll.store) == 0
        # Replayed from the log: the write after the snapshot is in the index.
        hits = await coll.search(vec(500)[None], 1, None)
        assert hits[0][0].id == "late" and hits[0][0].metadata == b'{"late":1}'
        # And the log goes on from there.
        await coll.write({1: [Incoming("d1", None, b"", 3, "w")]})
        assert log_of(coll.store) == expected(coll)
    finally:
        await engine.close()


async def test_the_log_is_its_own_column_family_without_filters(
    tmp_path: Path, blocking: Blocking
) -> None:
    log = await _written(tmp_path, blocking)
    options = sorted((tmp_path / "collections" / "c" / "db").glob("OPTIONS-*"))[-1].read_text()
    table = options.split(f'[TableOptions/BlockBasedTable "{CHANGES_CF}"]')[1].split("[")[0]
    assert "filter_policy=nullptr" in table
    default = options.split('[TableOptions/BlockBasedTable "default"]')[1].split("[")[0]
    assert "filter_policy=bloomfilter" in default  # the records' look-ups keep theirs
    await _reopened(tmp_path, blocking, log)


async def test_a_dropped_shard_leaves_no_change_log(tmp_path: Path, blocking: Blocking) -> None:
    await _written(tmp_path, blocking)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        await coll.drop_shard(1)
        assert list(coll.store.iter_changes(1, 0)) == []
        assert len(list(coll.store.iter_changes(0, 0))) == 31
    finally:
        await engine.close()


async def test_a_layout_5_store_is_moved_at_its_first_open(
    tmp_path: Path, blocking: Blocking
) -> None:
    log = await _written(tmp_path, blocking)
    as_layout_5(tmp_path / "collections" / "c" / "db")
    await _reopened(tmp_path, blocking, log)


async def test_a_move_killed_midway_is_finished_by_the_next_open(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move stops after its second batch of 7 keys (as a kill would): those 14 keys are
    in the column family of changes only (each batch moves its keys), the rest still in the
    default one, the store still layout 5; the next open finishes it."""
    log = await _written(tmp_path, blocking)
    path = tmp_path / "collections" / "c" / "db"
    as_layout_5(path)
    store = Store(path, fsync=False)
    store.open()
    with killed_after_writes(monkeypatch, 2):
        store.move_changes(chunk=7)
    assert store.layout() == 5 and q_keys_in_default(store) == 61 - 14
    assert sum(len(v) for v in log_of(store).values()) == 14
    store.close()
    await _reopened(tmp_path, blocking, log)
