"""`Blocking`'s hop to a pool's thread and back (node/blocking.py): what `run_in_executor`
gave callers, kept with one future per call: results, exceptions, keyword arguments, a call
whose caller gave up before it started is not run, and a shutdown never leaves a caller
waiting for a call it dropped."""

from __future__ import annotations

import asyncio
import threading

import pytest

from aquila.node.blocking import Blocking

DEADLINE_S = 10.0


async def test_result_exception_and_keywords() -> None:
    b = Blocking(2)
    try:
        main = threading.get_ident()
        assert await b.search(lambda x, y=0: (x + y, threading.get_ident() != main), 2, y=3) == (
            5, True)
        assert await b.write(divmod, 7, 2) == (3, 1)

        def boom() -> None:
            raise KeyError("gone")

        with pytest.raises(KeyError, match="gone"):
            await b.search(boom)
    finally:
        b.close()


async def test_a_call_given_up_before_it_starts_does_not_run() -> None:
    b = Blocking(2)
    release = threading.Event()
    ran: list[str] = []
    try:
        # Both search threads held: a third call waits in the pool's queue.
        held = [asyncio.ensure_future(b.search(release.wait, DEADLINE_S)) for _ in range(2)]
        queued = asyncio.ensure_future(b.search(ran.append, "queued"))
        await asyncio.sleep(0)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        assert await asyncio.gather(*held) == [True, True]
        await b.search(ran.append, "after")  # the pool is FIFO: the cancelled one came first
        assert ran == ["after"]
    finally:
        release.set()
        b.close()


async def test_close_cancels_the_calls_it_drops() -> None:
    b = Blocking(2)
    release = threading.Event()
    held = [asyncio.ensure_future(b.search(release.wait, DEADLINE_S)) for _ in range(2)]
    dropped = asyncio.ensure_future(b.search(lambda: "never"))
    await asyncio.sleep(0)
    # close() drops the queued call, then waits for the two running ones: on a thread, so
    # that they are let go only once the dropped one's caller has heard.
    closing = threading.Thread(target=b.close)
    closing.start()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(dropped, DEADLINE_S)
    finally:
        release.set()
        closing.join(DEADLINE_S)
    assert await asyncio.wait_for(asyncio.gather(*held), DEADLINE_S) == [True, True]
