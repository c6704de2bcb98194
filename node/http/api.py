"""aiohttp handlers: parse, call the service, serialise. No logic here."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from aquila.cluster.model.bounds import depth_exceeds
from aquila.cluster.model.documents import RESULTS_ON_THREAD, answer_weight
from aquila.cluster.model.errors import AquilaError, BadRequest, PayloadTooLarge
from aquila.cluster.model.spec import parse_spec
from aquila.node.http.access import check_access
from aquila.node.http.answer import body_response
from aquila.node.http.body import read_body
from aquila.node.http.columnar import is_columnar, parse_columnar, parse_columnar_fast
from aquila.node.http.fastparse import parse_documents_fast
from aquila.node.http.fastsearch import parse_search_fast
from aquila.node.http.openapi import openapi_document
from aquila.node.http.parse import (
    MAX_BODY_DEPTH,
    check_id,
    compact_size,
    loads_overflowing,
    parse_count,
    parse_documents,
    parse_ids,
    parse_scroll,
    parse_search,
    refuse_wide_integers,
)
from aquila.node.keys import BLOCKING, CONFIG, METRICS, READY, SERVICE

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return body_response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY),
                         "application/json", status)


def error_response(err: AquilaError) -> web.Response:
    return json_response(err.to_json(), err.status)


HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "already_exists",
    413: "payload_too_large",
    503: "unavailable",
}


def check_request(request: web.Request, route: str | None) -> None:
    """Before the handler: Unauthorized or Forbidden unless the key may call the route (its
    pattern, None when nothing matched), and 413 for a body announced above the limit."""
    config = request.app[CONFIG]
    check_access(config, request.method, route if route is not None else request.path,
                 request.headers.get("Authorization", ""))
    length = request.content_length
    if length is not None and length > config.max_wire_bytes:
        raise PayloadTooLarge(
            f"body of {length} bytes exceeds the limit of {config.max_body_bytes} bytes"
        )


def failure_response(request: web.Request, exc: Exception) -> web.Response:
    """Every failure as {"error": {"code", "message"}} with its status; a redirect (an
    HTTPException below 400) is raised again, for aiohttp to answer."""
    if isinstance(exc, AquilaError):
        return error_response(exc)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(
            PayloadTooLarge(f"body exceeds the limit of {request.app[CONFIG].max_body_bytes} bytes")
        )
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        message = exc.reason
        if exc.status == 404:
            message = f"no route {request.method} {request.path}"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        code = HTTP_CODES.get(exc.status, "bad_request")
        resp = json_response({"error": {"code": code, "message": message}}, exc.status)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    # A bug, not bad input: logged with its traceback, answered in the contract's shape.
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(AquilaError("internal error; see the node's log"))


# Bodies above this are decoded on a thread: a 10,000-document batch (76 MB) takes half a
# second to decode and check, which would stall every request and gossip on the loop. Smaller
# ones (1,000 documents: 40 ms) stay on the loop, where they are cheaper: a thread costs
# ingest throughput in handing the GIL back and forth.
_DECODE_ON_THREAD_BYTES = 16 * 1024 * 1024
# Search bodies up to this size take the fast path on the loop (1,000 queries of dimension
# 384 are about 8 MB of JSON: 10 ms); larger ones go to the general path, on a thread.
_FAST_SEARCH_BYTES = 8 * 1024 * 1024


async def read_raw(request: web.Request) -> bytes:
    """The body as sent, decompressed and within the wire limit (see node/http/body.py)."""
    return await read_body(request, request.app[CONFIG].max_wire_bytes)


async def read_json(request: web.Request, raw: bytes | None = None) -> Any:
    """The JSON body (`raw`: the body when the handler has read it already)."""
    if raw is None:
        raw = await read_raw(request)
    if not raw:
        raise BadRequest("a JSON body is required")
    limit = request.app[CONFIG].max_body_bytes
    if len(raw) > _DECODE_ON_THREAD_BYTES:
        return await request.app[BLOCKING].parse(decode_body, raw, limit)
    return decode_body(raw, limit)


def decode_body(raw: bytes, limit: int) -> Any:
    """The JSON body, or the contract's 400 / 413 (blocking: big bodies come on a thread)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if len(raw) > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes") from None
        if "number is infinity" in str(exc):
            refuse_wide_integers(raw)  # an integer of 309 digits or more is one
            try:
                return loads_overflowing(raw)
            except ValueError:
                pass
        raise BadRequest(f"malformed JSON: {exc}") from None
    refuse_wide_integers(raw)
    if len(raw) > limit and depth_exceeds(body, MAX_BODY_DEPTH):  # compact_size recurses
        raise BadRequest(f"body nested deeper than {MAX_BODY_DEPTH} levels")
    if len(raw) > limit and compact_size(body) > limit:
        raise PayloadTooLarge(
            f"body exceeds the limit of {limit} bytes (vectors counted at float32 precision)"
        )
    return body


