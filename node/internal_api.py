"""Peer-to-peer routes (`/internal/v1/...`): gossip push-pull, state pushes, and the shard
operations a coordinator sends to replicas. With a cluster secret (or an API key, which then
serves as one) every request must carry a valid, fresh, unreplayed signature
(`cluster.peer_auth`); anything else is refused with 401 before its body is read."""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from cluster.docs import decode_writes, encode_hits, encode_writes
from cluster.errors import BadRequest, NotFound, Unauthorized
from cluster.filters import parse_filter
from cluster.messages import AuthError, DecodeError
from cluster.peer_auth import PeerAuthError, PeerVerifier
from cluster.spec import CollectionSpec
from cluster.state import ClusterState
from node.api import json_response
from node.keys import CLUSTER, CONFIG

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _authenticate(request: web.Request, verifier: PeerVerifier) -> None:
    """Check the signature from the request line and headers alone, then read the body (at
    most the size limit: aiohttp's client_max_size) and check it is the one signed."""
    try:
        signed = verifier.check_headers(request.method, request.raw_path, request.headers,
                                        request.app[CLUSTER].node_id)
        if signed is not None:
            verifier.check_body(signed, await request.read())
    except PeerAuthError as exc:
        raise Unauthorized(f"peer request refused: {exc}") from None


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
        out = request.app[CLUSTER].gossip.handle_push_pull(body)
    except AuthError as exc:
        raise Unauthorized(f"push-pull refused: {exc}") from None
    except DecodeError as exc:
        raise BadRequest(f"bad push-pull payload: {exc}") from None
    return web.Response(body=out, content_type="application/octet-stream")


async def state(request: web.Request) -> web.Response:
    body = await _authed_body(request)
    entries = ClusterState.decode_entries(body)
    request.app[CLUSTER].runtime.merge(entries)
    return json_response({"epoch": request.app[CLUSTER].runtime.state.epoch})


def _spec_of(request: web.Request, raw: object) -> CollectionSpec:
    if isinstance(raw, dict):
        return CollectionSpec.from_json(raw)
    entry = request.app[CLUSTER].runtime.state.get(request.match_info["name"])
    if entry is None:
        raise NotFound(f"collection {request.match_info['name']!r} does not exist")
    return entry.spec


async def write(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _spec_of(request, body.get("spec"))
    by_shard = decode_writes(body["writes"], spec.dim)
    backend = request.app[CLUSTER].backend
    await backend.ensure(spec, by_shard, str(body.get("uid", "")))
    for docs in by_shard.values():
        for d in docs:
            request.app[CLUSTER].coordinator.hlc.observe(d.version)
    out = await backend.write(spec, by_shard)
    return json_response({"shards": {str(s): list(v) for s, v in out.items()}})


async def search(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _spec_of(request, None)
    q = np.frombuffer(base64.b64decode(body["vectors"]), dtype="<f4").reshape(int(body["nq"]), spec.dim)
    include = body.get("include", ["metadata"])
    rows = await request.app[CLUSTER].backend.search(
        spec, q, int(body["k"]), body.get("nprobe"), parse_filter(body.get("filter")),
        [int(s) for s in body["shards"]], "vector" in include,
    )
    return json_response({"results": encode_hits(rows, "metadata" in include, "vector" in include)})


async def get(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _spec_of(request, None)
    hit = await request.app[CLUSTER].backend.get(spec, int(body["shard"]), str(body["id"]))
    doc = None if hit is None else encode_hits([[hit]], True, True)[0][0]
    return json_response({"doc": doc})


async def stats(request: web.Request) -> web.Response:
    await _authed_body(request)
    st = request.app[CLUSTER].backend.shard_stats(request.match_info["name"])
    return json_response({str(s): v for s, v in st.items()})


async def stream(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _spec_of(request, None)
    docs, nxt = await request.app[CLUSTER].backend.stream_shard(
        spec, int(body["shard"]), body.get("after"), int(body.get("limit", 1000))
    )
    return json_response({"writes": encode_writes({int(body["shard"]): docs}), "next": nxt})


async def digests(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _spec_of(request, None)
    out = await request.app[CLUSTER].backend.shard_digests(
        spec, int(body["shard"]), int(body["buckets"])
    )
    return json_response({"digests": out})


async def buckets(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _spec_of(request, None)
    shard = int(body["shard"])
    docs = await request.app[CLUSTER].backend.bucket_records(
        spec, shard, [int(b) for b in body["buckets"]], int(body["of"])
    )
    return json_response({"writes": encode_writes({shard: docs})})


async def purge(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _spec_of(request, None)
    n = await request.app[CLUSTER].backend.purge_tombstones(
        spec, int(body["shard"]), int(body["before"])
    )
    return json_response({"purged": n})


async def drop_shard(request: web.Request) -> web.Response:
    body = await _request_object(request)
    await request.app[CLUSTER].coordinator.drop_local_shard(
        request.match_info["name"], int(body["shard"])
    )
    return json_response({"dropped": True})


def add_internal_routes(app: web.Application) -> None:
    verifier = PeerVerifier(app[CONFIG].peer_secret)  # one replay memory per node
    c = "/internal/v1/collections/{name}"
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/internal/v1/pushpull", push_pull),
        ("POST", "/internal/v1/state", state),
        ("POST", c + "/write", write),
        ("POST", c + "/search", search),
        ("POST", c + "/get", get),
        ("GET", c + "/stats", stats),
        ("POST", c + "/stream", stream),
        ("POST", c + "/digests", digests),
        ("POST", c + "/buckets", buckets),
        ("POST", c + "/drop_shard", drop_shard),
        ("POST", c + "/purge", purge),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _peer_route(handler, verifier))
