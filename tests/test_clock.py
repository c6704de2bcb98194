"""The two clocks behind `Clock`: the system one waits on real time, the manual one only when
told (or when `run` jumps it), with the same results."""

from __future__ import annotations

import asyncio

import pytest

from aquila.cluster.clock import ManualClock, SystemClock


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_manual_sleep_wakes_in_order_when_advanced() -> None:
    clock = ManualClock(5.0)
    woke: list[str] = []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        woke.append(name)

    tasks = [asyncio.ensure_future(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0), ("c", 3))]
    await settle()
    assert clock.next_wakeup() == 6.0
    clock.advance(0.5)
    await settle()
    assert woke == []
    clock.advance(1.5)
    await settle()
    assert woke == ["a", "b"] and clock.now() == 7.0
    clock.advance_to(100.0)
    await settle()
    assert woke == ["a", "b", "c"] and clock.next_wakeup() is None
    await asyncio.gather(*tasks)


async def test_manual_wait_for_times_out_on_the_clock_and_cancels() -> None:
    clock = ManualClock()
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang() -> int:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    task = asyncio.ensure_future(clock.wait_for(hang(), 2.0))
    await settle()
    assert not task.done()
    clock.advance(2.0)
    with pytest.raises(TimeoutError):
        await task
    assert cancelled.is_set()

    async def quick() -> int:
        await clock.sleep(1.0)
        return 7

    assert await clock.run(clock.wait_for(quick(), 2.0)) == 7
    assert clock.now() == 3.0


@pytest.mark.parametrize("make", [ManualClock, SystemClock])
async def test_wait_first_returns_the_done_ones_or_nothing_at_the_timeout(make: type) -> None:
    clock = make()
    loop = asyncio.get_running_loop()
    a: asyncio.Future[int] = loop.create_future()
    b: asyncio.Future[int] = loop.create_future()
    loop.call_soon(a.set_result, 1)
    assert await clock.wait_first([a, b], 5.0) == {a}
    t0 = clock.now()
    timeout = 0.02
    got = await (clock.run(clock.wait_first([b], timeout)) if isinstance(clock, ManualClock)
                 else clock.wait_first([b], timeout))
    assert got == set()
    assert clock.now() - t0 >= timeout * 0.9
    assert await clock.wait_first([], 1.0) == set()


async def test_system_wait_for() -> None:
    clock = SystemClock()
    assert await clock.wait_for(asyncio.sleep(0, result=3), 1.0) == 3
    with pytest.raises(TimeoutError):
        await clock.wait_for(asyncio.Event().wait(), 0.01)


async def test_run_jumps_only_as_far_as_needed_and_stops_at_its_limit() -> None:
    clock = ManualClock()

    async def work() -> str:
        await clock.sleep(10)
        await clock.sleep(5)
        return "done"

    assert await clock.run(work()) == "done"
    assert clock.now() == 15.0
    with pytest.raises(TimeoutError):
        await clock.run(clock.sleep(100), limit_s=50)
    with pytest.raises(RuntimeError, match="stuck"):
        await clock.run(asyncio.Event().wait())
