"""Review of the peer channel (cluster/peers/channel.py) as an attacker and a maintainer: what a
peer (or whatever answers at its address) can make a node read is bounded before it is read,
as on the HTTP path; a peer that stops answering (stopped, half-open) breaks its channel at
either end instead of holding it; a node stops while a client has stopped reading."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aquila.cluster.model.errors import BadRequest
from aquila.cluster.peers import channel, wire
from aquila.cluster.peers.channel import CHANNEL_PATH, MAX_CHANNEL_FRAME, ServerChannel
from aquila.cluster.peers.client import PeerError, collection_path
from aquila.cluster.peers.http import Peers
from aquila.cluster.replication import frames
from aquila.node.http import internal_api
from tests.conftest import StartNode, wait_for
from tests.test_peer_protocol_channel import ME, Peer, channels_of, running, scripted


async def ask(peers: Peers, addr: str, body: bytes = b"q", timeout: float = 5.0,  # noqa: ASYNC109
              max_answer: int | None = None) -> Any:
    return await peers.request(addr, "POST", collection_path("c", "search"), None, to=ME,
                               raw=body, timeout=timeout, max_answer=max_answer)


# --- what a peer can make this node read ------------------------------------------------------
async def test_a_peer_cannot_make_a_client_buffer_an_answer_past_the_channels_cap() -> None:
    """The HTTP path refuses an answer longer than the request's bound from its header, before
    reading it; the channel read any message up to 1 GiB (its MAC checked only after)."""
    closed: list[int | None] = []

    async def huge(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(wire.encode_hello(bytes(16)))
        await ws.receive()  # the request
        assert request.transport is not None
        # A binary frame that says it is 1 GiB long, and a few bytes of it.
        request.transport.write(b"\x82\x7f" + (1 << 30).to_bytes(8, "big") + b"\0" * 64)
        msg = await ws.receive()
        closed.append(msg.data if msg.type == aiohttp.WSMsgType.CLOSE else None)
        return ws

    async with scripted(huge) as (addr, peers):
        with pytest.raises(PeerError, match="channel"):
            await ask(peers, addr, timeout=10.0, max_answer=64 << 10)
        await wait_for(lambda: closed, what="the server to see the channel closed")
        assert closed == [aiohttp.WSCloseCode.MESSAGE_TOO_BIG]


async def test_an_answer_past_the_channels_cap_is_asked_again_over_http() -> None:
    big = b"a" * (getattr(channel, "MAX_CHANNEL_ANSWER", 16 << 20) + 1)

    async def serve(op: str, name: str, body: bytes) -> Any:
        return big if body == b"big" else body

    peer = Peer(serve)
    async with running(peer) as peers:
        assert await ask(peers, peer.addr, b"big", timeout=60.0) == big
        assert await ask(peers, peer.addr, b"small") == b"small"  # the channel went on
        assert (peer.upgrades, peer.http_frames) == (1, 1)


async def test_a_node_refuses_a_channel_message_past_a_frames_size(start_node: StartNode
                                                                   ) -> None:
    """Clients send frames above MAX_CHANNEL_FRAME over HTTP; a node took channel messages of
    up to twice max_body_bytes (128 MiB), MAX_IN_FLIGHT of them at once per channel."""
    node = await start_node(node_id="n1")
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://{node.config.addr}{CHANNEL_PATH}")
        wire.decode_hello((await ws.receive()).data)
        body = b"x" * (MAX_CHANNEL_FRAME + wire.OVERHEAD)
        await ws.send_bytes(wire.encode_request(0, 1, "search", "c", None, body, None))
        msg = await ws.receive()
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE,
                                        aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
        await ws.close()
        # The node is up and takes the next channel.
        ws = await s.ws_connect(f"http://{node.config.addr}{CHANNEL_PATH}")
        wire.decode_hello((await ws.receive()).data)
        await ws.send_bytes(wire.encode_request(0, 1, "search", "c", None, b"x", None))
        got = wire.decode_answer((await ws.receive()).data, None, 0)
        assert (got.id, got.kind, got.type) == (1, wire.ERROR, 404)
        await ws.close()


async def test_a_frame_past_a_nodes_body_limit_is_refused_alone(start_node: StartNode) -> None:
    """A node whose limit is below a channel's frame (a smaller max_body_bytes than its peers')
    closed the channel on such a frame, failing every request on it, where over HTTP that
    request alone is refused (413)."""
    node = await start_node(node_id="n1", max_body_bytes=4096)
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://{node.config.addr}{CHANNEL_PATH}")
        wire.decode_hello((await ws.receive()).data)
        body = b"x" * (2 * node.config.max_wire_bytes)
        await ws.send_bytes(wire.encode_request(0, 1, "write", "c", None, body, None))
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        got = wire.decode_answer(msg.data, None, 0)
        assert (got.id, got.kind, got.type) == (1, wire.ERROR, 413)
        assert b"payload_too_large" in got.body
        await ws.send_bytes(wire.encode_request(1, 2, "search", "c", None, b"x", None))
        got = wire.decode_answer((await ws.receive()).data, None, 1)
        assert (got.id, got.kind, got.type) == (2, wire.ERROR, 404)  # the channel went on
        await ws.close()


# --- a peer that stops answering --------------------------------------------------------------
async def test_a_client_breaks_a_channel_whose_server_stops_answering(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped peer (SIGSTOP) or a half-open connection: every request on the channel timed
    out, for as long as the kernel kept the connection; now the channel breaks (PeerError:
    another replica) and the next request opens a new one."""
    monkeypatch.setattr(channel, "HEARTBEAT_S", 0.2, raising=False)
    stop = asyncio.Event()

    async def stopped(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(wire.encode_hello(bytes(16)))
        await stop.wait()  # reads nothing, answers no ping
        return ws

    async with scripted(stopped) as (addr, peers):
        try:
            with pytest.raises(PeerError, match="channel"):
                await ask(peers, addr, timeout=10.0)
            assert not channels_of(peers)._open or all(
                ch.broken is not None for ch in channels_of(peers)._open.values())
        finally:
            stop.set()


async def test_a_node_closes_a_channel_whose_client_stops_answering(
        start_node: StartNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internal_api, "HEARTBEAT_S", 0.2, raising=False)
    node = await start_node(node_id="n1")
    served = node.client.server.app[internal_api._CHANNELS]
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://{node.config.addr}{CHANNEL_PATH}", autoping=False)
        wire.decode_hello((await ws.receive()).data)
        assert len(served) == 1
        async with asyncio.timeout(10.0):
            while True:  # pings go unanswered
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.PING:
                    break
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR)
        await wait_for(lambda: not served, what="the node to let the channel go")
        await ws.close()


