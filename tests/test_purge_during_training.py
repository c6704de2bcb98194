"""A purge while an index trains: the training's catch-up replays the writes made since its
start from the change log, and a purge takes a tombstone's change key with it. A delete made
during the training and purged before the catch-up read it was never replayed into the new
index: the deleted document's vector stayed in it (a hit slot lost to every search near it),
and after a restart its label was counted live (the live bitmap comes from the index's keys).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import settled, wait_for
from tests.held_training import hold_catch_up
from tests.small_ivf import SPEC, doc


async def test_a_purge_during_a_training_leaves_no_deleted_vector_in_the_new_index(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_catch_up = Collection._catch_up_sync
    # The delete and the purge below come before the training's catch-up.
    trained, go_on = hold_catch_up(monkeypatch)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(150)]})
        try:
            await wait_for(trained.is_set, 30, what="the training to reach its catch-up")
            await coll.write({0: [Incoming("d0", None, b"", 2, "n1")]})
            await coll.snapshot()  # of the serving index: it covers the delete
            await coll.purge_tombstones(0, 10)
        finally:
            go_on.set()
        await settled(coll, what="the training to end")
        assert coll.count() == 149
        assert coll.index.ntotal == 149, "the purged delete was not replayed into the new index"
        # Once the training is in, the tombstone goes at the next pass.
        assert await coll.purge_tombstones(0, 10) == 1
        page, _ = await coll.stream_shard(0, None, 200)
        assert "d0" not in {d.id for d in page}
    finally:
        await engine.close()
    monkeypatch.setattr(Collection, "_catch_up_sync", real_catch_up)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        assert coll.count() == 149 and coll.index.ntotal == 149
        assert len(coll.shards[0].live_labels()) == 149
    finally:
        await engine.close()


async def test_a_drop_during_a_purges_scan_lets_the_name_be_created_again(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge scans a shard's records outside the collection's locks, through an iterator
    that keeps the database open: a drop meanwhile closed the store, but RocksDB's lock on the
    folder stayed with the iterator, and the collection created again under that name could
    not open its store ("lock hold by current process") until the scan ended."""
    from aquila.node.storage.store import Store

    real = Store.old_tombstones
    scanning, ended, gate = threading.Event(), threading.Event(), threading.Event()

    def held(self: Store, shard: int, before: int, **kw: Any) -> Any:
        scan = real(self, shard, before, **kw)

        def run() -> Any:
            scanning.set()
            try:
                gate.wait(3)  # millions of tombstones take seconds to read (bounded)
                return scan()
            finally:
                ended.set()

        return run

    monkeypatch.setattr(Store, "old_tombstones", held)
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(20)]})
        await coll.write({0: [Incoming("d0", None, b"", 2, "n1")]})
        await coll.snapshot()
        purging = asyncio.ensure_future(coll.purge_tombstones(0, 10))
        try:
            await wait_for(scanning.is_set, 30, what="the purge's scan")
            await engine.drop("s")
            again = await engine.ensure(SPEC, [0], "u2")
        finally:
            gate.set()
        await asyncio.gather(purging, return_exceptions=True)
        await again.write({0: [doc(1)]})
        assert again.count() == 1
    finally:
        await engine.close()


async def test_a_cancelled_purge_loses_no_write_made_after_it(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge cancelled (the anti-entropy task, at a stop) while its thread stages the
    tombstones' removal: the write locks were let go with the cancellation, a write of a
    purged id then went through (acknowledged, its tombstone's label taken again), and the
    purge's batch, read before it, removed the document the write had just made durable."""
    from aquila.node.storage.shard import Shard

    real_forget, real_purge = Shard.forget, Collection._purge_sync
    forgetting, gate, ended = threading.Event(), threading.Event(), threading.Event()

    def held(self: Shard, gone: Any, batch: Any) -> None:
        forgetting.set()
        gate.wait(3)  # a purge of many tombstones takes a while (bounded)
        real_forget(self, gone, batch)

    def purge(self: Collection, *args: Any) -> Any:
        try:
            return real_purge(self, *args)
        finally:
            ended.set()

    monkeypatch.setattr(Shard, "forget", held)
    monkeypatch.setattr(Collection, "_purge_sync", purge)
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [doc(i) for i in range(5)]})
        await coll.write({0: [Incoming("d0", None, b"", 2, "n1")]})
        await coll.snapshot()
        purging = asyncio.ensure_future(coll.purge_tombstones(0, 10))
        try:
            await wait_for(forgetting.is_set, 30, what="the purge's removal")
            purging.cancel()
            await asyncio.gather(purging, return_exceptions=True)
            again = doc(0)
            await coll.write({0: [Incoming("d0", again.vector, b"{}", 3, "n1")]})
        finally:
            gate.set()
        await wait_for(ended.is_set, 30, what="the purge's thread to end")
        assert await coll.get(0, "d0") is not None, "an acknowledged write was purged"
        rows = await coll.search(np.stack([doc(0).vector]), 1, None)
        assert [h.id for h in rows[0]] == ["d0"]
    finally:
        await engine.close()


