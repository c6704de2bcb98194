"""Peer-to-peer routes (`/internal/v1/...`): gossip push-pull, state pushes, and the shard
operations a coordinator sends to replicas. With a cluster secret (or an API key, which then
serves as one) every request must carry a valid, fresh, unreplayed signature
(`cluster.peers.auth`); anything else is refused with 401 before its body is read."""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from aquila.cluster.clock import Clock
from aquila.cluster.membership.gossip import GossipError
from aquila.cluster.membership.messages import AuthError, DecodeError
from aquila.cluster.model import request_id
from aquila.cluster.model.errors import BadRequest, PayloadTooLarge, Unauthorized, Unavailable
from aquila.cluster.peers.auth import (
    ANY_RECIPIENT,
    RECIPIENT_HEADER,
    SIGNATURE_HEADER,
    PeerAuthError,
    PeerVerifier,
)
from aquila.cluster.peers.channel import (
    CHANNEL_PATH,
    HEARTBEAT_S,
    MAX_CHANNEL_FRAME,
    MAX_IN_FLIGHT,
    Admission,
    ServerChannel,
)
from aquila.cluster.peers.client import FRAME_TYPE
from aquila.cluster.peers.wire import OVERHEAD
from aquila.cluster.replication.remote import COLLECTION_OPS
from aquila.node.http.answer import body_response
from aquila.node.http.api import json_response
from aquila.node.http.observe import access_line
from aquila.node.keys import CLUSTER, CONFIG, SERVICE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

access_log = logging.getLogger("aquila.node.http.access")
# The channels this node serves, closed when it shuts down (else the server would wait for
# them to end).
_CHANNELS: web.AppKey[set[ServerChannel]] = web.AppKey("peer_channels")
# How many it serves (capped: an upgrade past the cap is refused with 503, before it is
# accepted).
_ADMISSION: web.AppKey[Admission] = web.AppKey("peer_channel_admission")


async def _authenticate(request: web.Request, verifier: PeerVerifier) -> str | None:
    """Check the signature from the request line and headers alone, then read the body (at
    most the size limit: aiohttp's client_max_size) and check it is the one signed. The
    sender's node id it vouches for; None without a secret."""
    try:
        signed = verifier.check_headers(request.method, request.raw_path, request.headers,
                                        request.app[CLUSTER].node_id)
        if signed is not None:
            verifier.check_body(signed, await request.read())
    except PeerAuthError as exc:
        raise Unauthorized(f"peer request refused: {exc}") from None
    return None if signed is None else signed.sender


async def _authed_body(request: web.Request) -> bytes:
    """The body `_peer_route` authenticated (aiohttp keeps it once read)."""
    return await request.read()


def _json(body: bytes) -> object:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


async def _request_object(request: web.Request) -> dict[str, Any]:
    body = _json(await _authed_body(request))
    if not isinstance(body, dict):
        raise BadRequest("a peer request body is a JSON object")
    return body


