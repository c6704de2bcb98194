"""A search of many query vectors in one request: split over the search threads (each runs
FAISS single-threaded), with the same answers as the queries one at a time."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import SPLIT_ROWS, Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import wait_for
from tests.datasets import load_sample


async def test_a_large_batch_is_split_over_the_search_threads(tmp_path: Path) -> None:
    smp = load_sample()
    blocking = Blocking(3)
    engine = Engine(tmp_path, blocking, Tuning(train_min=1000), fsync=False)
    await engine.start()
    try:
        spec = CollectionSpec("c", smp.dim, "cosine", 4, 1, IndexSpec("ivf_flat"))
        coll = await engine.ensure(spec, range(4), "u")
        by: dict[int, list[Incoming]] = {}
        for i, v in enumerate(smp.base[:3000]):
            by.setdefault(shard_of(str(i), 4), []).append(
                Incoming(str(i), v, b'{"i":%d}' % i, 1, "n"))
        await coll.write(by)
        await wait_for(lambda: coll.state == "trained", 60, what="the index to train")
        calls: list[int] = []
        search = blocking.search

        async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(fn, "__name__", "") == "run_batch":
                calls.append(len(args[1]))
            return await search(fn, *args, **kwargs)

        blocking.search = counted  # type: ignore[method-assign]
        q = smp.queries[: 3 * SPLIT_ROWS + 5]
        rows = await coll.search(q, 10, 8, shards=[0, 1, 3])
        assert sorted(calls) == [SPLIT_ROWS + 1, SPLIT_ROWS + 2, SPLIT_ROWS + 2]
        calls.clear()
        alone = [(await coll.search(q[i : i + 1], 10, 8, shards=[0, 1, 3]))[0]
                 for i in range(len(q))]
        assert calls == [1] * len(q)
        assert [[(h.id, h.score, h.metadata, h.shard) for h in row] for row in rows] == \
            [[(h.id, h.score, h.metadata, h.shard) for h in row] for row in alone]
        assert all(len(row) == 10 and {h.shard for h in row} <= {0, 1, 3} for row in rows)
        small = await coll.search(q[: 2 * SPLIT_ROWS - 1], 10, 8)  # below two threads' worth
        assert calls[len(q):] == [2 * SPLIT_ROWS - 1] and len(small) == 2 * SPLIT_ROWS - 1
        del blocking.search
    finally:
        await engine.close()
        blocking.close()


async def test_a_batch_is_split_only_over_the_threads_other_batches_leave_free(
    tmp_path: Path,
) -> None:
    smp = load_sample()
    blocking = Blocking(2)
    engine = Engine(tmp_path, blocking, Tuning(train_min=1000), fsync=False)
    await engine.start()
    try:
        spec = CollectionSpec("c", smp.dim, "cosine", 2, 1, IndexSpec("ivf_flat"))
        coll = await engine.ensure(spec, range(2), "u")
        by: dict[int, list[Incoming]] = {}
        for i, v in enumerate(smp.base[:2000]):
            by.setdefault(shard_of(str(i), 2), []).append(Incoming(str(i), v, b"{}", 1, "n"))
        await coll.write(by)
        await wait_for(lambda: coll.state == "trained", 60, what="the index to train")
        qa, qb = smp.queries[: 2 * SPLIT_ROWS], smp.queries[2 * SPLIT_ROWS : 4 * SPLIT_ROWS]
        alone_a, alone_b = await coll.search(qa, 10, 8), await coll.search(qb, 10, 8)
        calls: list[int] = []
        gate = asyncio.Event()
        search = blocking.search

        async def held(fn: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(len(args[1]))
            await gate.wait()
            return await search(fn, *args, **kwargs)

        blocking.search = held  # type: ignore[method-assign]
        a = asyncio.ensure_future(coll.search(qa, 10, 8))
        try:
            await wait_for(lambda: len(calls) == 2, what="the first batch's two parts")
            b = asyncio.ensure_future(coll.search(qb, 10, 8))  # both threads are taken
            await wait_for(lambda: len(calls) >= 3, what="the second batch")
        finally:
            gate.set()
        rows_a, rows_b = await a, await b
        assert calls == [SPLIT_ROWS, SPLIT_ROWS, 2 * SPLIT_ROWS]
        assert [[h.id for h in r] for r in rows_a] == [[h.id for h in r] for r in alone_a]
        assert [[h.id for h in r] for r in rows_b] == [[h.id for h in r] for r in alone_b]
        calls.clear()
        await coll.search(qa, 10, 8)  # alone again: split over both threads
        assert calls == [SPLIT_ROWS, SPLIT_ROWS]
        del blocking.search
    finally:
        await engine.close()
        blocking.close()