async def test_a_cancelled_purge_stops_its_scan(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge cancelled (the healer's task at a stop, before the stores close) is waited for
    to its thread's end: its scan of every record of the shard (seconds for millions of
    tombstones) ran to its end under the stop, which only a close told it to cut short."""
    from aquila.node.storage.store import Store

    real = Store.old_tombstones
    scanning, told = threading.Event(), threading.Event()

    def endless(self: Store, shard: int, before: int, *, stop: Any = None) -> Any:
        real(self, shard, before, stop=stop)()  # the real one, with the same stop

        def run() -> tuple[list[str], float]:  # a scan of records without end
            scanning.set()
            for _ in range(1000):  # 10 s at most
                if stop is not None and stop():
                    told.set()
                    break
                threading.Event().wait(0.01)
            return [], float("inf")

        return run

    monkeypatch.setattr(Store, "old_tombstones", endless)
    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        await coll.write({0: [Incoming("d0", None, b"", 2, "n1")]})
        purging = asyncio.ensure_future(coll.purge_tombstones(0, 10))
        await wait_for(scanning.is_set, 30, what="the purge's scan")
        purging.cancel()
        await asyncio.gather(purging, return_exceptions=True)
        assert purging.cancelled()
        assert told.is_set(), "the cancelled purge's scan was not told to stop"
    finally:
        await engine.close()


async def test_a_cancelled_purge_stops_before_reading_every_candidate(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the write locks, a purge reads each candidate's record again (7 us each: 7 s a
    million) before its one batch: cancelled, it stops between reads, having written nothing."""
    from aquila.node.storage.store import Store

    real, real_purge = Store.get_records, Collection._purge_sync
    reading, gate = threading.Event(), threading.Event()
    reads: list[int] = []
    stops: list[Any] = []

    def purge(self: Collection, *args: Any) -> Any:
        stops.append(args[-1])  # what tells it to stop
        return real_purge(self, *args)

    def held(self: Store, shard: int, ids: list[str], *, cache: bool = True,
             vectors: bool = True) -> Any:
        if not cache:  # the purge's reads
            reads.append(len(ids))
            reading.set()
            gate.wait(10)
        return real(self, shard, ids, cache=cache, vectors=vectors)

    engine = Engine(tmp_path, blocking, Tuning(train_min=10_000), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        n = 10_000
        await coll.write({0: [Incoming(f"t{i}", None, b"", 2, "n1") for i in range(n)]})
        await coll.snapshot()
        monkeypatch.setattr(Store, "get_records", held)
        monkeypatch.setattr(Collection, "_purge_sync", purge)
        purging = asyncio.ensure_future(coll.purge_tombstones(0, 10))
        try:
            await wait_for(reading.is_set, 30, what="the purge's reads")
            purging.cancel()
            await wait_for(lambda: stops and callable(stops[0]) and stops[0](), 30,
                           what="the purge's thread to be told to stop")
        finally:
            gate.set()
        await asyncio.gather(purging, return_exceptions=True)
        assert purging.cancelled()
        assert sum(reads) < n, "the cancelled purge read every candidate"
        monkeypatch.setattr(Store, "get_records", real)
        page, _ = await coll.stream_shard(0, None, 2 * n)
        assert len(page) == n, "the cancelled purge wrote its batch"
    finally:
        await engine.close()
