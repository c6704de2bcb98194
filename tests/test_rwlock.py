"""The readers-writer lock that keeps index updates and swaps away from searches
(node/storage/locks.py): readers together, a writer alone once the readers in have left,
writers first (a reader coming while a writer waits waits too), and a reader cancelled while
it waits holds nothing."""

from __future__ import annotations

import asyncio

import pytest

from aquila.node.storage.locks import RWLock

DEADLINE_S = 10.0


async def settle() -> None:
    """Let every task that can run run (each step of each is one loop turn)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_readers_share_and_a_writer_waits_for_them() -> None:
    lock = RWLock()
    log: list[str] = []
    a, b = lock.read(), lock.read()
    await a.__aenter__()
    await b.__aenter__()  # two readers in at once

    async def write() -> None:
        async with lock.write():
            log.append("writer in")

    writer = asyncio.ensure_future(write())
    await settle()
    assert log == []  # readers still in
    await a.__aexit__(None, None, None)
    await settle()
    assert log == []
    await b.__aexit__(None, None, None)
    await asyncio.wait_for(writer, DEADLINE_S)
    assert log == ["writer in"]


async def test_a_reader_coming_while_a_writer_waits_goes_after_it() -> None:
    lock = RWLock()
    log: list[str] = []
    first = lock.read()
    await first.__aenter__()

    async def write() -> None:
        async with lock.write():
            log.append("writer in")
            await settle()
            log.append("writer out")

    async def read() -> None:
        async with lock.read():
            log.append("late reader in")

    writer = asyncio.ensure_future(write())
    await settle()
    late = asyncio.ensure_future(read())
    await settle()
    assert log == []  # the writer waits for the first reader, the late reader for the writer
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(asyncio.gather(writer, late), DEADLINE_S)
    assert log == ["writer in", "writer out", "late reader in"]


async def test_a_reader_cancelled_while_waiting_holds_nothing() -> None:
    lock = RWLock()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def write() -> None:
        async with lock.write():
            entered.set()
            await release.wait()

    async def read() -> None:
        async with lock.read():
            pass

    writer = asyncio.ensure_future(write())
    await asyncio.wait_for(entered.wait(), DEADLINE_S)
    waiting = asyncio.ensure_future(read())
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await asyncio.wait_for(writer, DEADLINE_S)
    # Nothing left held: another writer gets in at once.
    async with asyncio.timeout(DEADLINE_S):
        async with lock.write():
            pass
    assert lock.readable_now()


async def test_a_writer_cancelled_while_waiting_lets_the_readers_behind_it_in() -> None:
    # A reader in, a writer waiting for it, a reader waiting behind the writer: the writer
    # gives up (a drop or a training cancelled by a stop). Once the first reader leaves, the
    # late reader must get in, with no other writer coming to wake it.
    lock = RWLock()
    first = lock.read()
    await first.__aenter__()
    writer = asyncio.ensure_future(_write_once(lock))
    await settle()
    late = asyncio.ensure_future(_read_once(lock))
    await settle()
    assert not late.done()  # behind the writer
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(late, DEADLINE_S)


async def test_a_writer_cancelled_once_woken_lets_the_readers_woken_with_it_in() -> None:
    # A writer in; a reader, then a second writer, wait for it. The first writer leaves and
    # wakes both; the reader looks first and sees the second writer still waiting; the second
    # writer is cancelled before it looks. Nobody holds the lock then: the reader must get in.
    lock = RWLock()
    entered, release = asyncio.Event(), asyncio.Event()
    waiting: list[asyncio.Future[None]] = []

    async def hold() -> None:
        async with lock.write():
            entered.set()
            await release.wait()
        waiting[0].cancel()  # in the same turn as the wake-up: before the writer looks

    first = asyncio.ensure_future(hold())
    await asyncio.wait_for(entered.wait(), DEADLINE_S)
    reader = asyncio.ensure_future(_read_once(lock))
    await settle()
    waiting.append(asyncio.ensure_future(_write_once(lock)))
    await settle()
    release.set()
    await asyncio.wait_for(first, DEADLINE_S)
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    await asyncio.wait_for(reader, DEADLINE_S)


async def _write_once(lock: RWLock) -> None:
    async with lock.write():
        pass


async def _read_once(lock: RWLock) -> None:
    async with lock.read():
        pass
