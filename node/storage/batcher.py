"""Dynamic batching of searches: requests that arrive together become one FAISS call per
shard, so many small concurrent requests cost little more than one batch.

A request waits only while an earlier batch is running; the next batch takes every request
queued meanwhile (up to `max_rows` query rows) that shares its group key (nprobe, shards).
Up to `parallel` batches run at once, one per search thread.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

R = TypeVar("R")


@dataclass
class _Pending(Generic[R]):
    key: Hashable
    queries: np.ndarray
    k: int
    future: asyncio.Future[list[R]] = field(repr=False)


RunBatch = Callable[[Hashable, np.ndarray, int], Awaitable[list[R]]]


def weakly(method: RunBatch[R]) -> RunBatch[R]:
    """An object's bound method, called through a weak reference: a batcher that the object
    holds does not hold it in turn. Held strongly, the pair is a reference cycle, which only
    the collector's next full pass frees: a dropped collection kept its index (gigabytes)
    until then."""
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    async def run(key: Hashable, queries: np.ndarray, k: int) -> list[R]:
        bound = ref()
        if bound is None:
            raise RuntimeError("searched after its owner was freed")
        return await bound(key, queries, k)

    return run


class SearchBatcher(Generic[R]):
    def __init__(self, run: RunBatch[R], *, max_rows: int = 512, parallel: int = 2) -> None:
        self._run = run
        self._max_rows = max_rows
        self._parallel = parallel
        self._queue: list[_Pending[R]] = []
        self._running = 0

    @property
    def idle(self) -> bool:
        """No batch running and none waiting."""
        return self._running == 0 and not self._queue

    async def submit(self, key: Hashable, queries: np.ndarray, k: int) -> list[R]:
        """One result per query row, computed with at least `k` neighbours."""
        fut: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(key, queries, k, fut))
        self._kick()
        return await fut

    def _kick(self) -> None:
        while self._queue and self._running < self._parallel:
            batch = self._take()
            self._running += 1
            asyncio.get_running_loop().create_task(self._execute(batch))

    def _take(self) -> list[_Pending[R]]:
        first = self._queue[0]
        batch: list[_Pending[R]] = []
        rest: list[_Pending[R]] = []
        rows = 0
        for p in self._queue:
            if p.key == first.key and (not batch or rows + len(p.queries) <= self._max_rows):
                batch.append(p)
                rows += len(p.queries)
            else:
                rest.append(p)
        self._queue = rest
        return batch

    async def _execute(self, batch: list[_Pending[R]]) -> None:
        try:
            queries = (
                batch[0].queries if len(batch) == 1 else np.concatenate([p.queries for p in batch])
            )
            k = max(p.k for p in batch)
            results = await self._run(batch[0].key, queries, k)
            start = 0
            for p in batch:
                n = len(p.queries)
                if not p.future.done():
                    p.future.set_result(results[start : start + n])
                start += n
        except BaseException as exc:  # hand every waiter the failure, cancellation included
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running -= 1
            self._kick()
