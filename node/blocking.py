"""The only place that starts threads. Callers pass a function and get an awaitable; they
never see a thread. Three pools keep kinds of work from starving each other:

- `search`: FAISS searches and RocksDB reads on the query path, one thread per core;
- `write`: RocksDB write batches (each waits on fsync) and index updates;
- `background`: index training and snapshots, one at a time, so training never takes every
  core from serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


# The background thread's nice value at least (and its OpenMP workers', which inherit it). At
# the process's own, on two busy cores, a training of millions of vectors made every write
# batch wait seconds for a core (9.5 s per 2,000 documents at 5M vectors; 0.25 s once its
# threads were reniced): a thread that always runs keeps the core over one that wakes for a
# moment unless its weight is lower.
BACKGROUND_NICE = 10


def _training_threads() -> None:
    # Training may use every core but one: serving keeps a core while an index trains.
    import faiss

    with contextlib.suppress(OSError, AttributeError):  # elsewhere than Linux: as it is
        me = threading.get_native_id()  # Linux: a thread's own nice value
        os.setpriority(os.PRIO_PROCESS, me,
                       max(BACKGROUND_NICE, os.getpriority(os.PRIO_PROCESS, me)))
    faiss.omp_set_num_threads(max(1, (os.cpu_count() or 2) - 1))


def _single_threaded_faiss() -> None:
    # Query threads already run in parallel with each other; letting FAISS's OpenMP fan every
    # small batch out over all cores as well would oversubscribe them.
    import faiss

    faiss.omp_set_num_threads(1)


def _deliver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[R], call: Callable[[], R]
             ) -> None:
    """On a pool's thread: run `call` unless its caller gave up before it started (as
    `run_in_executor` skips it then), and hand the outcome to `fut` on the loop."""
    if fut.cancelled():
        return
    try:
        result = call()
    except BaseException as exc:  # the caller's to see, as run_in_executor passes it on
        _to_loop(loop, _fail, fut, exc)
    else:
        _to_loop(loop, _succeed, fut, result)


def _to_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
        loop.call_soon_threadsafe(fn, *args)


def _succeed(fut: asyncio.Future[R], result: R) -> None:
    if not fut.done():  # not cancelled meanwhile
        fut.set_result(result)


def _fail(fut: asyncio.Future[R], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _if_cancelled(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[R],
                  done: Future[None]) -> None:
    """The pool's future of a call: cancelled, the call never ran (a shutdown dropped it),
    and its caller must not wait for ever."""
    if done.cancelled():
        _to_loop(loop, fut.cancel)


# The name (prefix) of the background pool's threads (trainings).
BACKGROUND_THREADS = "aq-bg"


class Blocking:
    def __init__(self, search_threads: int | None = None) -> None:
        n = search_threads or max(2, os.cpu_count() or 2)
        self.search_threads = n
        self._search = ThreadPoolExecutor(n, "aq-search", initializer=_single_threaded_faiss)
        # Index additions assign vectors to lists with a search of the coarse quantizer, which
        # FAISS spreads over the cores; they run one at a time (the collection orders them).
        # Three: a write being made durable (its fsync) and the index update of the one
        # before, which holds the index's write lock (every search waits) from before it has
        # a thread, each have one beside a training's catch-up slice with the writes held (a
        # second at a time, see `collection.CATCH_UP_SLICE_S`); with two, that update waited
        # for the slice or the fsync to end, and the searches with it.
        self._write = ThreadPoolExecutor(3, "aq-write")
        self._background = ThreadPoolExecutor(1, BACKGROUND_THREADS,
                                              initializer=_training_threads)
        # Decoding and validating big request bodies (pure Python and orjson).
        self._parse = ThreadPoolExecutor(2, "aq-parse")
        # A training's catch-up slices that hold no lock (`Collection._catch_up`), a second
        # at a time: on one thread of their own, not the write threads, which three
        # collections catching up at once would fill, every other collection's writes
        # waiting for them. Not at the background thread's nice 10 (see CATCH_UP_SLICE_S).
        self._catch_up = ThreadPoolExecutor(1, "aq-catchup")

    async def search(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._run(self._search, fn, *args, **kwargs)

    async def write(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._run(self._write, fn, *args, **kwargs)

    async def parse(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._run(self._parse, fn, *args, **kwargs)

    async def catch_up(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._run(self._catch_up, fn, *args, **kwargs)

    async def background(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._run(self._background, fn, *args, **kwargs)

    @staticmethod
    async def _run(
        pool: ThreadPoolExecutor, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        # What `loop.run_in_executor` does, with one future handed its outcome by one
        # callback: not an asyncio future chained both ways to the pool's (its chaining and
        # state copies were a third of a search's hop to its thread and back, on the loop).
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        done = pool.submit(_deliver, loop, fut, functools.partial(fn, *args, **kwargs))
        done.add_done_callback(functools.partial(_if_cancelled, loop, fut))
        return await fut

    def close(self) -> None:
        """Wait for the request and write threads; not for a background job (a training of
        millions of vectors runs for many minutes and cannot be interrupted inside FAISS's
        k-means): it is abandoned (`aquila serve` then exits without waiting for its thread)."""
        for pool in (self._search, self._write, self._parse, self._catch_up):
            pool.shutdown(wait=True, cancel_futures=True)
        self._background.shutdown(wait=False, cancel_futures=True)
