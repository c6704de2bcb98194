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

from cluster.bounds import (
    MAX_DIGEST_BUCKETS,
    MAX_NPROBE,
    MAX_QUERIES,
    MAX_QUERY_RESULTS,
    MAX_STREAM_LIMIT,
    MAX_UID_CHARS,
    MAX_VERSION,
    checked_int,
    checked_list,
    checked_str,
)
from cluster.docs import decode_writes, encode_hits, encode_writes
from cluster.errors import BadRequest, NotFound, Unauthorized
from cluster.filters import parse_filter
from cluster.messages import AuthError, DecodeError
from cluster.peer_auth import PeerAuthError, PeerVerifier
from cluster.requests import MAX_ID_CHARS, MAX_K, valid_id
from cluster.spec import MAX_SHARDS, CollectionSpec, check_name
from cluster.state import ClusterState, CollectionEntry
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


def _name(request: web.Request) -> str:
    """The collection named in the path, checked as public names are."""
    return check_name(request.match_info["name"])


def _entry(request: web.Request) -> CollectionEntry:
    """The collection's entry in this node's own map: its spec is never taken from a peer."""
    name = _name(request)
    entry = request.app[CLUSTER].runtime.state.get(name)
    if entry is None:
        raise NotFound(f"collection {name!r} does not exist")
    return entry


def _shard(body: dict[str, Any], spec: CollectionSpec) -> int:
    return checked_int(body.get("shard"), 0, spec.shards - 1, "shard")


async def write(request: web.Request) -> web.Response:
    body = await _request_object(request)
    name = _name(request)
    # What the coordinator believes the collection is: only compared with this node's map.
    expect_spec = None
    if body.get("spec") is not None:
        expect_spec = CollectionSpec.from_json(body["spec"])
        if expect_spec.name != name:
            raise BadRequest(f"the spec names {expect_spec.name!r}, the path {name!r}")
    uid = body.get("uid")
    expect_uid = None if uid is None else checked_str(uid, MAX_UID_CHARS, "uid")
    cluster = request.app[CLUSTER]
    entry = cluster.runtime.entry_for_write(name, expect_uid, expect_spec)
    by_shard = decode_writes(body.get("writes"), entry.spec.dim, entry.spec.shards)
    await cluster.runtime.open_for_write(entry, by_shard)
    for docs in by_shard.values():
        for d in docs:
            cluster.coordinator.hlc.observe(d.version)
    out = await cluster.backend.write(entry.spec, by_shard)
    return json_response({"shards": {str(s): list(v) for s, v in out.items()}})


async def search(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _entry(request).spec
    nq = checked_int(body.get("nq"), 1, MAX_QUERIES, "nq")
    k = checked_int(body.get("k"), 1, MAX_K, "k")
    if nq * k > MAX_QUERY_RESULTS:
        raise BadRequest(f"nq × k must be at most {MAX_QUERY_RESULTS}")
    raw = base64.b64decode(checked_str(body.get("vectors"), 4 * nq * spec.dim * 2, "vectors"),
                           validate=True)
    if len(raw) != 4 * nq * spec.dim:
        raise BadRequest(f"vectors must hold {nq} × {spec.dim} float32 values")
    q = np.frombuffer(raw, dtype="<f4").reshape(nq, spec.dim)
    if not np.isfinite(q).all():
        raise BadRequest("query vectors must be finite")
    nprobe = body.get("nprobe")
    if nprobe is not None:
        nprobe = checked_int(nprobe, 1, MAX_NPROBE, "nprobe")
    include = body.get("include", ["metadata"])
    if not isinstance(include, list) or not set(include) <= {"metadata", "vector"}:
        raise BadRequest("'include' is a list of 'metadata' and 'vector'")
    shards = [checked_int(s, 0, spec.shards - 1, "shard")
              for s in checked_list(body.get("shards"), spec.shards, "shards")]
    rows = await request.app[CLUSTER].backend.search(
        spec, q, k, nprobe, parse_filter(body.get("filter")), shards, "vector" in include,
    )
    return json_response({"results": encode_hits(rows, "metadata" in include, "vector" in include)})


async def get(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _entry(request).spec
    doc_id = body.get("id")
    if not valid_id(doc_id):
        raise BadRequest(f"'id' must be a string of 1 to {MAX_ID_CHARS} characters")
    hit = await request.app[CLUSTER].backend.get(spec, _shard(body, spec), doc_id)
    doc = None if hit is None else encode_hits([[hit]], True, True)[0][0]
    return json_response({"doc": doc})


async def stats(request: web.Request) -> web.Response:
    await _authed_body(request)
    st = request.app[CLUSTER].backend.shard_stats(_name(request))
    return json_response({str(s): v for s, v in st.items()})


async def stream(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _entry(request).spec
    shard = _shard(body, spec)
    after = body.get("after")
    if after is not None and not valid_id(after):
        raise BadRequest("'after' is a document id or null")
    limit = checked_int(body.get("limit", 1000), 1, MAX_STREAM_LIMIT, "limit")
    docs, nxt = await request.app[CLUSTER].backend.stream_shard(spec, shard, after, limit)
    return json_response({"writes": encode_writes({shard: docs}), "next": nxt})


async def digests(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _entry(request).spec
    out = await request.app[CLUSTER].backend.shard_digests(
        spec, _shard(body, spec), checked_int(body.get("buckets"), 1, MAX_DIGEST_BUCKETS,
                                              "buckets")
    )
    return json_response({"digests": out})


async def buckets(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _entry(request).spec
    shard = _shard(body, spec)
    of = checked_int(body.get("of"), 1, MAX_DIGEST_BUCKETS, "of")
    wanted = [checked_int(b, 0, of - 1, "bucket")
              for b in checked_list(body.get("buckets"), of, "buckets")]
    docs = await request.app[CLUSTER].backend.bucket_records(spec, shard, wanted, of)
    return json_response({"writes": encode_writes({shard: docs})})


async def purge(request: web.Request) -> web.Response:
    body = await _request_object(request)
    spec = _entry(request).spec
    n = await request.app[CLUSTER].backend.purge_tombstones(
        spec, _shard(body, spec), checked_int(body.get("before"), 0, MAX_VERSION, "before")
    )
    return json_response({"purged": n})


async def drop_shard(request: web.Request) -> web.Response:
    body = await _request_object(request)
    # The collection may be gone from the map already: bound by the largest shard count.
    shard = checked_int(body.get("shard"), 0, MAX_SHARDS - 1, "shard")
    await request.app[CLUSTER].coordinator.drop_local_shard(_name(request), shard)
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
