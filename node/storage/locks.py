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
        self._read = _Read(self)

    def read(self) -> _Read:
        """Held by any number of readers at once, while no writer is in or waiting."""
        return self._read

    async def _enter_read(self) -> None:
        if self.readable_now():
            # Nothing awaited from the check on: no writer can come in between. A search
            # takes the lock this way unless a writer is about (no Condition, no task
            # switch); a writer's release wakes the readers that had to wait.
            self._readers += 1
            return
        async with self._cond:
            await self._cond.wait_for(self.readable_now)
            self._readers += 1

    async def _exit_read(self) -> None:
        self._readers -= 1
        # Only a writer waits for the readers to leave (readers wait for writers).
        if self._writers_waiting:
            async with self._cond:
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
            except BaseException:
                # Given up (cancelled): readers that waited behind this writer alone must
                # look again, or they wait for the next writer to leave (a reader's exit
                # wakes nobody when no writer waits).
                self._writers_waiting -= 1
                self._cond.notify_all()
                raise
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Read:
    """`RWLock.read()`: an async context manager without a generator (`asynccontextmanager`
    costs a generator and its frames on every search)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        await self._lock._enter_read()

    async def __aexit__(self, *exc: object) -> None:
        await self._lock._exit_read()
