"""Sub-searches to one node that arrive together travel together.

Under concurrent load every client search asks every node for its shards: one peer request
per node per search, each with its own HTTP round trip, request handling and FAISS call on
the peer. Concurrent sub-searches for the same node with the same parameters (collection,
shards, k, nprobe, filter, what to include) are alike but for their query vectors, so they
can share one request: while `parallel` requests for a key are in flight, later ones queue,
and the queue leaves as one frame of all their queries as soon as a request returns. At low
load nothing waits (a search goes at once, alone); under load the per-query cost of a peer
request shrinks with the batch. Each caller still waits under its own deadline: one that
gives up leaves the batch to the others.

A request answers its rows (per query, its hits) and something shared by all its queries (a
peer's plans: how each shard was searched, with the nprobe a search by recall used): each
caller gets its own rows and the shared part.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import numpy as np

from aquila.cluster.clock import track
from aquila.cluster.model.documents import Hit

log = logging.getLogger(__name__)

Rows = list[list[Hit]]
# Send these query vectors (one frame) within `budget` seconds: per query, its hits, and what
# the answer says of all its queries alike (None if nothing).
Send = Callable[[np.ndarray, float], Awaitable[tuple[Rows, object]]]


@dataclass
class _Waiting:
    vectors: np.ndarray
    budget: float
    send: Send  # alike for every search of a key
    future: asyncio.Future[tuple[Rows, object]]
    max_rows: int  # of the key's requests: the peer bounds queries × k


class Coalescer:
    """Per key, at most `parallel` requests in flight; what comes meanwhile goes together, at
    most `max_rows` query vectors a request (a search larger than that goes alone).

    One in flight by default: each frame costs both ends a message's wake-up, system calls
    and decoding whatever it carries, and a peer serves one coordinator's frames one after
    the other anyway: with one, more of the searches that come while a frame is answered
    share the next (three nodes under 16 clients, `bench_cpu_split.py`, one run against two
    in flight: CPU a search 1.86 -> 1.54 ms, a peer's event loop 0.28-0.30 -> 0.16-0.18 ms,
    q/s 580 -> 739)."""

    def __init__(self, parallel: int = 1, max_rows: int = 256) -> None:
        self.parallel = parallel
        self.max_rows = max_rows
        self._running: dict[Hashable, int] = {}
        self._queues: dict[Hashable, list[_Waiting]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # requests that carried more than one search (for tests, metrics)

    async def search(self, key: Hashable, vectors: np.ndarray, budget: float,
                     send: Send, max_rows: int | None = None) -> tuple[Rows, object]:
        """`max_rows`: fewer query vectors a request than the coalescer's own cap, for this
        key (a peer refuses a frame of more than MAX_QUERY_RESULTS queries × k)."""
        if self._running.get(key, 0) < self.parallel and not self._queues.get(key):
            self._running[key] = self._running.get(key, 0) + 1
            try:
                return await send(vectors, budget)
            finally:
                self._done(key)
        fut: asyncio.Future[tuple[Rows, object]] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append(_Waiting(
            vectors, budget, send, fut,
            self.max_rows if max_rows is None else min(max_rows, self.max_rows)))
        return await fut

    def _done(self, key: Hashable) -> None:
        self._running[key] -= 1
        queue = self._queues.get(key)
        while queue and self._running[key] < self.parallel:
            batch = self._take(queue)
            if not batch:
                break
            self._running[key] += 1
            track(asyncio.get_running_loop().create_task(self._execute(key, batch)),
                  self._tasks, log)
        if not queue:
            self._queues.pop(key, None)
        if not self._running[key]:
            del self._running[key]

    def _take(self, queue: list[_Waiting]) -> list[_Waiting]:
        batch: list[_Waiting] = []
        rows = 0
        while queue:
            w = queue[0]
            if w.future.done():  # its caller gave up while it waited
                queue.pop(0)
                continue
            if batch and rows + len(w.vectors) > batch[0].max_rows:
                break
            batch.append(queue.pop(0))
            rows += len(w.vectors)
        return batch

    async def _execute(self, key: Hashable, batch: list[_Waiting]) -> None:
        # Once every caller of the batch has given up (their deadlines came), its request
        # is cancelled: nobody waits for its answer, and while it is in flight (up to the
        # budget, a slow or dead peer's) the key's next searches would queue behind it.
        task = asyncio.current_task()
        sending = True

        def gave_up(_: asyncio.Future[tuple[Rows, object]]) -> None:
            if sending and task is not None and all(w.future.done() for w in batch):
                task.cancel()

        for w in batch:
            w.future.add_done_callback(gave_up)
        try:
            vectors = (batch[0].vectors if len(batch) == 1
                       else np.concatenate([w.vectors for w in batch]))
            if len(batch) > 1:
                self.batches += 1
            try:
                rows, shared = await batch[0].send(vectors, max(w.budget for w in batch))
            finally:
                sending = False
            start = 0
            for w in batch:
                n = len(w.vectors)
                if not w.future.done():
                    w.future.set_result((rows[start : start + n], shared))
                start += n
        except Exception as exc:  # every waiter gets the failure (and retrieves it)
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
        except BaseException:  # cancelled (the node is shutting down): so are the waiters
            for w in batch:
                w.future.cancel()
            raise
        finally:
            self._done(key)