# --- a client that stopped reading ------------------------------------------------------------
@contextlib.asynccontextmanager
async def not_reading(start_node: StartNode, gone_ok: bool = False
                      ) -> AsyncIterator[tuple[Any, set[ServerChannel]]]:
    """A node, and a channel to it from a client that has sent 64 gets of a 1 MiB document
    and reads nothing (stopped): the node's writes to it wait (or, `gone_ok`, the node has
    already let the channel go)."""
    node = await start_node(node_id="n1")
    await node.create("c", 2, shards=1)
    await node.upsert("c", [{"id": "a", "vector": [1.0, 2.0],
                             "metadata": {"x": "y" * ((1 << 20) - 16)}}])
    served = node.client.server.app[internal_api._CHANNELS]
    frame = frames.encode_get(0, "a")
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://{node.config.addr}{CHANNEL_PATH}", autoping=False)
        wire.decode_hello((await ws.receive()).data)
        for i in range(64):
            await ws.send_bytes(wire.encode_request(i, i, "get", "c", None, frame, None))

        def stuck() -> bool:
            if not served:
                return gone_ok
            (ch,) = served
            transport = ch._ws._req.transport if ch._ws._req else None  # type: ignore[attr-defined]
            return transport is not None and transport.get_write_buffer_size() > 1 << 20

        await wait_for(stuck, what="the node's writes to wait for the client")
        try:
            yield node, served
        finally:
            async with asyncio.timeout(30.0):
                await node.client.close()
                await ws.close()


