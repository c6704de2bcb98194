"""An asyncio readers-writer lock: FAISS CPU indexes allow concurrent searches, but adding,
removing or swapping an index must exclude them. Writers take precedence so a stream of
searches cannot starve index updates."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class RWLock:
    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def readable_now(self) -> bool:
        """Whether a read could start at once: no writer in and none waiting. A caller on
        the event loop that reads without awaiting in between (an inline search) needs no
        lock then: no writer can enter before it returns."""
        return not self._writer and not self._writers_waiting

    @asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()
