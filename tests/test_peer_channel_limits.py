"""What the peer channel (cluster/peers/channel.py) lets others hold on a node, and what a
node holds for peers it no longer talks to: a node serves a bounded number of channels (in all
and per sender), refusing an upgrade past it with 503, which a client answers by sending that
frame over HTTP; a client closes a channel it has not used for IDLE_S; a request that finds
no room on a channel whose peer stopped answering fails at once (PeerError: another
replica) instead of waiting its whole time."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aquila.cluster.model.errors import NotFound
from aquila.cluster.peers import channel, wire
from aquila.cluster.peers.auth import PeerSigner
from aquila.cluster.peers.channel import CHANNEL_PATH
from aquila.cluster.peers.client import FRAME_TYPE, PeerError, collection_path
from aquila.cluster.peers.http import Peers
from tests.conftest import StartNode, wait_for
from tests.test_peer_protocol_channel import (
    ME,
    RELEASE,
    SECRET,
    Peer,
    channels_of,
    echo,
    running,
    scripted,
)
from tests.test_peer_protocol_channel import ask as ask_peer


async def _open(s: aiohttp.ClientSession, addr: str, headers: dict[str, str] | None = None
                ) -> aiohttp.ClientWebSocketResponse:
    ws = await s.ws_connect(f"http://{addr}{CHANNEL_PATH}", headers=headers)
    wire.decode_hello((await ws.receive()).data)
    return ws


async def _refused(s: aiohttp.ClientSession, addr: str,
                   headers: dict[str, str] | None = None) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as got:
        await s.ws_connect(f"http://{addr}{CHANNEL_PATH}", headers=headers)
    return got.value.status


# --- how many channels a node serves ----------------------------------------------------------
async def test_a_node_refuses_channels_past_its_cap_before_accepting_them(
        start_node: StartNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone on an open node (or any holder of the secret) could open upgrades without end,
    each holding up to MAX_IN_FLIGHT tasks."""
    monkeypatch.setattr(channel, "MAX_CHANNELS", 2, raising=False)
    node = await start_node(node_id="n1")
    addr = node.config.addr
    async with aiohttp.ClientSession() as s:
        held = [await _open(s, addr), await _open(s, addr)]
        assert await _refused(s, addr) == 503
        await held.pop().close()  # its place is given back once the node sees it end

        async def reopened() -> aiohttp.ClientWebSocketResponse | None:
            try:
                return await _open(s, addr)
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503
                return None

        held.append(await wait_for(reopened, what="a channel to be accepted again"))
        assert await _refused(s, addr) == 503
        for ws in held:
            await ws.close()


async def test_a_node_caps_the_channels_of_one_sender(start_node: StartNode,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "MAX_CHANNELS", 4, raising=False)
    monkeypatch.setattr(channel, "MAX_CHANNELS_PER_SENDER", 2, raising=False)
    node = await start_node(node_id="n1", cluster_secret=SECRET)
    addr = node.config.addr

    def signed(sender: str) -> dict[str, str]:
        return PeerSigner(SECRET, sender).headers("GET", CHANNEL_PATH, b"", "n1")

    async with aiohttp.ClientSession() as s:
        held = [await _open(s, addr, signed("a")), await _open(s, addr, signed("a"))]
        assert await _refused(s, addr, signed("a")) == 503
        held.append(await _open(s, addr, signed("b")))  # another sender is not held back
        for ws in held:
            await ws.close()