async def test_a_node_stops_while_a_client_has_stopped_reading(start_node: StartNode) -> None:
    """The node's shutdown closed such a channel with a close that waited for the client to
    read what was queued before it: for ever."""
    async with not_reading(start_node) as (node, served):
        async with asyncio.timeout(30.0):
            await node.client.close()
        assert not served


async def test_a_node_lets_go_of_a_stopped_client_after_its_pings(
        start_node: StartNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ping unanswered closed the channel, but gently: its connection stayed for as long as
    its queued answers were not read, and with it the channel and its requests' tasks."""
    monkeypatch.setattr(internal_api, "HEARTBEAT_S", 0.2, raising=False)
    async with not_reading(start_node, gone_ok=True) as (_, served):
        await wait_for(lambda: not served, what="the node to let the channel go")


# --- the server's cap -------------------------------------------------------------------------
async def test_a_client_within_the_cap_is_never_refused_while_answers_drain() -> None:
    """The server counted a request in flight until its answer had left its buffer; the client
    counts it until the answer has arrived. With answers queued behind one another, the client
    had room again (and used it) while the server still counted the answer it had read."""
    big = b"x" * (12 << 20)

    async def serve(op: str, name: str, body: bytes) -> Any:
        return big

    peer = Peer(serve, max_in_flight=2)
    async with running(peer) as peers:
        channels_of(peers)._max_in_flight = 2
        for _ in range(5):
            got = await asyncio.gather(*(ask(peers, peer.addr, b"%d" % i, timeout=60.0)
                                         for i in range(6)), return_exceptions=True)
            assert all(g == big for g in got), [g for g in got if g != big]


# --- a client that stops ----------------------------------------------------------------------
async def test_a_request_waiting_for_a_channel_fails_as_the_client_stops() -> None:
    """Closing the client cancels the channels being opened; a request waiting for one (not
    itself cancelled) got CancelledError, which its caller takes for its own cancellation."""
    stop = asyncio.Event()
    upgrading = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        upgrading.set()
        await stop.wait()
        return web.Response(status=503)

    async with scripted(slow) as (addr, peers):
        try:
            task = asyncio.create_task(ask(peers, addr))
            await upgrading.wait()
            await peers.close()
            with pytest.raises(PeerError):
                await task
        finally:
            stop.set()


async def test_an_error_past_the_requests_bound_is_refused_as_an_answer_is() -> None:
    """Over HTTP an error's body is read within the request's bound too; on the channel it
    was taken whole (up to the channel's cap), its message into the error raised and logged."""
    async def serve(op: str, name: str, body: bytes) -> Any:
        raise BadRequest("x" * 2000 + "\nforged log line")

    peer = Peer(serve)
    async with running(peer) as peers:
        with pytest.raises(PeerError, match="more than 1000 bytes"):
            await ask(peers, peer.addr, max_answer=1000)
        with pytest.raises(BadRequest, match="forged"):  # within the bound: as before
            await ask(peers, peer.addr)


async def test_a_frame_asked_again_over_http_gets_what_is_left_of_its_time() -> None:
    """An answer too large for the channel is asked again over HTTP: with the caller's whole
    timeout once more, a request could take twice the time its caller gave it."""
    big = b"a" * (getattr(channel, "MAX_CHANNEL_ANSWER", 16 << 20) + 1)

    async def serve(op: str, name: str, body: bytes) -> Any:
        return big

    peer = Peer(serve)
    async with running(peer) as peers:
        given: list[float] = []
        lean = peers._lean_request

        async def spy(addr: str, url: Any, method: str, headers: dict[str, str], data: bytes,
                      timeout: float, max_answer: int | None) -> Any:  # noqa: ASYNC109
            given.append(timeout)
            return await lean(addr, url, method, headers, data, timeout, max_answer)

        peers._lean_request = spy  # type: ignore[method-assign]
        assert await ask(peers, peer.addr, timeout=60.0) == big
        assert len(given) == 1 and given[0] < 60.0
