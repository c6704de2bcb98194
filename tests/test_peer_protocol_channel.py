"""The peer channel (cluster/peers/channel.py, wire.py): its messages round-trip and every
truncation, other version, altered byte or replayed sequence number is a typed WireError;
over real sockets, frames to a node travel one channel with the answers and errors HTTP gives,
a cancelled request leaves the channel up, a killed peer fails the requests in flight with
PeerError and the next request reconnects, a node without the route is served over HTTP, and
what one channel carries is bounded (message size, requests in flight)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aquila.cluster.model import request_id
from aquila.cluster.model.errors import BadRequest, NotFound, Unauthorized, Unavailable
from aquila.cluster.peers import channel, wire
from aquila.cluster.peers.auth import SIGNATURE_HEADER, PeerAuthError, PeerSigner, PeerVerifier
from aquila.cluster.peers.channel import (
    CHANNEL_PATH,
    MAX_CHANNEL_FRAME,
    Channels,
    ServerChannel,
)
from aquila.cluster.peers.client import FRAME_TYPE, PeerError, collection_path
from aquila.cluster.peers.http import Peers
from aquila.cluster.replication import frames
from tests.conftest import StartNode, wait_for

PROPS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))
KEY = bytes(range(32))
OTHER = bytes(range(1, 33))

names = st.text("abcXYZ09_-", min_size=1, max_size=64)
rids = st.none() | st.text("abc09._-", min_size=1, max_size=64)
bodies = st.binary(max_size=200)
keys = st.none() | st.just(KEY)
seqs = st.integers(0, wire.MAX_SEQ)
req_ids = st.integers(0, wire.MAX_ID)


# --- the messages -------------------------------------------------------------------------------
@PROPS
@given(seqs, req_ids, st.sampled_from(wire.OPS), names, rids, bodies, keys)
def test_request_round_trips(seq: int, id_: int, op: str, name: str, rid: str | None,
                             body: bytes, key: bytes | None) -> None:
    msg = wire.encode_request(seq, id_, op, name, rid, body, key)
    assert wire.decode_request(msg, key, seq) == wire.Request(id_, op, name, rid, body)


@PROPS
@given(seqs, req_ids, st.sampled_from([wire.FRAME, wire.JSON]), st.integers(400, 599), bodies,
       keys)
def test_answers_round_trip(seq: int, id_: int, type_: int, status: int, body: bytes,
                            key: bytes | None) -> None:
    ok = wire.encode_answer(seq, id_, type_, body, key)
    assert wire.decode_answer(ok, key, seq) == wire.Answer(id_, wire.ANSWER, type_, body)
    err = wire.encode_error(seq, id_, status, body, key)
    assert wire.decode_answer(err, key, seq) == wire.Answer(id_, wire.ERROR, status, body)


def _messages(seq: int, name: str, body: bytes, key: bytes | None) -> list[tuple[bytes, bool]]:
    """(message, is a request)."""
    return [(wire.encode_request(seq, 7, "search", name, "rid-1", body, key), True),
            (wire.encode_answer(seq, 7, wire.FRAME, body, key), False),
            (wire.encode_error(seq, 7, 404, body, key), False)]


def _decode(msg: bytes, is_request: bool, key: bytes | None, seq: int) -> object:
    return (wire.decode_request if is_request else wire.decode_answer)(msg, key, seq)


@PROPS
@given(seqs, names, bodies)
def test_every_truncation_of_a_sealed_message_is_refused(seq: int, name: str,
                                                         body: bytes) -> None:
    for msg, is_request in _messages(seq, name, body, KEY):
        for end in range(len(msg)):
            with pytest.raises(wire.WireError):
                _decode(msg[:end], is_request, KEY, seq)


@PROPS
@given(seqs, names, bodies)
def test_truncated_heads_of_open_messages_are_refused(seq: int, name: str, body: bytes) -> None:
    # Without a secret a message's body ends where the WebSocket message does (the frames
    # inside check their own lengths); what comes before it is checked here.
    for msg, is_request in _messages(seq, name, body, None):
        fields = len(msg) - len(body)
        for end in range(fields):
            with pytest.raises(wire.Truncated):
                _decode(msg[:end], is_request, None, seq)


@PROPS
@given(seqs, names, bodies, keys, st.integers(0, 255).filter(lambda v: v != wire.VERSION))
def test_another_version_is_refused(seq: int, name: str, body: bytes, key: bytes | None,
                                    version: int) -> None:
    for msg, is_request in _messages(seq, name, body, key):
        with pytest.raises(wire.BadVersion):
            _decode(bytes([version]) + msg[1:], is_request, key, seq)
    with pytest.raises(wire.BadVersion):
        wire.decode_hello(bytes([version]) + wire.encode_hello(bytes(16))[1:])


@PROPS
@given(seqs, names, bodies, st.data())
def test_any_altered_bit_fails_the_mac(seq: int, name: str, body: bytes, data: st.DataObject
                                       ) -> None:
    for msg, is_request in _messages(seq, name, body, KEY):
        at = data.draw(st.integers(1, len(msg) - 1))
        bit = data.draw(st.integers(0, 7))
        bad = bytearray(msg)
        bad[at] ^= 1 << bit
        with pytest.raises(wire.BadMac):
            _decode(bytes(bad), is_request, KEY, seq)
        with pytest.raises(wire.BadMac):  # another channel's (or direction's) key
            _decode(msg, is_request, OTHER, seq)
        with pytest.raises(wire.BadMac):  # sealed without the secret
            _decode(wire.encode_answer(seq, 7, wire.FRAME, body, None) + bytes(32), False,
                    KEY, seq)


@PROPS
@given(st.integers(0, wire.MAX_SEQ - 1), names, bodies, keys, st.data())
def test_a_replayed_or_reordered_message_is_refused(seq: int, name: str, body: bytes,
                                                    key: bytes | None, data: st.DataObject
                                                    ) -> None:
    want = data.draw(seqs.filter(lambda s: s != seq))
    for msg, is_request in _messages(seq, name, body, key):
        with pytest.raises(wire.BadSequence):
            _decode(msg, is_request, key, want)


def test_fields_a_node_does_not_take_refuse_that_request_only() -> None:
    msg = bytearray(wire.encode_request(0, 9, "get", "c", None, b"", KEY)[:-32])
    msg[wire.HEAD_SIZE] = len(wire.OPS)  # an operation this node does not know
    with pytest.raises(wire.BadField) as got:
        wire.decode_request(bytes(msg) + _mac(bytes(msg)), KEY, 0)
    assert got.value.id == 9
    for name in ("a/b", "é", "a b"):
        bad = wire.encode_request(0, 3, "get", "c" * len(name.encode()), None, b"", None)
        bad = bad.replace(b"c" * len(name.encode()), name.encode(), 1)
        with pytest.raises(wire.BadField):
            wire.decode_request(bad, None, 0)
    assert not wire.sendable_name("a/b") and not wire.sendable_name("") and wire.sendable_name(
        "a_B-9")


def _mac(msg: bytes) -> bytes:
    import hmac
    return hmac.digest(KEY, msg, "sha256")


def test_channel_keys_differ_by_handshake_nonce_and_direction() -> None:
    a = wire.channel_keys("s", "ab" * 32, bytes(16))
    b = wire.channel_keys("s", "ab" * 32, bytes(15) + b"\1")
    c = wire.channel_keys("s", "cd" * 32, bytes(16))
    assert a is not None and b is not None and c is not None
    assert len({a[0], a[1], b[0], b[1], c[0], c[1]}) == 6
    assert wire.channel_keys(None, "ab" * 32, bytes(16)) is None


# --- over sockets, against a scripted peer ------------------------------------------------------
SECRET = "s3cret"
ME = "peer"

Serve = Callable[[str, str, bytes], Awaitable[Any]]


class Peer:
    """A scripted node: the channel route (as node/http/internal_api.py serves it) and, unless
    `channel=False` (an older node), the HTTP frame routes, both answering with `serve`."""

    def __init__(self, serve: Serve, *, channel: bool = True, secret: str | None = SECRET,
                 max_msg: int = 1 << 20, max_in_flight: int = 256) -> None:
        self.serve = serve
        self.verifier = PeerVerifier(secret)
        self.upgrades = 0
        self.http_frames = 0
        self.transports: list[asyncio.Transport] = []
        self.max_msg = max_msg
        self.max_in_flight = max_in_flight
        app = web.Application(client_max_size=4 << 20)
        if channel:
            app.router.add_get(CHANNEL_PATH, self._channel)
        app.router.add_post("/internal/v1/collections/{name}/{op}", self._frame)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def _channel(self, request: web.Request) -> web.StreamResponse:
        self.upgrades += 1
        try:
            self.verifier.check_headers("GET", request.raw_path, request.headers, ME)
        except PeerAuthError as exc:
            return web.json_response({"error": {"code": "unauthorized", "message": str(exc)}},
                                     status=401)
        ws = web.WebSocketResponse(compress=False, max_msg_size=self.max_msg)
        writer = await ws.prepare(request)
        assert request.transport is not None
        self.transports.append(request.transport)  # type: ignore[arg-type]
        await ServerChannel(ws, self.verifier.secret, request.headers.get(SIGNATURE_HEADER, ""),
                            self.serve, lambda *_: None, self.max_in_flight, request.transport,
                            writer).run()
        return ws

    async def _frame(self, request: web.Request) -> web.Response:
        self.http_frames += 1
        out = await self.serve(request.match_info["op"], request.match_info["name"],
                               await request.read())
        return web.Response(body=out, content_type=FRAME_TYPE)

    def kill(self) -> None:
        for t in self.transports:
            t.abort()
        self.transports.clear()


# What the slow requests of `echo` wait for: set as a test ends (the server lets requests in
# flight finish before it stops, as aiohttp does with its handlers).
RELEASE = [asyncio.Event()]


@contextlib.asynccontextmanager
async def running(peer: Peer, secret: str | None = SECRET, **kw: Any
                  ) -> AsyncIterator[Peers]:
    await peer.server.start_server()
    peers = Peers(secret, 5.0, sender="coordinator", **kw)
    await peers.start()
    RELEASE[0] = asyncio.Event()
    try:
        yield peers
    finally:
        RELEASE[0].set()
        await peers.close()
        await peer.server.close()


async def ask(peers: Peers, peer: Peer, body: bytes = b"q", op: str = "search",
              name: str = "c", timeout: float | None = None,  # noqa: ASYNC109
              max_answer: int | None = None) -> Any:
    return await peers.request(peer.addr, "POST", collection_path(name, op), None, to=ME,
                               raw=body, timeout=timeout, max_answer=max_answer)


def channels_of(peers: Peers) -> Channels:
    ch = peers._channels
    assert ch is not None
    return ch


@contextlib.asynccontextmanager
async def scripted(handler: Any, frame: Any = None) -> AsyncIterator[tuple[str, Peers]]:
    """A server whose channel route is `handler` (and whose peer routes over HTTP are `frame`,
    if given), and a client without a secret."""
    app = web.Application()
    app.router.add_get(CHANNEL_PATH, handler)
    if frame is not None:
        app.router.add_post("/internal/v1/collections/{name}/{op}", frame)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    peers = Peers(None, 5.0, sender="coordinator")
    await peers.start()
    try:
        yield f"127.0.0.1:{server.port}", peers
    finally:
        await peers.close()
        await server.close()


async def echo(op: str, name: str, body: bytes) -> Any:
    if op == "write":
        return {"op": op, "name": name, "n": len(body)}
    if body == b"missing":
        raise NotFound(f"collection {name!r} does not exist")
    if body == b"bad":
        raise ValueError("not a frame")
    if body == b"bug":
        raise RuntimeError("a bug")
    if body == b"slow":
        await RELEASE[0].wait()
    return op.encode() + b":" + name.encode() + b":" + body + b":" + (
        request_id.current.get() or "-").encode()


async def test_many_requests_share_one_channel_and_answer_in_any_order() -> None:
    gates = {i: asyncio.Event() for i in range(20)}

    async def serve(op: str, name: str, body: bytes) -> Any:
        await gates[int(body)].wait()
        return body

    peer = Peer(serve)
    async with running(peer) as peers:
        tasks = [asyncio.create_task(ask(peers, peer, str(i).encode())) for i in range(20)]
        await wait_for(lambda: peer.upgrades == 1 and not channels_of(peers)._opening,
                       what="the channel")
        for i in reversed(range(20)):  # answered last first
            gates[i].set()
        assert await asyncio.gather(*tasks) == [str(i).encode() for i in range(20)]
        assert peer.upgrades == 1 and peer.http_frames == 0


@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "open"])
async def test_answers_errors_and_request_ids_as_over_http(secret: str | None) -> None:
    peer = Peer(echo, secret=secret)
    async with running(peer, secret) as peers:
        token = request_id.current.set("trace-1")
        try:
            assert await ask(peers, peer, b"x") == b"search:c:x:trace-1"
        finally:
            request_id.current.reset(token)
        assert await ask(peers, peer, b"x", op="get") == b"get:c:x:-"
        assert await ask(peers, peer, b"abc", op="write") == {"op": "write", "name": "c",
                                                               "n": 3}
        with pytest.raises(NotFound, match="does not exist"):
            await ask(peers, peer, b"missing")
        with pytest.raises(BadRequest, match="malformed peer request"):
            await ask(peers, peer, b"bad")
        with pytest.raises(PeerError, match="internal error"):  # a 500: another replica
            await ask(peers, peer, b"bug")
        with pytest.raises(PeerError, match="more than 3 bytes"):
            await ask(peers, peer, b"long", max_answer=3)
        assert await ask(peers, peer, b"y") == b"search:c:y:-"  # the channel went on
        assert peer.upgrades == 1 and peer.http_frames == 0


async def test_a_cancelled_or_timed_out_request_leaves_the_channel_up() -> None:
    peer = Peer(echo)
    async with running(peer) as peers:
        assert await ask(peers, peer, b"a") == b"search:c:a:-"
        slow = asyncio.create_task(ask(peers, peer, b"slow"))
        await asyncio.sleep(0.05)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        with pytest.raises(PeerError, match="TimeoutError"):
            await ask(peers, peer, b"slow", timeout=0.05)
        assert await ask(peers, peer, b"b") == b"search:c:b:-"
        assert peer.upgrades == 1


async def test_a_killed_peer_fails_requests_in_flight_and_the_next_reconnects() -> None:
    peer = Peer(echo)
    async with running(peer) as peers:
        assert await ask(peers, peer, b"a") == b"search:c:a:-"
        slow = [asyncio.create_task(ask(peers, peer, b"slow")) for _ in range(3)]
        await wait_for(lambda: channels_of(peers)._open and next(
            iter(channels_of(peers)._open.values())).in_flight == 3, what="in flight")
        peer.kill()
        for t in slow:
            with pytest.raises(PeerError, match="channel"):
                await t
        assert await ask(peers, peer, b"b") == b"search:c:b:-"
        assert peer.upgrades == 2


async def test_a_node_without_the_route_is_served_over_http_and_remembered() -> None:
    peer = Peer(echo, channel=False)
    async with running(peer) as peers:
        for body in (b"a", b"b", b"c"):
            assert await ask(peers, peer, body) == b"search:c:" + body + b":-"
        assert peer.http_frames == 3
        assert peer.addr in channels_of(peers)._without  # asked once, remembered


async def test_a_wrong_secret_is_refused_at_the_handshake_and_a_wrong_key_after_it() -> None:
    peer = Peer(echo)
    async with running(peer, "another") as peers:
        with pytest.raises(Unauthorized, match="channel refused"):
            await ask(peers, peer, b"a")
    peer = Peer(echo)
    async with running(peer) as peers:
        # A signed handshake, then messages sealed under keys of another secret.
        channels_of(peers)._secret = "another"
        with pytest.raises(PeerError, match="channel"):
            await ask(peers, peer, b"a")


async def test_a_replayed_handshake_is_refused() -> None:
    peer = Peer(echo)
    await peer.server.start_server()
    try:
        headers = PeerSigner(SECRET, "x").headers("GET", CHANNEL_PATH, b"", ME)
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"http://{peer.addr}{CHANNEL_PATH}", headers=headers)
            await ws.close()
            with pytest.raises(aiohttp.WSServerHandshakeError) as got:
                await s.ws_connect(f"http://{peer.addr}{CHANNEL_PATH}", headers=headers)
            assert got.value.status == 401
            other = PeerSigner(SECRET, "x").headers("GET", CHANNEL_PATH, b"", "someone-else")
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await s.ws_connect(f"http://{peer.addr}{CHANNEL_PATH}", headers=other)
    finally:
        await peer.server.close()


async def test_an_oversized_message_breaks_the_channel_and_the_next_reopens() -> None:
    peer = Peer(echo, max_msg=1000)
    async with running(peer) as peers:
        with pytest.raises(PeerError, match="channel"):
            await ask(peers, peer, b"x" * 2000)
        assert await ask(peers, peer, b"ok") == b"search:c:ok:-"
        assert peer.upgrades == 2


async def test_a_frame_past_the_channels_share_goes_over_http() -> None:
    peer = Peer(echo)
    async with running(peer) as peers:
        big = b"w" * (MAX_CHANNEL_FRAME + 1)
        assert await ask(peers, peer, big) == b"search:c:" + big + b":-"
        assert (peer.upgrades, peer.http_frames) == (0, 1)
        assert await ask(peers, peer, b"small") == b"search:c:small:-"
        assert (peer.upgrades, peer.http_frames) == (1, 1)


async def test_requests_beyond_the_cap_wait_for_room(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not for as long as the peer answers nothing (test_peer_channel_limits.py): here, however
    # long the machine takes to get the four in flight.
    monkeypatch.setattr(channel, "SLOT_WAIT_S", 60.0)
    running_now = 0
    most = 0
    gate = asyncio.Event()

    async def serve(op: str, name: str, body: bytes) -> Any:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        await gate.wait()
        running_now -= 1
        return body

    peer = Peer(serve)
    async with running(peer) as peers:
        channels_of(peers)._max_in_flight = 4
        tasks = [asyncio.create_task(ask(peers, peer, b"%d" % i)) for i in range(10)]
        await wait_for(lambda: running_now == 4, what="4 in flight")
        await asyncio.sleep(0.05)
        assert running_now == 4  # the others wait on this side
        gate.set()
        assert await asyncio.gather(*tasks) == [b"%d" % i for i in range(10)]
        assert most == 4


async def test_a_client_past_the_servers_cap_is_refused_per_request() -> None:
    gate = asyncio.Event()

    async def serve(op: str, name: str, body: bytes) -> Any:
        await gate.wait()
        return body

    peer = Peer(serve, max_in_flight=2)
    async with running(peer) as peers:
        tasks = [asyncio.create_task(ask(peers, peer, b"%d" % i)) for i in range(3)]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        with pytest.raises(Unavailable, match="in flight"):
            await done.pop()
        gate.set()
        got = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(g, bytes) for g in got) == 2


# --- a real node ----------------------------------------------------------------------------
async def test_frames_to_a_node_travel_its_channel(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = await start_node(node_id="n1", cluster_secret=SECRET)
    await node.create("c", 2, shards=2)
    await node.upsert("c", [{"id": "a", "vector": [1.0, 2.0], "metadata": {"x": 1}}])
    addr = node.config.addr
    q = np.array([[1.0, 2.0]], dtype="<f4")
    flags = frames.WITH_METADATA
    frame = frames.encode_search(q, 3, None, [0, 1], None, flags)
    bound = frames.hits_answer_bound(1, 3, flags, 2, 1 << 20)
    answers = []
    caplog.set_level(logging.DEBUG, logger="aquila.node.http.access")
    for enabled in (True, False):
        peers = Peers(SECRET, 5.0, sender="n0")
        await peers.start()
        try:
            channels_of(peers).enabled = enabled
            raw = await peers.request(addr, "POST", collection_path("c", "search"), None,
                                      to="n1", raw=frame, max_answer=bound)
            answers.append(frames.decode_hits(raw, 1, 3, flags, 2, [0, 1]).rows)
            with pytest.raises(NotFound):
                await peers.request(addr, "POST", collection_path("nope", "search"), None,
                                    to="n1", raw=frame, max_answer=bound)
            with pytest.raises(Unauthorized):  # addressed to another node
                await peers.request(addr, "POST", collection_path("c", "search"), None,
                                    to="n2", raw=frame, max_answer=bound)
            assert bool(channels_of(peers)._open) == enabled
        finally:
            await peers.close()
    assert answers[0] == answers[1] and answers[0][0][0].id == "a"
    # Each served frame has its access line, over the channel as over HTTP (debug: no
    # client request behind these).
    route = "/internal/v1/collections/{name}/search"
    lines = [(r.levelno, r.getMessage().split(" ")[:3], r.method, r.route, r.status,  # type: ignore[attr-defined]
              r.event) for r in caplog.records  # type: ignore[attr-defined]
             if r.name == "aquila.node.http.access" and r.route == route]  # type: ignore[attr-defined]
    line = (logging.DEBUG, ["CHANNEL", route, "200"], "POST", route, 200, "request")
    assert line in lines and lines.count(line) == 1, lines
    assert (logging.DEBUG, ["CHANNEL", route, "404"], "POST", route, 404, "request") in lines
    # An upgrade without a signature is refused before anything else; a signed one addressed
    # to whoever answers (as a push-pull to a seed may be) too.
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as got:
            await s.ws_connect(f"http://{addr}{CHANNEL_PATH}")
        assert got.value.status == 401
        anyone = PeerSigner(SECRET, "n0").headers("GET", CHANNEL_PATH, b"", None)
        with pytest.raises(aiohttp.WSServerHandshakeError) as got:
            await s.ws_connect(f"http://{addr}{CHANNEL_PATH}", headers=anyone)
        assert got.value.status == 401
        ok = PeerSigner(SECRET, "n0").headers("GET", CHANNEL_PATH, b"", "n1")
        ws = await s.ws_connect(f"http://{addr}{CHANNEL_PATH}", headers=ok)
        wire.decode_hello((await ws.receive()).data)
        await ws.close()


async def test_a_server_refuses_a_bad_field_per_request_and_a_bad_message_by_closing() -> None:
    peer = Peer(echo, secret=None)
    await peer.server.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"http://{peer.addr}{CHANNEL_PATH}")
            wire.decode_hello((await ws.receive()).data)
            # An operation this node does not know: that request is refused, a 400.
            msg = bytearray(wire.encode_request(0, 5, "get", "c", None, b"x", None))
            msg[wire.HEAD_SIZE] = 200
            await ws.send_bytes(bytes(msg))
            got = wire.decode_answer((await ws.receive()).data, None, 0)
            assert (got.id, got.kind, got.type) == (5, wire.ERROR, 400)
            await ws.send_bytes(wire.encode_request(1, 6, "get", "c", None, b"x", None))
            got = wire.decode_answer((await ws.receive()).data, None, 1)
            assert (got.id, got.kind, got.body) == (6, wire.ANSWER, b"get:c:x:-")
            # Another version (or a replayed sequence number): the channel is closed.
            await ws.send_bytes(b"\x02" + wire.encode_request(2, 7, "get", "c", None, b"",
                                                              None)[1:])
            closing = await ws.receive()
            assert closing.type == aiohttp.WSMsgType.CLOSE
            assert closing.data == aiohttp.WSCloseCode.PROTOCOL_ERROR
            await ws.close()
    finally:
        await peer.server.close()


async def test_a_client_breaks_a_channel_whose_answers_do_not_decode() -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(wire.encode_hello(bytes(16)))
        await ws.receive()
        await ws.send_bytes(b"\x09not an answer")
        await ws.receive()
        return ws

    async with scripted(garbage) as (addr, peers):
        with pytest.raises(PeerError, match="channel version 9"):
            await peers.request(addr, "POST", collection_path("c", "get"), None, to=ME,
                                raw=b"x")
