"""Peer-to-peer routes (`/internal/v1/...`): gossip push-pull, state pushes, and the shard
operations a coordinator sends to replicas. With a cluster secret every request must carry
a valid HMAC; anything else is refused before it is read further."""

from __future__ import annotations

import binascii
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from cluster.errors import BadRequest, Unauthorized
from cluster.messages import AuthError, DecodeError
from cluster.peers import AUTH_HEADER, check_signature
from node.api import json_response
from node.keys import CONFIG, SERVICE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _authed_body(request: web.Request) -> bytes:
    body = await request.read()
    secret = request.app[CONFIG].peer_secret
    if not check_signature(secret, request.method, request.path, body,
                           request.headers.get(AUTH_HEADER, "")):
        raise Unauthorized("peer request without a valid cluster signature")
    return body


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


def _peer_route(handler: Handler) -> Handler:
    """A peer request missing a field or carrying one of the wrong type is a 400, not a
    500: the sender is another node, but it may be another version (or not a node)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (KeyError, ValueError, TypeError, binascii.Error) as exc:
            raise BadRequest(f"malformed peer request: {type(exc).__name__}: {exc}") from None

    return wrapped


async def push_pull(request: web.Request) -> web.Response:
    body = await request.read()  # sealed by gossip's own HMAC
    try:
        out = request.app[SERVICE].gossip.handle_push_pull(body)
    except AuthError:
        raise Unauthorized("push-pull with a wrong cluster secret") from None
    except DecodeError as exc:
        raise BadRequest(f"bad push-pull payload: {exc}") from None
    return web.Response(body=out, content_type="application/octet-stream")


async def state(request: web.Request) -> web.Response:
    body = _json(await _authed_body(request))
    return json_response(request.app[SERVICE].peer_service.state_push(body))


async def stats(request: web.Request) -> web.Response:
    await _authed_body(request)
    return json_response(await request.app[SERVICE].peer_service.stats(request.match_info["name"]))


async def collection_op(request: web.Request) -> web.Response:
    """A replica operation (write, search, get, stream, ...): decoded, served and encoded
    by `cluster.remote.PeerService`."""
    body = await _request_object(request)
    op, name = request.match_info["op"], request.match_info["name"]
    return json_response(await request.app[SERVICE].peer_service.collection_op(op, name, body))


def add_internal_routes(app: web.Application) -> None:
    c = "/internal/v1/collections/{name}"
    ops = "{op:write|search|get|stream|digests|buckets|drop_shard|purge}"
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/internal/v1/pushpull", push_pull),
        ("POST", "/internal/v1/state", state),
        ("GET", c + "/stats", stats),
        ("POST", c + "/" + ops, collection_op),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _peer_route(handler))
