"""The server's end of a peer channel serves a request at once, in the reader's turn, and
writes its answer's frame straight to the connection (cluster/peers/channel.py): a request
that waits goes on in a task (`_finish`) exactly as it would have in its own, and the frames
are the ones aiohttp's writer makes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.writer import WebSocketWriter

from aquila.cluster.model import request_id
from aquila.cluster.peers.channel import _binary_frame, _finish
from tests.test_peer_protocol_channel import Peer, ask, running


class _Sink:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


class _Protocol:
    _paused = False


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
async def test_a_frame_is_the_one_aiohttps_writer_makes(size: int) -> None:
    sink = _Sink()
    writer = WebSocketWriter(_Protocol(), sink, use_mask=False)  # type: ignore[arg-type]
    msg = bytes(range(256)) * (size // 256) + bytes(size % 256)
    await writer.send_frame(msg, WSMsgType.BINARY)
    assert _binary_frame(msg) == bytes(sink.data)


async def _started(coro: Any) -> Any:
    """Start `coro` outside any task, as the server does; what it yielded first."""
    return coro.send(None)


async def test_finish_hands_the_coroutine_the_futures_result_and_failure() -> None:
    loop = asyncio.get_running_loop()
    got: list[Any] = []
    first: asyncio.Future[int] = loop.create_future()
    second: asyncio.Future[int] = loop.create_future()

    async def body() -> None:
        got.append(await first)
        await asyncio.sleep(0)  # a bare yield
        try:
            await second
        except ValueError as exc:
            got.append(str(exc))
        got.append(request_id.current.get())

    coro = body()
    waits = await _started(coro)
    assert waits is first
    request_id.current.set("mine")
    task = loop.create_task(_finish(coro, waits))
    await asyncio.sleep(0)
    first.set_result(7)
    for _ in range(5):
        await asyncio.sleep(0)
    second.set_exception(ValueError("bad"))
    await task
    assert got == [7, "bad", "mine"]


async def test_finish_throws_a_cancellation_into_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    seen: list[str] = []

    async def body() -> None:
        try:
            await never
        finally:
            seen.append("finally")

    coro = body()
    task = loop.create_task(_finish(coro, await _started(coro)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["finally"] and never.cancelled()


async def test_requests_served_at_once_and_later_keep_their_own_request_ids() -> None:
    gate = asyncio.Event()

    async def serve(op: str, name: str, body: bytes) -> Any:
        if body.startswith(b"wait"):
            await gate.wait()
        return body + b":" + (request_id.current.get() or "-").encode()

    peer = Peer(serve)
    async with running(peer) as peers:
        token = request_id.current.set("trace-1")
        try:
            waiting = asyncio.create_task(ask(peers, peer, b"wait"))
            assert await ask(peers, peer, b"now") == b"now:trace-1"
        finally:
            request_id.current.reset(token)
        assert await ask(peers, peer, b"now") == b"now:-"  # nothing left behind
        later = asyncio.create_task(ask(peers, peer, b"wait2"))
        assert await ask(peers, peer, b"again") == b"again:-"
        gate.set()
        assert await waiting == b"wait:trace-1"
        assert await later == b"wait2:-"
        assert peer.upgrades == 1 and peer.http_frames == 0
