"""A peer's small sub-search runs on the event loop (`inline`), without the hop to a search
thread and back: its answer is the one the search threads give, and it goes to a thread
after all when it is not small, when a writer is in or waiting on the index, or when the
search threads are busy."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage import collection as collection_module
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import wait_for

SPEC = CollectionSpec("c", 8, "cosine", 3, 1, IndexSpec("ivf_flat", nlist=8))


def docs(shard: int, n: int) -> list[Incoming]:
    rng = np.random.default_rng(shard)
    return [Incoming(f"s{shard}-{i}", rng.standard_normal(8).astype(np.float32),
                     b'{"n":%d}' % i, 1, "n1") for i in range(n)]


@pytest.fixture(params=["ivf_flat"])
async def coll(request: pytest.FixtureRequest, tmp_path: Path, blocking: Blocking
               ) -> AsyncIterator[Collection]:
    engine = Engine(tmp_path, blocking, Tuning(train_min=200), fsync=False)
    await engine.start()
    try:
        spec = replace(SPEC, index=replace(SPEC.index, type=request.param))
        c = await engine.ensure(spec, [0, 1, 2], "u")
        await c.write({s: docs(s, 120) for s in range(3)})
        await wait_for(lambda: c.index.trained and not c.training, 30,
                       what="the training to end")
        yield c
    finally:
        await engine.close()


class Hops:
    """Counts the calls that go to a search thread."""

    def __init__(self, blocking: Blocking, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = blocking.search

        async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(fn, *args, **kwargs)

        monkeypatch.setattr(blocking, "search", counted)


def ids_scores(rows: list[list[Any]]) -> list[list[tuple[str, float, bytes, int]]]:
    return [[(h.id, h.score, h.metadata, h.shard) for h in row] for row in rows]


async def test_an_inline_search_answers_as_the_search_threads_do(
    coll: Collection, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = Hops(blocking, monkeypatch)
    rng = np.random.default_rng(7)
    for shards in ([0, 1, 2], [1], [0, 2]):
        for nq in (1, 3):
            q = rng.standard_normal((nq, 8)).astype(np.float32)
            for nprobe in (1, 4, 8):
                threaded = await coll.search(q, 5, nprobe, None, shards, True)
                calls = hops.calls
                inline = await coll.search(q, 5, nprobe, None, shards, True, inline=True)
                assert hops.calls == calls  # no hop
                assert ids_scores(inline) == ids_scores(threaded)
                assert [[h.vector for h in r] for r in inline] == \
                       [[h.vector for h in r] for r in threaded]
    assert hops.calls > 0


async def test_a_large_search_goes_to_a_search_thread(
    coll: Collection, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = Hops(blocking, monkeypatch)
    q = np.random.default_rng(1).standard_normal((collection_module.INLINE_ROWS + 1, 8))
    await coll.search(q.astype(np.float32), 5, 8, None, [0, 1, 2], inline=True)
    assert hops.calls == 1
    # So does a search that scans more than the inline budget.
    monkeypatch.setattr(collection_module, "INLINE_WORK", 8 * 10)
    await coll.search(q[:1].astype(np.float32), 5, 8, None, [0, 1, 2], inline=True)
    assert hops.calls == 2
    await coll.search(q[:1].astype(np.float32), 5, 1, None, [0], inline=True)  # not 10
    assert hops.calls == 3
    # And one whose candidates are many records to read.
    monkeypatch.setattr(collection_module, "INLINE_WORK", 10**9)
    k = collection_module.INLINE_CANDIDATES // 2 + 1
    await coll.search(q[:2].astype(np.float32), k, 1, None, [0], inline=True)
    assert hops.calls == 4
    await coll.search(q[:1].astype(np.float32), k, 1, None, [0], inline=True)
    assert hops.calls == 4


async def test_no_inline_search_while_a_writer_waits_or_a_batch_runs(
    coll: Collection, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = Hops(blocking, monkeypatch)
    q = np.random.default_rng(2).standard_normal((1, 8)).astype(np.float32)
    # A writer holds the index: the search waits for it (to the thread, after the lock).
    entered, release = asyncio.Event(), asyncio.Event()

    async def writer() -> None:
        async with coll.rw.write():
            entered.set()
            await release.wait()

    w = asyncio.ensure_future(writer())
    await entered.wait()
    s = asyncio.ensure_future(coll.search(q, 5, 8, None, [0, 1, 2], inline=True))
    await wait_for(lambda: not coll._batcher.idle, 10, what="the search to queue")
    assert not s.done()
    release.set()
    await w
    await s
    assert hops.calls == 1
    # A batch on the search threads (held there): the next search joins the batcher's queue.
    gate = threading.Event()
    real = blocking.search

    async def held(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def wait_then() -> Any:
            gate.wait(10)
            return fn(*args, **kwargs)
        return await real(wait_then)

    monkeypatch.setattr(blocking, "search", held)
    first = asyncio.ensure_future(coll.search(q, 5, 8, None, [0, 1, 2]))
    await wait_for(lambda: not coll._batcher.idle, 10, what="the batch to start")
    second = asyncio.ensure_future(coll.search(q, 5, 8, None, [0, 1, 2], inline=True))
    await asyncio.sleep(0)  # it runs up to its wait
    assert not second.done()
    gate.set()
    assert ids_scores(await second) == ids_scores(await first)


async def test_an_inline_search_builds_no_shard_selector(
    coll: Collection, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A search of part of the local shards needs a bitmap over every label of the
    # collection (times the shards' ids): built on the loop, it would cost in proportion to
    # the labels given, which no inline bound weighs. Not built yet, the search goes to a
    # thread (which builds it and keeps it); the next one runs inline.
    hops = Hops(blocking, monkeypatch)
    q = np.random.default_rng(3).standard_normal((1, 8)).astype(np.float32)
    assert (1,) not in coll.index._shard_sels
    threaded = await coll.search(q, 5, 1, None, [1], inline=True)
    assert hops.calls == 1
    assert (1,) in coll.index._shard_sels
    inline = await coll.search(q, 5, 1, None, [1], inline=True)
    assert hops.calls == 1
    assert ids_scores(inline) == ids_scores(threaded)


async def test_the_inline_bound_weighs_the_lists_probed_and_the_vectors_read(
    coll: Collection, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = Hops(blocking, monkeypatch)
    q = np.random.default_rng(4).standard_normal((1, 8)).astype(np.float32)
    index = coll.index
    scanned = index.imbalance() * index.ntotal / index.nlist * 8  # the vectors of one list
    coarse = index.nlist * 8  # the query against every list's centroid
    # Enough for the list scanned, not for the centroids besides: to a thread.
    monkeypatch.setattr(collection_module, "INLINE_WORK", int(scanned + coarse) - 1)
    await coll.search(q, 5, 1, None, [0, 1, 2], inline=True)
    assert hops.calls == 1
    # Enough for both: inline; with the hits' vectors to read besides, to a thread.
    monkeypatch.setattr(collection_module, "INLINE_WORK", int(scanned + coarse) + 1)
    await coll.search(q, 5, 1, None, [0, 1, 2], inline=True)
    assert hops.calls == 1
    await coll.search(q, 5, 1, None, [0, 1, 2], True, inline=True)
    assert hops.calls == 2


async def test_the_inline_bound_weighs_the_lists_as_they_are_filled(
    coll: Collection, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writes after the training that fall in one list (data drifting from the sample it was
    # trained on) make that list long: a query like them scans it, not a list of average size.
    same = np.random.default_rng(5).standard_normal(8).astype(np.float32)
    await coll.write({0: [Incoming(f"x{i}", same, b"{}", 1, "n1") for i in range(300)]})
    assert coll.index.trained and not coll.training
    hops = Hops(blocking, monkeypatch)
    index = coll.index
    mean = index.ntotal / index.nlist
    skew = float(index.index.invlists.imbalance_factor())
    assert skew > 2
    even, real = (index.nlist + mean) * 8, (index.nlist + skew * mean) * 8
    monkeypatch.setattr(collection_module, "INLINE_WORK", int((even + real) / 2))
    await coll.search(same[None], 5, 1, None, [0, 1, 2], inline=True)
    assert hops.calls == 1
    monkeypatch.setattr(collection_module, "INLINE_WORK", int(real) + 1)
    await coll.search(same[None], 5, 1, None, [0, 1, 2], inline=True)
    assert hops.calls == 1


@pytest.mark.parametrize("coll", ["ivf_sq8", "ivf_pq"], indirect=True)
async def test_a_search_that_re_ranks_goes_to_a_search_thread(
    coll: Collection, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compressed index's candidates are read from the store to be re-ranked (two reads
    each): that is not work for the event loop, however small the scan."""
    hops = Hops(blocking, monkeypatch)
    q = np.random.default_rng(2).standard_normal((1, 8)).astype(np.float32)
    threaded = await coll.search(q, 5, 1, None, [0, 1, 2])
    assert hops.calls == 1
    assert await coll.search(q, 5, 1, None, [0, 1, 2], inline=True) == threaded
    assert hops.calls == 2