def _peer_route(handler: Handler, verifier: PeerVerifier) -> Handler:
    """Every peer route is authenticated first. A peer request missing a field or carrying
    one of the wrong type is a 400, not a 500: the sender is another node, but it may be
    another version (or not a node)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        await _authenticate(request, verifier)
        try:
            return await handler(request)
        except (KeyError, ValueError, TypeError, binascii.Error) as exc:
            raise BadRequest(f"malformed peer request: {type(exc).__name__}: {exc}") from None

    return wrapped


async def push_pull(request: web.Request) -> web.Response:
    body = await _authed_body(request)  # and sealed by gossip's own MAC
    try:
        out = request.app[SERVICE].gossip.handle_push_pull(body)
    except AuthError as exc:
        raise Unauthorized(f"push-pull refused: {exc}") from None
    except DecodeError as exc:
        raise BadRequest(f"bad push-pull payload: {exc}") from None
    except GossipError as exc:  # stopped: this node is shutting down, try another
        raise Unavailable(f"push-pull refused: {exc}") from None
    return web.Response(body=out, content_type="application/octet-stream")


async def state(request: web.Request) -> web.Response:
    body = _json(await _authed_body(request))
    return json_response(request.app[SERVICE].peer_service.state_push(body))


async def stats(request: web.Request) -> web.Response:
    await _authed_body(request)
    return json_response(await request.app[SERVICE].peer_service.stats(request.match_info["name"]))


def _collection_op(op: str) -> Handler:
    """A replica operation's route (write, search, get, stream, ...): the body decoded,
    served and the answer encoded by `cluster.replication.remote.PeerService`."""

    async def handler(request: web.Request) -> web.Response:
        service = request.app[SERVICE].peer_service
        if request.content_type == FRAME_TYPE:  # a binary frame (search, write, get)
            out = await service.frame_op(op, request.match_info["name"],
                                         await _authed_body(request))
            if isinstance(out, bytes):
                return body_response(out, FRAME_TYPE)
            return json_response(out)
        body = await _request_object(request)
        return json_response(await service.collection_op(op, request.match_info["name"], body))

    handler.__name__ = op
    return handler


def _log_served(op: str, status: int, ms: float) -> None:
    """A channel request's line, as the HTTP route's (node/http/observe.py): at info when it
    serves a client request (its id is in the line), else at debug; built only if logged."""
    level = logging.DEBUG if request_id.current.get() is None else logging.INFO
    if access_log.isEnabledFor(level):
        route = f"/internal/v1/collections/{{name}}/{op}"
        access_line(level, "POST", route, route, status, ms / 1000, verb="CHANNEL")


def _channel_route(verifier: PeerVerifier) -> Handler:
    """The peer channel (cluster/peers/channel.py): the upgrade is authenticated as any peer
    request (its signature covers GET, the path and an empty body) and counted against the
    node's caps (`Admission`: 503 past them, before it is accepted), then the frames it
    carries are served by `PeerService.frame_op`."""

    async def channel(request: web.Request) -> web.StreamResponse:
        sender = await _authenticate(request, verifier)
        if verifier.enabled and request.headers.get(RECIPIENT_HEADER) == ANY_RECIPIENT:
            raise Unauthorized("peer request refused: a channel is addressed to one node")
        if request.can_read_body:
            raise BadRequest("a channel's upgrade has no body")
        admission = request.app[_ADMISSION]
        admission.take(sender)  # Unavailable (503) past a cap: the client uses HTTP
        try:
            return await _serve_channel(request, verifier)
        finally:
            admission.give_back(sender)

    return channel


async def _serve_channel(request: web.Request, verifier: PeerVerifier) -> web.StreamResponse:
    config = request.app[CONFIG]
    # Clients send larger frames over HTTP: a channel holds MAX_IN_FLIGHT of these at most.
    ws = web.WebSocketResponse(
        compress=False, autoping=True, heartbeat=HEARTBEAT_S,
        max_msg_size=MAX_CHANNEL_FRAME + OVERHEAD)
    writer = await ws.prepare(request)
    frame_op = request.app[SERVICE].peer_service.frame_op

    async def serve(op: str, name: str, body: bytes) -> Any:
        # Past this node's own limit (below a channel's frame): that request alone is
        # refused, as over HTTP (a message past the channel's limit closes the channel).
        if len(body) > config.max_wire_bytes:
            raise PayloadTooLarge(
                f"body exceeds the limit of {config.max_body_bytes} bytes")
        return await frame_op(op, name, body)

    ch = ServerChannel(ws, verifier.secret, request.headers.get(SIGNATURE_HEADER, ""),
                       serve, _log_served, MAX_IN_FLIGHT, request.transport, writer)
    request.app[_CHANNELS].add(ch)
    try:
        await ch.run()
    finally:
        request.app[_CHANNELS].discard(ch)
    return ws


async def _close_channels(app: web.Application) -> None:
    channels: set[ServerChannel] = app[_CHANNELS]
    await asyncio.gather(*(ch.close() for ch in channels))  # each waits up to CLOSE_S


def add_internal_routes(app: web.Application, clock: Clock) -> None:
    # One replay memory per node; freshness is judged by the node's clock.
    verifier = PeerVerifier(app[CONFIG].peer_secret, clock.wall)
    c = "/internal/v1/collections/{name}"
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/internal/v1/pushpull", push_pull),
        ("POST", "/internal/v1/state", state),
        ("GET", c + "/stats", stats),
    ]
    # The hottest first: aiohttp tries the routes under one prefix in the order they were
    # added (no two match the same path).
    hot = ("search", "write", "get")
    ops = [*(op for op in hot if op in COLLECTION_OPS), *(op for op in COLLECTION_OPS
                                                          if op not in hot)]
    routes[:0] = [("POST", f"{c}/{op}", _collection_op(op)) for op in ops]
    for method, path, handler in routes:
        app.router.add_route(method, path, _peer_route(handler, verifier))
    channels: set[ServerChannel] = set()
    app[_CHANNELS] = channels
    app[_ADMISSION] = Admission()
    app.router.add_route("GET", CHANNEL_PATH, _channel_route(verifier))
    app.on_shutdown.append(_close_channels)
