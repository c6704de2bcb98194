"""Time as a dependency: only SystemClock touches the real clock.

Protocol code (gossip, suspicion, fan-out deadlines, reconciliation, retries, copy throttles)
takes a `Clock` and waits only through it, so the cluster simulator can drive many nodes with a
`ManualClock` deterministically and without sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Collection
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch: for timestamps other nodes check (message freshness),
        which a monotonic clock cannot give."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait_for(self, aw: Awaitable[T], timeout: float) -> T:  # noqa: ASYNC109
        """`aw`'s result, or TimeoutError once `timeout` seconds have passed (`aw` is then
        cancelled)."""
        ...

    async def wait_first(
        self, futures: Collection[asyncio.Future[Any]], timeout: float | None  # noqa: ASYNC109
    ) -> set[asyncio.Future[Any]]:
        """Until one of `futures` is done or `timeout` seconds have passed; the done ones."""
        ...


def consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a finished future's outcome, so that asyncio never reports it as "exception was
    never retrieved": a done callback for tasks whose failure is handled elsewhere or no
    longer matters (a hedged request that lost, background work that logs its own)."""
    if not fut.cancelled():
        fut.exception()


def track(task: asyncio.Task[Any], tasks: set[asyncio.Task[Any]], log: logging.Logger) -> None:
    """Keep background work in `tasks` while it runs (the loop holds tasks weakly only) and
    log its failure when it ends: nobody awaits it, so nobody else would retrieve it."""
    tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        tasks.discard(t)
        exc = None if t.cancelled() else t.exception()
        if exc is not None:
            log.error("background task %s failed: %s", t.get_coro(), exc, exc_info=exc)

    task.add_done_callback(done)


def abandon(futures: Collection[asyncio.Future[Any]]) -> None:
    """Cancel these futures and consume whatever they end with: the ones already done (their
    exception included) and the ones that finish with an error despite the cancellation."""
    for fut in futures:
        fut.cancel()
        fut.add_done_callback(consume)


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, aw: Awaitable[T], timeout: float) -> T:  # noqa: ASYNC109
        # A timeout scope, not asyncio.wait_for: no task per call on the search hot path.
        async with asyncio.timeout(timeout):
            return await aw

    async def wait_first(
        self, futures: Collection[asyncio.Future[Any]], timeout: float | None  # noqa: ASYNC109
    ) -> set[asyncio.Future[Any]]:
        if not futures:
            return set()
        done, _ = await asyncio.wait(futures, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        return done


# Wall time of a ManualClock at 0 (2023-11-14).
_WALL_EPOCH = 1_700_000_000.0


class ManualClock:
    """A clock that only moves when a test calls `advance` (or `run` jumps it).

    `sleep` parks the caller until the clock has been advanced past its wake-up time, so
    async code written against `Clock` runs unchanged in the simulator.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        # A fixed, plausible epoch offset: simulated nodes share this clock, so their
        # message timestamps agree exactly and stay fresh however far a test advances time.
        return _WALL_EPOCH + self._now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._seq), fut))
        await fut

    async def wait_for(self, aw: Awaitable[T], timeout: float) -> T:  # noqa: ASYNC109
        task = asyncio.ensure_future(aw)
        if not await self.wait_first([task], timeout):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise TimeoutError
        return task.result()

    async def wait_first(
        self, futures: Collection[asyncio.Future[Any]], timeout: float | None  # noqa: ASYNC109
    ) -> set[asyncio.Future[Any]]:
        if not futures:
            return set()
        waiters: set[asyncio.Future[Any]] = set(futures)
        sleeper = None
        if timeout is not None:
            sleeper = asyncio.ensure_future(self.sleep(timeout))
            waiters.add(sleeper)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if sleeper is not None:
                sleeper.cancel()
        return {f for f in futures if f.done()}

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come."""
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        self._now = max(self._now, when)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def next_wakeup(self) -> float | None:
        """When the earliest sleeper wakes (None: nobody sleeps)."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # cancelled sleepers
        return self._sleepers[0][0] if self._sleepers else None

    async def run(self, aw: Awaitable[T], *, limit_s: float = 3600.0, idle_turns: int = 64) -> T:
        """Await `aw` while jumping the clock to the next wake-up whenever nothing else can
        run (trio's autojump): timeouts and intervals pass at once, and nothing waits on real
        time. Fails once `limit_s` clock seconds have passed."""
        task = asyncio.ensure_future(aw)
        end = self._now + limit_s
        try:
            while True:
                await _idle(task, idle_turns)
                if task.done():
                    return task.result()
                wake = self.next_wakeup()
                if wake is None:
                    raise RuntimeError("nothing to wait for: the awaited work is stuck")
                if wake > end:
                    raise TimeoutError(f"not done within {limit_s} s of clock time")
                self.advance_to(wake)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def _idle(task: asyncio.Future[Any], turns: int) -> None:
    """Until nothing but timers is left to run on the loop (or `task` is done). asyncio's loop
    shows its ready queue; on another loop, give everything `turns` turns instead."""
    ready = getattr(asyncio.get_running_loop(), "_ready", None)
    quiet = 0
    for _ in range(turns if ready is None else 1_000_000):
        if task.done():
            return
        await asyncio.sleep(0)
        if ready is not None:
            quiet = quiet + 1 if not ready else 0
            if quiet >= 2:
                return
