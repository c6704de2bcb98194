"""Layout 7 (issue 14): tombstones' records in a column family of their own, without bloom
filters in its table files (10 bits of filter for every tombstone kept for its grace period grew
the block cache with the deletes). A record is in exactly one of the two column families, moved
in the batch that changes its kind: deletes, revivals, a delete and a revival of one id in one
batch, releases of labels and purges keep it so, and every reader (look-ups, scans, digests,
the scroll) sees what it saw with one column family. A layout 6 store (tombstones with the live
records) is moved once at its first open, also after a move killed midway."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from aquila.cluster.model.digests import BUCKETS
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.store import (
    _HEADER,
    FLAG_TOMBSTONE,
    LAYOUT,
    TOMBSTONE_BLOCK,
    TOMBSTONES_CF,
    Record,
    Store,
    doc_key,
)
from tests.layouts import as_layout_6, killed_after_writes

DIM = 4
SHARDS = 2
FLAT = CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec("flat"))


def vec(i: int) -> np.ndarray:
    return np.full(DIM, float(i), np.float32)


def family_records(store: Store, s: int) -> tuple[dict[str, bool], dict[str, bool]]:
    """(id → tombstone flag) of the shard's records in the default column family and in that of
    tombstones."""
    prefix = doc_key(s, "")

    def of(family: object | None) -> dict[str, bool]:
        return {k[len(prefix):].decode(): bool(_HEADER.unpack_from(v)[3] & FLAG_TOMBSTONE)
                for k, v in store._scan(prefix, family=family)}  # type: ignore[arg-type]

    return of(None), of(store.tdb)


def check(coll: Collection, model: dict[int, dict[str, bool]]) -> None:
    """Each record in one column family, of its kind; the readers see the model."""
    store = coll.store
    for s in range(SHARDS):
        live, tombs = family_records(store, s)
        assert not set(live) & set(tombs), f"shard {s}: in both: {set(live) & set(tombs)}"
        assert not any(live.values()) and all(tombs.values())
        want = model[s]
        assert set(live) == {d for d, t in want.items() if not t}
        assert set(tombs) <= {d for d, t in want.items() if t}  # purged ones gone
        docs = dict(store.iter_docs(s, vectors=False))
        assert {d: r.tombstone for d, r in docs.items()} == {**live, **tombs}
        assert list(docs) == sorted(docs, key=str.encode)  # id order, merged
        got = store.get_records(s, list(want))
        for (d, tomb), rec in zip(want.items(), got, strict=True):
            if rec is not None:
                assert rec.tombstone == tomb, d
            else:
                assert tomb and d not in tombs, d
        assert [d for d, _ in store.iter_docs(s, live_only=True)] == sorted(
            live, key=str.encode)


async def test_each_record_is_in_the_column_family_of_its_kind(
    tmp_path: Path, blocking: Blocking
) -> None:
    """Random deletes, revivals, deletes of unknown ids, an id twice in a batch, label releases,
    purges and restarts: after each step every record is in one column family, of its kind;
    digests equal those of a scan; the table files of tombstones have no filter."""
    rng = random.Random(7)
    model: dict[int, dict[str, bool]] = {s: {} for s in range(SHARDS)}
    version = 1
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(FLAT, range(SHARDS), "u")
    try:
        for step in range(50):
            op = rng.random()
            if op < 0.75:
                by: dict[int, list[Incoming]] = {}
                for _ in range(rng.randint(1, 10)):
                    s, d = rng.randrange(SHARDS), f"d{rng.randrange(20)}"
                    version += 1
                    if rng.random() < 0.45:
                        by.setdefault(s, []).append(Incoming(d, None, b"", version, "w"))
                        model[s][d] = True
                    else:
                        by.setdefault(s, []).append(
                            Incoming(d, vec(version), b'{"v":%d}' % version, version, "w"))
                        model[s][d] = False
                await coll.write(by)
            elif op < 0.85:
                await coll.snapshot()
                await coll.release_labels()
            elif op < 0.93:
                for s in range(SHARDS):  # those the snapshot covers (check allows either)
                    await coll.purge_tombstones(s, version + 1)
            else:
                await engine.close()
                engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
                await engine.start()
                coll = engine.get("c")
            check(coll, model)
            for s in range(SHARDS):
                assert await coll.digests(s, BUCKETS) == coll._digests_sync(s, BUCKETS), step
        options = sorted((tmp_path / "collections" / "c" / "db").glob("OPTIONS-*"))[-1]
        text = options.read_text()
        table = text.split(f'[TableOptions/BlockBasedTable "{TOMBSTONES_CF}"]')[1].split("[")[0]
        assert "filter_policy=nullptr" in table
        assert f"\n  block_size={TOMBSTONE_BLOCK}\n" in table
        default = text.split('[TableOptions/BlockBasedTable "default"]')[1].split("[")[0]
        assert "filter_policy=bloomfilter" in default
        assert "\n  block_size=4096\n" in default
    finally:
        await engine.close()


def test_a_key_in_both_column_families_is_read_once_as_its_later_change(
    tmp_path: Path
) -> None:
    """A scan's two iterators are made one after the other: a write that moved a key between
    them shows it in both; the scan gives it once, as the later change (higher seq)."""
    store = Store(tmp_path / "db", fsync=False)
    store.open()
    try:
        live = Record(1, 3, 1, False, "w", b"", b"{}")
        tomb = Record(2, 3, 2, True, "w", b"", b"")
        store.db.put(doc_key(0, "a"), live.encode())
        store.tdb.put(doc_key(0, "a"), tomb.encode())
        store.db.put(doc_key(0, "b"), Record(1, 4, 3, False, "w", b"", b"{}").encode())
        docs = list(store.iter_docs(0, vectors=False))
        assert [(d, r.tombstone, r.seq) for d, r in docs] == [("a", True, 2), ("b", False, 3)]
        store.tdb.put(doc_key(0, "a"), Record(1, 3, 0, True, "w", b"", b"").encode())
        docs = list(store.iter_docs(0, vectors=False))
        assert [(d, r.tombstone) for d, r in docs] == [("a", False), ("b", False)]
    finally:
        store.close()


async def _written(tmp_path: Path, blocking: Blocking) -> dict[int, dict[str, Record]]:
    """A collection with deletes, revivals, deletes of unknown ids and released labels; its
    records (iter_docs) per shard."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(FLAT, range(SHARDS), "u")
        for s in range(SHARDS):
            await coll.write({s: [Incoming(f"d{i}", vec(i), b'{"i":%d}' % i, 1, "w")
                                  for i in range(30)]})
            await coll.write({s: [Incoming(f"d{i}", None, b"", 2, "w") for i in range(0, 30, 2)]
                              + [Incoming(f"x{i}", None, b"", 2, "w") for i in range(5)]})
            await coll.write({s: [Incoming(f"d{i}", vec(50 + i), b"{}", 3, "w")
                                  for i in range(0, 30, 6)]})
        await coll.snapshot()
        await coll.release_labels()
        out = {s: dict(coll.store.iter_docs(s)) for s in range(SHARDS)}
        assert sum(r.tombstone for r in out[0].values()) == 15 - 5 + 5
    finally:
        await engine.close()
    return out


