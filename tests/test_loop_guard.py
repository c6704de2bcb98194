"""The blocked-loop guard of every async test (`tests/loop_guard.py`) sees a callback that
works on the loop or blocks it, and leaves out the garbage collector's time inside one."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest

from tests.loop_guard import LoopHolds


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def _one_callback(fn: object) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(lambda: (fn(), done.set_result(None)))  # type: ignore[operator]
    await done


def _work(seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


async def test_a_callback_that_works_on_the_loop_is_seen() -> None:
    loop = asyncio.get_running_loop()
    with LoopHolds(loop, lambda: 0.05) as holds:
        await _one_callback(lambda: _work(0.1))
    assert len(holds.held) == 1 and "of CPU on it" in holds.held[0], holds.held


async def test_a_callback_that_blocks_the_loop_is_seen() -> None:
    loop = asyncio.get_running_loop()
    with LoopHolds(loop, lambda: 0.05) as holds:
        await _one_callback(lambda: time.sleep(0.05 * LoopHolds.WALL_FACTOR + 0.05))
    assert len(holds.held) == 1 and "held the loop for" in holds.held[0], holds.held


def _garbage_collector() -> tuple[list[float], Any]:
    """A million cycles made garbage, and a call that collects them, noting how long it took."""
    garbage = [_Cycle() for _ in range(1_000_000)]
    del garbage
    spent: list[float] = []

    def collect() -> None:
        t0 = time.perf_counter()
        gc.collect()
        spent.append(time.perf_counter() - t0)

    return spent, collect


async def test_the_collectors_time_is_left_out() -> None:
    loop = asyncio.get_running_loop()
    spent, collect = _garbage_collector()
    with LoopHolds(loop, lambda: 0.1) as holds:
        await _one_callback(collect)
    assert spent[0] > 0.1, "the collection was too quick to show anything; make more garbage"
    assert not holds.held, holds.held


def test_a_loop_whose_callbacks_it_cannot_time_is_refused() -> None:
    """uvloop runs its own handles, not asyncio's: the guard would time none of them (and the
    fixture's filter hides uvloop's own slow-callback reports), passing every test blind."""
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        with pytest.raises(TypeError, match="cannot time"), LoopHolds(loop, lambda: 0.05):
            pass
    finally:
        loop.close()


async def test_a_collection_on_another_thread_does_not_hide_the_loops_work() -> None:
    """Another thread's collection stops the loop (the GIL) without costing the loop thread
    CPU: taken off the loop's wall time, not off its CPU time, where it hid the work the
    callback did."""
    import threading

    loop = asyncio.get_running_loop()
    spent, collect = _garbage_collector()

    def work_beside_a_collection() -> None:
        t = threading.Thread(target=collect)
        t.start()
        _work(0.15)
        t.join()

    with LoopHolds(loop, lambda: 0.1) as holds:
        await _one_callback(work_beside_a_collection)
    assert spent[0] > 0.15, "the collection was too quick to show anything; make more garbage"
    assert len(holds.held) == 1 and "of CPU on it" in holds.held[0], holds.held
