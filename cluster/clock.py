"""Time as a dependency: only SystemClock touches the real clock.

Protocol code (gossip, suspicion, fan-out deadlines) takes a `Clock`, so the cluster
simulator can drive many nodes with a `ManualClock` deterministically and without sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch: for timestamps other nodes check (message freshness),
        which a monotonic clock cannot give."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# Wall time of a ManualClock at 0 (2023-11-14).
_WALL_EPOCH = 1_700_000_000.0


class ManualClock:
    """A clock that only moves when a test calls `advance`.

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

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