async def _reopened(tmp_path: Path, blocking: Blocking,
                    before: dict[int, dict[str, Record]]) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        assert coll.store.layout() == LAYOUT == 7
        for s in range(SHARDS):
            assert dict(coll.store.iter_docs(s)) == before[s]
            live, tombs = family_records(coll.store, s)
            assert set(tombs) == {d for d, r in before[s].items() if r.tombstone}
            assert set(live) == {d for d, r in before[s].items() if not r.tombstone}
            assert await coll.digests(s, BUCKETS) == coll._digests_sync(s, BUCKETS)
        hits = await coll.search(vec(56)[None], 1, None)
        assert hits[0][0].id == "d6"
        # Revived and deleted again after the move: each record where it belongs.
        await coll.write({0: [Incoming("d2", vec(2), b"{}", 9, "w"),
                              Incoming("d6", None, b"", 9, "w")]})
        live, tombs = family_records(coll.store, 0)
        assert "d2" in live and "d2" not in tombs and "d6" in tombs and "d6" not in live
        await coll.drop_shard(1)
        assert family_records(coll.store, 1) == ({}, {})
    finally:
        await engine.close()


async def test_a_layout_6_store_is_moved_at_its_first_open(
    tmp_path: Path, blocking: Blocking
) -> None:
    before = await _written(tmp_path, blocking)
    as_layout_6(tmp_path / "collections" / "c" / "db")
    await _reopened(tmp_path, blocking, before)


async def test_a_move_killed_midway_is_finished_by_the_next_open(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move stops after its second batch of 4 tombstones (as a kill would): 8 moved, the
    rest still with the live records, the store still layout 6; the next open finishes it."""
    before = await _written(tmp_path, blocking)
    path = tmp_path / "collections" / "c" / "db"
    as_layout_6(path)
    store = Store(path, fsync=False)
    store.open()
    with killed_after_writes(monkeypatch, 2):
        store.move_tombstones(chunk=4)
    assert store.layout() == 6
    moved = sum(len(family_records(store, s)[1]) for s in range(SHARDS))
    assert moved == 8
    for s in range(SHARDS):  # read as before meanwhile
        assert dict(store.iter_docs(s)) == before[s]
    store.close()
    await _reopened(tmp_path, blocking, before)