async def test_a_client_refused_a_channel_sends_the_frame_over_http(
        start_node: StartNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 on the upgrade failed the request (PeerError); now that frame, and the next ones
    for a while, go over HTTP."""
    monkeypatch.setattr(channel, "MAX_CHANNELS", 1, raising=False)
    node = await start_node(node_id="n1")
    addr = node.config.addr
    peers = Peers(None, 5.0, sender="n0")
    await peers.start()
    try:
        async with aiohttp.ClientSession() as s:
            ws = await _open(s, addr)  # the node's only channel
            for _ in range(2):
                with pytest.raises(NotFound):  # the node's answer, over HTTP
                    await peers.request(addr, "POST", collection_path("nope", "search"), None,
                                        to="n1", raw=b"q")
            assert not channels_of(peers)._open and addr in channels_of(peers)._without
            await ws.close()
    finally:
        await peers.close()


async def test_a_client_answered_503_on_the_upgrade_uses_http_for_a_while() -> None:
    upgrades: list[int] = []

    async def busy(request: web.Request) -> web.StreamResponse:
        upgrades.append(1)
        return web.json_response({"error": {"code": "unavailable", "message": "busy"}},
                                 status=503)

    async def frame(request: web.Request) -> web.Response:
        return web.Response(body=b"over http:" + await request.read(), content_type=FRAME_TYPE)

    async with scripted(busy, frame) as (addr, peers):

        async def ask(body: bytes) -> Any:
            return await peers.request(addr, "POST", collection_path("c", "search"), None,
                                       to=ME, raw=body)

        assert await ask(b"a") == b"over http:a"
        assert await ask(b"b") == b"over http:b"
        assert upgrades == [1]  # remembered: not asked again at once
        channels_of(peers)._without[addr] = 0.0  # BUSY_S later
        assert await ask(b"c") == b"over http:c"
        assert upgrades == [1, 1]


# --- channels to nodes this one no longer asks -------------------------------------------------
async def test_a_client_closes_the_channels_it_has_not_used_for_a_while() -> None:
    """A channel to a node that left the cluster (or that this one stopped asking) stayed open
    for ever, both ends pinging it."""
    gone, kept = Peer(echo), Peer(echo)
    async with running(gone) as peers:
        await kept.server.start_server()
        try:
            await _idle_one_of_two(peers, gone, kept)
        finally:
            await peers.close()
            await kept.server.close()


async def _idle_one_of_two(peers: Peers, gone: Peer, kept: Peer) -> None:
    chs = channels_of(peers)
    now = [1000.0]
    chs._monotonic = lambda: now[0]
    assert await ask_peer(peers, gone, b"a") == b"search:c:a:-"
    assert await ask_peer(peers, kept, b"b") == b"search:c:b:-"
    now[0] += channel.IDLE_S * 2 / 3
    assert await ask_peer(peers, kept, b"c") == b"search:c:c:-"
    await chs.close_idle()
    assert len(chs._open) == 2  # neither idle for IDLE_S yet
    now[0] += channel.IDLE_S * 2 / 3
    await chs.close_idle()
    assert [key[0] for key in chs._open] == [kept.addr]
    await wait_for(lambda: all(t.is_closing() for t in gone.transports),
                   what="the peer to see its channel closed")
    assert not any(t.is_closing() for t in kept.transports)
    # Asked again, it is given a new one.
    assert await ask_peer(peers, gone, b"d") == b"search:c:d:-"
    assert (gone.upgrades, kept.upgrades) == (2, 1)


async def test_idle_channels_are_closed_without_being_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "IDLE_S", 0.2, raising=False)
    peer = Peer(echo)
    async with running(peer) as peers:
        assert await ask_peer(peers, peer, b"a") == b"search:c:a:-"
        await wait_for(lambda: not channels_of(peers)._open, what="the idle channel closed")
        await wait_for(lambda: all(t.is_closing() for t in peer.transports),
                       what="the peer to see it closed")
        assert await ask_peer(peers, peer, b"b") == b"search:c:b:-"
        assert peer.upgrades == 2


# --- a peer whose handler hangs ---------------------------------------------------------------
async def test_a_request_finding_no_room_on_a_stuck_peer_fails_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its slots full of abandoned requests, every later request to that peer waited for room
    until its own timeout; now it fails with PeerError, which the fan-out retries elsewhere."""
    monkeypatch.setattr(channel, "SLOT_WAIT_S", 0.2, raising=False)
    peer = Peer(echo)
    async with running(peer) as peers:
        channels_of(peers)._max_in_flight = 4
        assert await ask_peer(peers, peer, b"a") == b"search:c:a:-"  # the channel is open
        for _ in range(4):  # the handler hangs: each times out, its slot held till answered
            with pytest.raises(PeerError, match="TimeoutError"):
                await ask_peer(peers, peer, b"slow", timeout=0.05)
        ch = next(iter(channels_of(peers)._open.values()))
        assert ch.in_flight == 4
        for _ in range(2):
            with pytest.raises(PeerError, match="none answered"):
                await ask_peer(peers, peer, b"x", timeout=30.0)
        RELEASE[0].set()  # the peer recovers: its answers give the room back
        await wait_for(lambda: ch.in_flight == 0, what="the late answers")
        assert await ask_peer(peers, peer, b"y") == b"search:c:y:-"
        assert peer.upgrades == 1


async def test_a_burst_past_the_cap_waits_while_the_peer_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer slower than SLOT_WAIT_S in all, answering one request at a time: every request
    of a burst past the channel's cap is answered (the wait is bounded by the peer's silence,
    not by how long the burst takes)."""
    monkeypatch.setattr(channel, "SLOT_WAIT_S", 1.0, raising=False)
    served: list[asyncio.Event] = []

    async def serve(op: str, name: str, body: bytes) -> Any:
        gate = asyncio.Event()
        served.append(gate)
        await gate.wait()
        return body

    peer = Peer(serve)
    async with running(peer) as peers:
        channels_of(peers)._max_in_flight = 2
        n = 30
        tasks = [asyncio.create_task(ask_peer(peers, peer, b"%d" % i, timeout=60.0))
                 for i in range(n)]
        for i in range(n):  # one answer every 50 ms: 1.5 s in all
            await wait_for(lambda i=i: len(served) > i, what=f"request {i} served")
            await asyncio.sleep(0.05)
            served[i].set()
        assert await asyncio.gather(*tasks) == [b"%d" % i for i in range(n)]