# -- collections ----------------------------------------------------------------------------
async def put_collection(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    spec = parse_spec(name, await read_json(request))
    desc, created = await request.app[SERVICE].collections.create(spec)
    return json_response(desc, 201 if created else 200)


async def list_collections(request: web.Request) -> web.Response:
    return json_response({"collections": await request.app[SERVICE].collections.list_all()})


async def get_collection(request: web.Request) -> web.Response:
    return json_response(await request.app[SERVICE].collections.get(request.match_info["name"]))


async def delete_collection(request: web.Request) -> web.Response:
    await request.app[SERVICE].collections.delete(request.match_info["name"])
    return json_response({"deleted": True})


# -- documents ----------------------------------------------------------------------------
# Batches of more documents than this are validated on a thread (the decoded body is already
# in memory; checking 10,000 vectors element by element takes a while).
_VALIDATE_ON_THREAD_DOCS = 2000
# The columnar form costs about a microsecond a document to check (its metadata serialised).
_VALIDATE_COLUMNAR_ON_THREAD_DOCS = 20_000


# What a body costs to decode and check follows its documents more than its bytes: 300,000
# documents of dim 2 (10 MiB) took 4.2 s in the fast path, all of it on the loop below
# `_DECODE_ON_THREAD_BYTES`. Objects (documents and their metadata's) and, in the columnar form,
# commas (its ids and metadata) are counted instead (3.5 ms for 10 MiB: memchr-fast), and a
# body with more than these goes to a thread.
_ON_THREAD_OBJECTS = 4096
_ON_THREAD_COMMAS = 32_768


def _many_documents(raw: bytes, columnar: bool) -> bool:
    if len(raw) > _DECODE_ON_THREAD_BYTES:
        return True
    if columnar:
        return raw.count(b",") > _ON_THREAD_COMMAS
    return raw.count(b"{") > _ON_THREAD_OBJECTS


async def upsert(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    entry = service.collections.entry(request.match_info["name"])
    dim = entry.spec.dim
    raw = await read_raw(request)
    batch = None
    on_thread = False
    if raw and len(raw) <= request.app[CONFIG].max_body_bytes:
        # The fast paths take well-formed batches; anything else gets the general one. The
        # columnar form is told by its field (a cheap scan).
        columnar = b'"vectors_b64"' in raw
        fast = parse_columnar_fast if columnar else parse_documents_fast
        on_thread = _many_documents(raw, columnar)
        if on_thread:
            batch = await request.app[BLOCKING].parse(fast, raw, dim)
        else:
            batch = fast(raw, dim)
    if batch is None:
        body = (await request.app[BLOCKING].parse(decode_body, raw,
                                                  request.app[CONFIG].max_body_bytes)
                if on_thread else await read_json(request, raw))
        if is_columnar(body):
            ids = body.get("ids")
            if isinstance(ids, list) and len(ids) > _VALIDATE_COLUMNAR_ON_THREAD_DOCS:
                batch = await request.app[BLOCKING].parse(parse_columnar, body, dim)
            else:
                batch = parse_columnar(body, dim)
        else:
            docs = body.get("documents") if isinstance(body, dict) else None
            if isinstance(docs, list) and len(docs) > _VALIDATE_ON_THREAD_DOCS:
                batch = await request.app[BLOCKING].parse(parse_documents, body, dim)
            else:
                batch = parse_documents(body, dim)
    return json_response(await service.writes.upsert(entry, batch))


async def get_document(request: web.Request) -> web.Response:
    flag = request.query.get("vector", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise BadRequest("'vector' must be true or false")
    service = request.app[SERVICE]
    entry = service.collections.entry(request.match_info["name"])
    doc_id = check_id(request.match_info["doc_id"])
    return json_response(await service.reads.get_document(entry, doc_id, flag in ("true", "1")))


async def delete_documents(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    entry = service.collections.entry(request.match_info["name"])
    body = await read_json(request)
    ids = parse_ids(body)
    n = await service.writes.delete(entry, ids, body.get("consistency", "quorum"))
    return json_response({"deleted": n})


async def delete_document(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    entry = service.collections.entry(request.match_info["name"])
    await service.writes.delete_one(entry, check_id(request.match_info["doc_id"]))
    return json_response({"deleted": 1})


async def search(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    entry = service.collections.entry(request.match_info["name"])
    raw = await read_raw(request)
    # The commonest bodies (vectors and scalar options) by the fast path; the rest, and
    # anything wrong, by the general one, which says what is wrong.
    fast = len(raw) <= min(_FAST_SEARCH_BYTES, request.app[CONFIG].max_body_bytes)
    req = parse_search_fast(raw, entry.spec.dim) if fast else None
    if req is None:
        req = parse_search(await read_json(request, raw), entry.spec.dim)
    out = await service.reads.search(entry, req)
    if answer_weight(out["results"], entry.spec.dim, req.include_vector) > RESULTS_ON_THREAD:
        # Serialised on a thread too (100,000 hits with their vectors are tens of MiB), and
        # freed there: millions of floats' objects took a third of a second to free.
        held = [out]
        del out
        return await request.app[BLOCKING].parse(_respond_and_free, held, "results")
    return json_response(out)


def _respond_and_free(held: list[dict[str, Any]], key: str) -> web.Response:
    """The response of the one answer in `held`, which is emptied: serialised and freed on
    the caller's thread, an item of its list `key` at a time (a query's row of hits, a
    document). orjson keeps the GIL for a whole call, and freeing a list frees all it holds
    in one step: in one piece, 100,000 hits with their vectors kept the event loop from
    running for 0.3 s, though on another thread."""
    out = held.pop()
    items: list[Any] = out.pop(key)
    pieces: list[bytes] = []
    while items:  # from the last: each freed once it is serialised
        pieces.append(orjson.dumps(items.pop(), option=orjson.OPT_SERIALIZE_NUMPY))
    pieces.reverse()
    rest = orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
    tail = b"]" + (b"," + rest[1:] if len(rest) > 2 else b"}")
    body = b"".join((orjson.dumps({key: []})[:-2], b",".join(pieces), tail))
    return body_response(body, "application/json")


async def count(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    entry = service.collections.entry(request.match_info["name"])
    raw = await read_raw(request)
    req = parse_count(await read_json(request, raw) if raw.strip() else None)
    return json_response(await service.reads.count(entry, req))


async def scroll(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    entry = service.collections.entry(request.match_info["name"])
    raw = await read_raw(request)
    req = parse_scroll(await read_json(request, raw) if raw.strip() else None,
                       entry.spec.name, entry.spec.shards, entry.spec.dim)
    out = await service.reads.scroll(entry, req)
    if answer_weight([out["documents"]], entry.spec.dim, req.include_vector) > RESULTS_ON_THREAD:
        held = [out]  # serialised and freed on a thread, as a search's (838 vectors of
        del out  # dim 20,000 are 16.7 million floats)
        return await request.app[BLOCKING].parse(_respond_and_free, held, "documents")
    return json_response(out)


# -- operations ---------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if not request.app[READY].is_set():
        return error_response(_not_ready())
    return json_response({"status": "ready"})


def _not_ready() -> AquilaError:
    from aquila.cluster.model.errors import Unavailable

    return Unavailable("the node is starting: loading shards or joining")


async def metrics(request: web.Request) -> web.Response:
    await request.app[METRICS].refresh()
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document(request.app[CONFIG]))


def add_public_routes(app: web.Application) -> None:
    r = app.router
    # aiohttp tries the routes under one prefix in the order they were added: the hottest
    # first (no two of these match the same path, so the order changes nothing else).
    r.add_post("/v1/collections/{name}/search", search)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
    r.add_get("/v1/collections", list_collections)
    r.add_put("/v1/collections/{name}", put_collection)
    r.add_get("/v1/collections/{name}", get_collection)
    r.add_delete("/v1/collections/{name}", delete_collection)
    r.add_post("/v1/collections/{name}/documents", upsert)
    r.add_post("/v1/collections/{name}/documents/delete", delete_documents)
    r.add_get("/v1/collections/{name}/documents/{doc_id:.+}", get_document)
    r.add_delete("/v1/collections/{name}/documents/{doc_id:.+}", delete_document)
    r.add_post("/v1/collections/{name}/count", count)
    r.add_post("/v1/collections/{name}/scroll", scroll)
