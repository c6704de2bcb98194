"""How long each callback of an event loop holds it, garbage collection left out: the
tests' guard against FAISS, RocksDB or other slow work done on the loop instead of a thread
(`conftest.event_loop_never_blocked`).

asyncio's own report (debug mode, `slow_callback_duration`) counts wall time, and a full
collection of a long test session's heap (every earlier test's leftovers: 0.2-0.5 s on this
machine) lands in whichever callback allocates at that moment; it is the test process's
cost, not the callback's work, so it is left out here."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from types import TracebackType
from typing import Any

import pytest


class CollectorTime:
    """Seconds the cyclic garbage collector has run in this process: all threads together
    (it holds the GIL wherever it starts: every thread waits), and per thread (the one it
    ran on, whose CPU it cost)."""

    by_thread: dict[int, float] = {}
    _started = 0.0

    @classmethod
    def track(cls, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            cls._started = time.perf_counter()
        else:
            me = threading.get_ident()
            cls.by_thread[me] = cls.by_thread.get(me, 0.0) + time.perf_counter() - cls._started

    @classmethod
    def everywhere(cls) -> float:
        return sum(cls.by_thread.values())

    @classmethod
    def on_this_thread(cls) -> float:
        return cls.by_thread.get(threading.get_ident(), 0.0)


gc.callbacks.append(CollectorTime.track)


class LoopHolds:
    """While entered, every callback of `loop` that held it too long is described in `held`:
    one that worked on it (the loop thread's CPU time) for longer than `limit()` seconds, or
    kept it from running for longer than `WALL_FACTOR * limit()` (a blocking call, a thread
    holding the GIL), collection excluded from both (any thread's from the wall time, the
    loop thread's own from its CPU). Wall time alone would take a busy machine's preemption
    for work on the loop: CI shares 2 cores with multi-node tests and trainings. `limit` is read at each callback, so a test may widen it for a stretch
    (`loop.slow_callback_duration`)."""

    WALL_FACTOR = 3.0

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: Any) -> None:
        self.loop = loop
        self.limit = limit
        self.held: list[str] = []
        self._patch = pytest.MonkeyPatch()

    def __enter__(self) -> LoopHolds:
        if not isinstance(self.loop, asyncio.BaseEventLoop):  # uvloop runs its own handles
            raise TypeError(f"the loop guard cannot time the callbacks of a "
                            f"{type(self.loop).__name__} (only asyncio's own loops')")
        run = asyncio.events.Handle._run

        def timed(handle: asyncio.events.Handle) -> None:
            if handle._loop is not self.loop:  # type: ignore[attr-defined]
                return run(handle)
            t0, cpu0 = time.perf_counter(), time.thread_time()
            gc0, own0 = CollectorTime.everywhere(), CollectorTime.on_this_thread()
            try:
                return run(handle)
            finally:
                # Any thread's collection stopped the loop; only its own cost it CPU.
                wall = time.perf_counter() - t0 - (CollectorTime.everywhere() - gc0)
                cpu = time.thread_time() - cpu0 - (CollectorTime.on_this_thread() - own0)
                limit = self.limit()
                if cpu > limit or wall > self.WALL_FACTOR * limit:
                    self.held.append(f"{handle!r:.600} held the loop for {wall:.3f} s "
                                     f"({cpu:.3f} s of CPU on it)")

        self._patch.setattr(asyncio.events.Handle, "_run", timed)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._patch.undo()
