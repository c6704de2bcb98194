"""The replica protocol between nodes, both ends, and every wire format of the internal routes
in one place: a peer's `Replica` (`RemoteReplica`, over the peer client), the direct state
push, and the serving side (`PeerService`) that the HTTP routes (`node.http.internal_api`) and the
in-process network (`cluster.peers.memory`) hand decoded requests to.

Formats: the hot paths (search, write, get) in binary frames (`frames`: raw arrays, columns of
length-prefixed bytes, a version byte); the rest, and any request sent as JSON (the routes
take both, by content type), in JSON bodies with vectors as base64 float32 little-endian and
metadata as raw JSON. Nothing
from a peer is trusted: every field is checked and bounded (`model.bounds`) and a field missing,
of the wrong type or out of bounds raises KeyError / ValueError / TypeError, which the HTTP
layer answers with 400 (the sender may be another version, or not a node); what a peer answers
is checked too before it reaches a client.
"""

from __future__ import annotations

import base64
import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.bounds import (
    MAX_COUNT,
    MAX_DIGEST_BUCKETS,
    MAX_DOCUMENT_METADATA,
    MAX_NODE_ID_CHARS,
    MAX_NPROBE,
    MAX_QUERIES,
    MAX_QUERY_RESULTS,
    MAX_STREAM_LIMIT,
    MAX_UID_CHARS,
    MAX_VECTOR_VALUE,
    MAX_VERSION,
    BoundsError,
    checked_int,
    checked_list,
    checked_str,
    parse_uint,
    vectors_within,
)
from aquila.cluster.model.documents import Hit, Incoming, json_bytes
from aquila.cluster.model.errors import BadRequest, NotFound, Unavailable
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.hlc import HybridClock
from aquila.cluster.model.operations import (
    MAX_ID_CHARS,
    MAX_K,
    MAX_SCROLL_LIMIT,
    CountRequest,
    ScrollRequest,
    SearchRequest,
    valid_id,
)
from aquila.cluster.model.recall import check_target
from aquila.cluster.model.spec import MAX_SHARDS, CollectionSpec, check_name
from aquila.cluster.peers.client import (
    COLLECTION_PREFIX,
    STATE_PATH,
    PeerClient,
    PeerError,
    collection_path,
)
from aquila.cluster.replication import frames
from aquila.cluster.replication.coalesce import Coalescer
from aquila.cluster.replication.frames import FrameError
from aquila.cluster.replication.replica import Replica, WriteResult
from aquila.cluster.state.entries import ClusterState, CollectionEntry


# -- documents and hits -------------------------------------------------------------------
def encode_writes(by_shard: dict[int, list[Incoming]]) -> list[dict[str, Any]]:
    """Wire form of a write batch: vectors as base64 float32, metadata as raw JSON."""
    out = []
    for shard, docs in by_shard.items():
        out.append({
            "shard": shard,
            "docs": [
                {
                    "id": d.id,
                    "v": None if d.vector is None
                    else base64.b64encode(d.vector.astype("<f4").tobytes()).decode(),
                    "m": orjson.Fragment(d.metadata or b"{}"),
                    "ver": d.version,
                    "w": d.writer,
                }
                for d in docs
            ],
        })
    return out


def decode_writes(
    raw: Any, dim: int, shards: int = MAX_SHARDS
) -> dict[int, list[Incoming]]:
    """A write batch from a peer, every field checked (ValueError otherwise): shard numbers
    below `shards`, valid ids, finite vectors of `dim`, metadata objects, versions and
    writers within bounds."""
    by_shard: dict[int, list[Incoming]] = {}
    for part in checked_list(raw, MAX_SHARDS, "writes"):
        if not isinstance(part, dict):
            raise BoundsError("a write part is an object")
        shard = checked_int(part.get("shard"), 0, shards - 1, "shard")
        docs = []
        for d in checked_list(part.get("docs"), 1 << 20, "docs"):
            if not isinstance(d, dict) or not valid_id(d.get("id")):
                raise BoundsError("a document has a string id of 1 to 256 characters")
            version = checked_int(d.get("ver"), 0, MAX_VERSION, "version")
            writer = checked_str(d.get("w"), MAX_NODE_ID_CHARS, "writer")
            vec = None
            if d.get("v") is not None:
                vec = np.frombuffer(base64.b64decode(d["v"], validate=True), dtype="<f4")
                if vec.shape != (dim,):
                    raise ValueError(f"vector of {d['id']!r} has the wrong dimension")
                if not vectors_within(vec):
                    raise ValueError(f"vector of {d['id']!r} is not finite and within bounds")
            docs.append(Incoming(d["id"], vec, _metadata(d) if vec is not None else b"",
                                 version, writer))
        by_shard[shard] = docs
    return by_shard


def _metadata(d: dict[str, Any]) -> bytes:
    """A document's metadata, re-encoded: an object, and (unlike what a client may send,
    see MAX_METADATA_DEPTH) as deep as data stored by older versions may be, within what
    JSON encoding allows."""
    meta = d.get("m")
    if not isinstance(meta, dict):
        raise BoundsError(f"metadata of {d['id']!r} is not an object")
    try:
        return json_bytes(meta)  # kept in the shard's memory: its length, not orjson's buffer
    except orjson.JSONEncodeError as exc:  # nested beyond orjson's 255 levels
        raise BoundsError(f"metadata of {d['id']!r}: {exc}") from None


def encode_hits(rows: list[list[Hit]], metadata: bool, vector: bool) -> list[list[list[Any]]]:
    return [
        # Metadata travels as a JSON string: the coordinator passes it on as it is, instead of
        # parsing it and writing it again.
        [[h.id, h.score, (h.metadata or b"{}").decode() if metadata else None,
          base64.b64encode(h.vector).decode() if vector else None, h.shard] for h in row]
        for row in rows
    ]


def decode_hits(raw: list[list[list[Any]]]) -> list[list[Hit]]:
    return [
        [Hit(h[0], float(h[1]), _meta_bytes(h[2]),
             base64.b64decode(h[3]) if h[3] else b"",
             checked_int(h[4], -1, MAX_SHARDS - 1, "shard") if len(h) > 4 else -1)
         for h in row]
        for row in raw
    ]


def _meta_bytes(m: Any) -> bytes:
    if m is None:
        return b"{}"
    if isinstance(m, str):
        return m.encode()
    return orjson.dumps(m)  # a peer that sent the object itself


# -- search: the one format built per query batch, memoised per request ---------------------
_SEARCH_BODIES: weakref.WeakKeyDictionary[SearchRequest, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)


def encode_search(req: SearchRequest, shards: list[int]) -> dict[str, Any]:
    """The request of a search of these shards. The vectors are encoded once per search,
    however many nodes it asks."""
    body = _SEARCH_BODIES.get(req)
    if body is None:
        body = _SEARCH_BODIES[req] = {
            "vectors": base64.b64encode(req.vectors.astype("<f4").tobytes()).decode(),
            "nq": len(req.vectors), "k": req.k, "nprobe": req.nprobe, "filter": req.filter,
            "include": ["metadata"] * req.include_metadata + ["vector"] * req.include_vector,
        }
        if req.explain:  # only then: a peer that predates plans sees the body it knows
            body["explain"] = True
        if req.recall is not None:  # each node picks its own probes for it
            body["recall"] = req.recall
    return {**body, "shards": shards}


def decode_search(body: dict[str, Any], spec: CollectionSpec) -> tuple[SearchRequest, list[int]]:
    """A peer's search, every field checked against this node's spec of the collection."""
    nq = checked_int(body.get("nq"), 1, MAX_QUERIES, "nq")
    # A search by stored documents asks for one more hit than the client (it drops the
    # document itself), so k + 1 and one more per query are within bounds.
    k = checked_int(body.get("k"), 1, MAX_K + 1, "k")
    if nq * k > MAX_QUERY_RESULTS + nq:
        raise BadRequest(f"nq × k must be at most {MAX_QUERY_RESULTS} (+ nq)")
    raw = base64.b64decode(checked_str(body.get("vectors"), 4 * nq * spec.dim * 2, "vectors"),
                           validate=True)
    if len(raw) != 4 * nq * spec.dim:
        raise BadRequest(f"vectors must hold {nq} × {spec.dim} float32 values")
    q = np.frombuffer(raw, dtype="<f4").reshape(nq, spec.dim)
    if not vectors_within(q).all():
        raise BadRequest(f"query vectors must be finite and within ±{MAX_VECTOR_VALUE:g}")
    nprobe = body.get("nprobe")
    if nprobe is not None:
        nprobe = checked_int(nprobe, 1, MAX_NPROBE, "nprobe")
    include = body.get("include", ["metadata"])
    if not isinstance(include, list) or not set(include) <= {"metadata", "vector"}:
        raise BadRequest("'include' is a list of 'metadata' and 'vector'")
    shards = [checked_int(s, 0, spec.shards - 1, "shard")
              for s in checked_list(body.get("shards"), spec.shards, "shards")]
    flt = body.get("filter")
    explain = body.get("explain", False)
    if not isinstance(explain, bool):
        raise BadRequest("'explain' must be a boolean")
    recall = body.get("recall")
    if recall is not None:
        recall = check_target(recall)
    req = SearchRequest(
        vectors=q,
        k=k,
        nprobe=nprobe,
        filter=flt,
        predicate=parse_filter(flt),
        include_metadata="metadata" in include,
        include_vector="vector" in include,
        allow_partial=True,
        timeout_ms=None,
        explain=explain,
        recall=recall,
    )
    return req, shards


def encode_rows(rows: list[list[Hit]], req: SearchRequest,
                plans: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"results": encode_hits(rows, req.include_metadata,
                                                  req.include_vector)}
    if plans is not None:
        out["plans"] = [plans[s] for s in sorted(plans)]
    return out


# What a shard's plan may say, as a peer reports it: each field checked and bounded, since the
# plans reach the client's answer.
PLAN_PATHS = ("exact", "selector", "postfilter", "none", "unfiltered")
_PLAN_COUNTS = ("matches", "documents", "nprobe", "candidates", "finished_with_selector")


def decode_plans(raw: Any, shards: list[int]) -> dict[int, dict[str, Any]]:
    """A peer's plans of the shards it was asked for. Plans only explain an answer: one that
    is malformed is left out (the hits it came with still count); fields not known are
    dropped, and numbers bounded."""
    out: dict[int, dict[str, Any]] = {}
    if not isinstance(raw, list):
        return out
    for p in raw[: len(shards)]:
        try:
            plan = _plan(p, shards)
        except BoundsError:
            continue
        out[plan["shard"]] = plan
    return out


def _plan(p: Any, shards: list[int]) -> dict[str, Any]:
    if not isinstance(p, dict):
        raise BoundsError("a plan is an object")
    shard = checked_int(p.get("shard"), 0, MAX_COUNT, "shard")
    path = p.get("path")
    if shard not in shards or path not in PLAN_PATHS:
        raise BoundsError("a plan names a shard asked for and a known path")
    plan: dict[str, Any] = {"shard": shard, "path": path}
    for name in _PLAN_COUNTS:
        if p.get(name) is not None:
            plan[name] = checked_int(p[name], 0, MAX_COUNT, name)
    if isinstance(p.get("cached"), bool):
        plan["cached"] = p["cached"]
    mean = p.get("nprobe_mean")
    if isinstance(mean, int | float) and not isinstance(mean, bool) and 0 <= mean <= MAX_COUNT:
        plan["nprobe_mean"] = float(mean)
    return plan


# -- count and scroll -----------------------------------------------------------------------
def encode_count(req: CountRequest, shards: list[int]) -> dict[str, Any]:
    return {"filter": req.filter, "shards": shards}


def decode_count(body: dict[str, Any], spec: CollectionSpec) -> tuple[CountRequest, list[int]]:
    """A peer's count, checked against this node's spec of the collection."""
    shards = [checked_int(s, 0, spec.shards - 1, "shard")
              for s in checked_list(body.get("shards"), spec.shards, "shards")]
    flt = body.get("filter")
    return CountRequest(flt, parse_filter(flt), True, None), shards


def encode_counts(counts: dict[int, int]) -> dict[str, Any]:
    return {"counts": {str(s): n for s, n in counts.items()}}


def decode_counts(raw: Any, shards: list[int]) -> dict[int, int]:
    """A replica's counts, bounded, for the shards it was asked about only."""
    counts = raw.get("counts") if isinstance(raw, dict) else None
    if not isinstance(counts, dict):
        raise BoundsError("a count answer holds 'counts'")
    asked = set(shards)
    out = {}
    for s, n in counts.items():
        shard = parse_uint(s, MAX_SHARDS - 1, "shard")
        if shard not in asked:
            raise BoundsError(f"a count answer names shard {shard}, which was not asked")
        out[shard] = checked_int(n, 0, MAX_COUNT, "count")
    if set(out) != asked:
        raise BoundsError("a count answer leaves out shards it was asked about")
    return out


def encode_scroll(req: ScrollRequest, shard: int, after: str | None, limit: int
                  ) -> dict[str, Any]:
    return {"shard": shard, "after": after, "limit": limit, "filter": req.filter,
            "vector": req.include_vector}


def decode_scroll(body: dict[str, Any], spec: CollectionSpec
                  ) -> tuple[ScrollRequest, int, str | None, int]:
    """A peer's scroll page request, checked against this node's spec of the collection."""
    shard = checked_int(body.get("shard"), 0, spec.shards - 1, "shard")
    after = body.get("after")
    if after is not None and not valid_id(after):
        raise BadRequest("'after' is a document id or null")
    limit = checked_int(body.get("limit"), 1, MAX_SCROLL_LIMIT, "limit")
    vector = body.get("vector", False)
    if not isinstance(vector, bool):
        raise BadRequest("'vector' is a boolean")
    flt = body.get("filter")
    req = ScrollRequest(flt, parse_filter(flt), limit, None, True, vector, True, None)
    return req, shard, after, limit


def encode_page_of(docs: list[Hit], nxt: str | None, vector: bool) -> dict[str, Any]:
    return {"docs": [[h.id, (h.metadata or b"{}").decode(),
                      base64.b64encode(h.vector).decode() if vector else None] for h in docs],
            "next": nxt}


def decode_page_of(raw: Any, spec: CollectionSpec, shard: int, after: str | None, limit: int,
                   vector: bool) -> tuple[list[Hit], str | None]:
    """A replica's scroll page, checked before it reaches a client: at most `limit` documents
    with valid ids in increasing order after `after`, metadata objects, vectors of the
    collection's dimension, and a place to go on from that is not behind them."""
    if not isinstance(raw, dict):
        raise BoundsError("a scroll page is an object")
    docs = checked_list(raw.get("docs"), limit, "docs")
    nxt = raw.get("next")
    out: list[Hit] = []
    last = after
    for d in docs:
        if not isinstance(d, list) or len(d) != 3 or not valid_id(d[0]):
            raise BoundsError("a scroll document is [id, metadata, vector]")
        if last is not None and not d[0] > last:
            raise BoundsError("a scroll page is not in id order after its start")
        last = d[0]
        meta = checked_str(d[1], 1 << 26, "metadata").encode()
        try:
            if not isinstance(orjson.loads(meta), dict):
                raise BoundsError("scroll metadata is not an object")
        except orjson.JSONDecodeError:
            raise BoundsError("scroll metadata is not JSON") from None
        vec = b""
        if vector:
            vec = base64.b64decode(checked_str(d[2], 8 * spec.dim, "vector"), validate=True)
            if len(vec) != 4 * spec.dim:
                raise BoundsError("a scroll vector has the wrong dimension")
        out.append(Hit(d[0], 0.0, meta, vec, shard))
    if nxt is not None and (not valid_id(nxt) or (last is not None and nxt < last)):
        raise BoundsError("a scroll page goes on from an id behind its documents")
    return out, nxt


# -- the other operations: (request, answer) codecs ---------------------------------------
def encode_write(spec: CollectionSpec, uid: str, by_shard: dict[int, list[Incoming]]
                 ) -> dict[str, Any]:
    return {"spec": spec.to_json(), "uid": uid, "writes": encode_writes(by_shard)}


def encode_write_result(out: WriteResult) -> dict[str, Any]:
    return {"shards": {str(s): list(v) for s, v in out.items()}}


def decode_write_result(raw: dict[str, Any], shards: int) -> WriteResult:
    """A replica's acknowledgement; its counts reach the client's answer, so they are bounded
    like everything from a peer."""
    return {parse_uint(s, shards - 1, "shard"):
            (checked_int(v[0], 0, MAX_COUNT, "count"), checked_int(v[1], 0, MAX_COUNT, "count"))
            for s, v in raw["shards"].items()}


def encode_doc(hit: Hit | None) -> dict[str, Any]:
    return {"doc": None if hit is None else encode_hits([[hit]], True, True)[0][0]}


def decode_doc(raw: Any) -> Hit | None:
    if raw is None or raw.get("doc") is None:
        return None
    return decode_hits([[raw["doc"]]])[0][0]


def encode_stats(stats: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {str(s): v for s, v in stats.items()}


INDEX_STATES = ("buffering", "training", "trained")


def decode_stats(raw: Any) -> dict[int, dict[str, Any]]:
    """A peer's per-shard stats, checked (BoundsError otherwise): they reach the client."""
    if not isinstance(raw, dict):
        raise BoundsError("shard stats are an object")
    out: dict[int, dict[str, Any]] = {}
    for s, v in raw.items():
        shard = parse_uint(s, MAX_SHARDS - 1, "shard")
        if not isinstance(v, dict) or v.get("index_state") not in INDEX_STATES:
            raise BoundsError("a shard's stats name its index_state")
        out[shard] = {**v, "count": checked_int(v.get("count"), 0, MAX_COUNT, "count")}
    return out


def encode_page(shard: int, docs: list[Incoming], nxt: str | None) -> dict[str, Any]:
    return {"writes": encode_writes({shard: docs}), "next": nxt}


def decode_records(raw: dict[str, Any], shard: int, spec: CollectionSpec) -> list[Incoming]:
    return decode_writes(raw["writes"], spec.dim, spec.shards).get(shard, [])


class RemoteReplica:
    """A peer's copies, through its internal routes. `addr_of` says where the node is now
    (None: not a member, or no longer). An answer of hits is read up to what they may hold
    (`frames.hits_answer_bound`: each document's metadata at most MAX_DOCUMENT_METADATA)."""

    def __init__(
        self, node: str, addr_of: Callable[[str], str | None], peers: PeerClient,
        timeout_s: float,
    ) -> None:
        self.node = node
        self._addr_of = addr_of
        self._peers = peers
        self._timeout_s = timeout_s
        self._coalescer = Coalescer()

    async def _ask(self, method: str, name: str, op: str, body: Any = None,
                   timeout: float | None = None) -> Any:  # noqa: ASYNC109
        addr = self._addr_of(self.node)
        if addr is None:
            raise Unavailable(f"node {self.node} is unknown")
        return await self._peers.request(
            addr, method, collection_path(name, op), body, to=self.node,
            timeout=self._timeout_s if timeout is None else timeout,
        )

    async def _frame(self, name: str, op: str, raw: bytes, max_answer: int,
                     timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """The peer's answer to a frame, which may be at most `max_answer` bytes (what the
        frame can legitimately be answered with)."""
        addr = self._addr_of(self.node)
        if addr is None:
            raise Unavailable(f"node {self.node} is unknown")
        return await self._peers.request(
            addr, "POST", collection_path(name, op), None, to=self.node, raw=raw,
            timeout=self._timeout_s if timeout is None else timeout, max_answer=max_answer,
        )

    def _hits(self, answer: Any, nq: int, k: int, flags: int, dim: int, shards: list[int],
              op: str) -> frames.HitsFrame:
        """A peer's hits frame, checked; anything else from it is the node's failure (another
        replica may answer), not the client's."""
        if not isinstance(answer, bytes):
            raise PeerError(f"node {self.node} answered {op} with something else than a frame")
        try:
            return frames.decode_hits(answer, nq, k, flags, dim, shards)
        except FrameError as exc:
            raise PeerError(f"node {self.node} answered {op} with a bad frame: {exc}") from None

    @contextlib.contextmanager
    def _malformed(self, op: str) -> Iterator[None]:
        """A peer's answer that does not decode is the node's failure (another replica may
        answer), not an unhandled error of the client's request."""
        try:
            yield
        except (ValueError, KeyError, TypeError) as exc:
            raise PeerError(f"node {self.node} answered {op} with a bad answer: {exc}") from None

    async def _object(self, name: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = await self._ask("POST", name, op, body)
        if not isinstance(raw, dict):
            raise Unavailable(f"node {self.node} answered {op} with something else than an object")
        return raw

    async def write(
        self, spec: CollectionSpec, uid: str, by_shard: dict[int, list[Incoming]]
    ) -> WriteResult:
        frame = frames.encode_write(spec.to_json(), uid, spec.dim, by_shard)
        raw = await self._frame(spec.name, "write", frame,
                                frames.write_answer_bound(len(by_shard)))
        if not isinstance(raw, dict):
            raise PeerError(f"node {self.node} answered a write with something else than JSON")
        return decode_write_result(raw, spec.shards)

    async def get(self, spec: CollectionSpec, shard: int, doc_id: str) -> Hit | None:
        both = frames.WITH_METADATA | frames.WITH_VECTOR
        answer = await self._frame(spec.name, "get", frames.encode_get(shard, doc_id),
                                   frames.hits_answer_bound(1, 1, both, spec.dim,
                                                            MAX_DOCUMENT_METADATA))
        rows = self._hits(answer, 1, 1, both, spec.dim, [-1, shard], "get").rows
        return rows[0][0] if rows[0] else None

    async def search(
        self, spec: CollectionSpec, req: SearchRequest, shards: list[int], budget: float,
        plans: dict[int, dict[str, Any]] | None = None,
        *,
        inline: bool = False,  # the peer decides for itself
    ) -> list[list[Hit]]:
        flags = (frames.WITH_METADATA * req.include_metadata
                 | frames.WITH_VECTOR * req.include_vector | frames.EXPLAIN * req.explain)

        async def send(vectors: np.ndarray, budget: float) -> tuple[list[list[Hit]], object]:
            frame = frames.encode_search(vectors, req.k, req.nprobe, shards, req.filter, flags,
                                          req.recall)
            bound = frames.hits_answer_bound(len(vectors), req.k, flags, spec.dim,
                                             MAX_DOCUMENT_METADATA)
            answer = await self._frame(spec.name, "search", frame, bound, budget)
            got = self._hits(answer, len(vectors), req.k, flags, spec.dim, shards, "search")
            return got.rows, got.plans

        if plans is None or req.filter is None:
            # Searches alike but for their vectors share a request (see coalesce.py). Their
            # plans are each caller's: an unfiltered search's plans (how each shard was
            # searched, the nprobe a search by recall picked) do not depend on the query
            # vectors, so a batch's are every one of its searches'. A filtered one's do (the
            # matches, the probes each query took): with plans asked for, it goes alone.
            key = (spec, tuple(shards), req.k, req.nprobe, req.recall, flags,
                   orjson.dumps(req.filter))
            rows, shared = await self._coalescer.search(key, req.vectors, budget, send,
                                                        max(1, MAX_QUERY_RESULTS // req.k))
        else:
            rows, shared = await send(req.vectors, budget)
        if plans is not None and (req.explain or req.recall is not None):
            plans.update(decode_plans(shared or [], shards))
        return rows

    async def count(
        self, spec: CollectionSpec, req: CountRequest, shards: list[int], budget: float
    ) -> dict[int, int]:
        raw = await self._ask("POST", spec.name, "count", encode_count(req, shards), budget)
        with self._malformed("count"):
            return decode_counts(raw, shards)

    async def scroll(
        self, spec: CollectionSpec, req: ScrollRequest, shard: int, after: str | None,
        limit: int, budget: float,
    ) -> tuple[list[Hit], str | None]:
        raw = await self._ask("POST", spec.name, "scroll",
                              encode_scroll(req, shard, after, limit), budget)
        with self._malformed("scroll"):
            return decode_page_of(raw, spec, shard, after, limit, req.include_vector)

    async def stats(
        self, name: str, timeout: float | None = None  # noqa: ASYNC109
    ) -> dict[int, dict[str, Any]]:
        return decode_stats(await self._ask("GET", name, "stats", timeout=timeout))

    async def stream(
        self, spec: CollectionSpec, shard: int, after: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        raw = await self._object(spec.name, "stream",
                                 {"shard": shard, "after": after, "limit": limit})
        return decode_records(raw, shard, spec), raw["next"]

    async def digests(self, spec: CollectionSpec, shard: int, buckets: int) -> list[str]:
        raw = await self._object(spec.name, "digests", {"shard": shard, "buckets": buckets})
        return list(raw["digests"])

    async def bucket_records(
        self, spec: CollectionSpec, shard: int, wanted: list[int], buckets: int
    ) -> list[Incoming]:
        raw = await self._object(spec.name, "buckets",
                                 {"shard": shard, "buckets": wanted, "of": buckets})
        return decode_records(raw, shard, spec)

    async def purge(self, spec: CollectionSpec, shard: int, before: int) -> int:
        raw = await self._object(spec.name, "purge", {"shard": shard, "before": before})
        with self._malformed("purge"):
            return checked_int(raw.get("purged"), 0, MAX_COUNT, "purged")

    async def drop_shard(self, name: str, shard: int) -> None:
        if self._addr_of(self.node) is None:
            return  # gone: its copy goes with it, or is dropped as an orphan if it returns
        await self._ask("POST", name, "drop_shard", {"shard": shard})


class PeerService:
    """The serving side of the internal routes (push-pull aside, which is gossip's): checks
    and decodes a peer's request against this node's own map (a peer's word is never taken
    for a collection's settings or incarnation), asks this node's replica, encodes the
    answer. A malformed field raises ValueError (BoundsError), KeyError or TypeError: 400."""

    def __init__(
        self, node_id: str, local: Replica, state: ClusterState,
        merge: Callable[[list[CollectionEntry]], object], hlc: HybridClock,
    ) -> None:
        self.node_id = node_id
        self.local = local
        self.state = state
        self._merge = merge  # adopts entries into the cluster state (ClusterRuntime.merge)
        self.hlc = hlc

    def _spec(self, name: str) -> CollectionSpec:
        """The collection's spec in this node's own map."""
        name = check_name(name)
        entry = self.state.get(name)
        if entry is None:
            raise NotFound(f"collection {name!r} does not exist")
        return entry.spec

    def state_push(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, list):
            raise BoundsError("cluster state is a list of entries")
        self._merge([CollectionEntry.from_json(d).check_routable() for d in body])
        return {"epoch": self.state.epoch}

    async def write(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        name = check_name(name)
        # What the coordinator believes the collection is: only compared with this node's map.
        expect_spec = None
        if body.get("spec") is not None:
            expect_spec = CollectionSpec.from_json(body["spec"])
            if expect_spec.name != name:
                raise BadRequest(f"the spec names {expect_spec.name!r}, the path {name!r}")
        uid = body.get("uid")
        expect_uid = None if uid is None else checked_str(uid, MAX_UID_CHARS, "uid")
        entry = self.state.entry_for_write(name, expect_uid, expect_spec)
        by_shard = decode_writes(body.get("writes"), entry.spec.dim, entry.spec.shards)
        for docs in by_shard.values():
            for d in docs:
                self.hlc.observe(d.version)
        return encode_write_result(await self.local.write(entry.spec, entry.uid, by_shard))

    async def search(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec(name)
        req, shards = decode_search(body, spec)
        # A search by recall answers with its plans too: they say the nprobe used.
        plans: dict[int, dict[str, Any]] | None = (
            {} if req.explain or req.recall is not None else None)
        rows = await self.local.search(spec, req, shards, 0.0, plans)
        return encode_rows(rows, req, plans)

    # -- the binary frames of the hot paths (the JSON forms above and below stay served) ---
    async def search_frame(self, name: str, raw: bytes) -> bytes:
        spec = self._spec(name)
        f = frames.decode_search(raw, spec.dim, spec.shards)
        req = SearchRequest(
            vectors=f.vectors, k=f.k, nprobe=f.nprobe, filter=f.filter,
            predicate=parse_filter(f.filter),
            include_metadata=bool(f.flags & frames.WITH_METADATA),
            include_vector=bool(f.flags & frames.WITH_VECTOR),
            allow_partial=True, timeout_ms=None, explain=bool(f.flags & frames.EXPLAIN),
            recall=f.recall,
        )
        # A search by recall answers with its plans too: they say the nprobe used.
        plans: dict[int, dict[str, Any]] | None = (
            {} if req.explain or req.recall is not None else None)
        # Inline when small: the hop to a search thread costs more than such a sub-search.
        rows = await self.local.search(spec, req, f.shards, 0.0, plans, inline=True)
        return frames.encode_hits(rows, f.flags, spec.dim,
                                  None if plans is None else [plans[s] for s in sorted(plans)])

    async def write_frame(self, name: str, raw: bytes) -> dict[str, Any]:
        name = check_name(name)
        f = frames.decode_write(raw)
        expect_spec = None if f.spec is None else CollectionSpec.from_json(f.spec)
        if expect_spec is not None and expect_spec.name != name:
            raise BadRequest(f"the spec names {expect_spec.name!r}, the path {name!r}")
        entry = self.state.entry_for_write(name, f.uid, expect_spec)
        if f.dim != entry.spec.dim or any(s >= entry.spec.shards for s in f.by_shard):
            raise FrameError("the write does not fit the collection's dimension and shards")
        for docs in f.by_shard.values():
            for d in docs:
                self.hlc.observe(d.version)
        return encode_write_result(await self.local.write(entry.spec, entry.uid, f.by_shard))

    async def get_frame(self, name: str, raw: bytes) -> bytes:
        spec = self._spec(name)
        shard, doc_id = frames.decode_get(raw, spec.shards)
        hit = await self.local.get(spec, shard, doc_id)
        both = frames.WITH_METADATA | frames.WITH_VECTOR
        return frames.encode_hits([[] if hit is None else [hit]], both, spec.dim)

    async def frame_op(self, op: str, name: str, raw: bytes) -> Any:
        """Serve a binary frame to a replica operation: the answer's frame (bytes), or a small
        JSON answer (a write's acknowledgement)."""
        handler = _FRAME_OPS.get(op)
        if handler is None:
            raise BadRequest(f"operation {op!r} takes JSON, not a frame")
        return await handler(self, name, raw)

    async def get(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec(name)
        doc_id = body.get("id")
        if not valid_id(doc_id):
            raise BadRequest(f"'id' must be a string of 1 to {MAX_ID_CHARS} characters")
        return encode_doc(await self.local.get(spec, _shard(body, spec), doc_id))

    async def count(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec(name)
        req, shards = decode_count(body, spec)
        return encode_counts(await self.local.count(spec, req, shards, 0.0))

    async def scroll(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec(name)
        req, shard, after, limit = decode_scroll(body, spec)
        docs, nxt = await self.local.scroll(spec, req, shard, after, limit, 0.0)
        return encode_page_of(docs, nxt, req.include_vector)

    async def stats(self, name: str) -> dict[str, Any]:
        return encode_stats(await self.local.stats(check_name(name)))

    async def stream(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec(name)
        shard = _shard(body, spec)
        after = body.get("after")
        if after is not None and not valid_id(after):
            raise BadRequest("'after' is a document id or null")
        limit = checked_int(body.get("limit", 1000), 1, MAX_STREAM_LIMIT, "limit")
        docs, nxt = await self.local.stream(spec, shard, after, limit)
        return encode_page(shard, docs, nxt)

    async def digests(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec(name)
        buckets = checked_int(body.get("buckets"), 1, MAX_DIGEST_BUCKETS, "buckets")
        return {"digests": await self.local.digests(spec, _shard(body, spec), buckets)}

    async def buckets(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec(name)
        shard = _shard(body, spec)
        of = checked_int(body.get("of"), 1, MAX_DIGEST_BUCKETS, "of")
        wanted = [checked_int(b, 0, of - 1, "bucket")
                  for b in checked_list(body.get("buckets"), of, "buckets")]
        docs = await self.local.bucket_records(spec, shard, wanted, of)
        return {"writes": encode_writes({shard: docs})}

    async def purge(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec(name)
        before = checked_int(body.get("before"), 0, MAX_VERSION, "before")
        return {"purged": await self.local.purge(spec, _shard(body, spec), before)}

    async def drop_shard(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        # The collection may be gone from the map already: bound by the largest shard count.
        shard = checked_int(body.get("shard"), 0, MAX_SHARDS - 1, "shard")
        await self.local.drop_shard(check_name(name), shard)
        return {"dropped": True}

    async def handle(self, method: str, path: str, body: Any, raw: bytes | None = None) -> Any:
        """Serve a decoded request (or a frame: `raw`) to an internal route (the in-process
        network's entry point; over HTTP, node.http.internal_api routes each path itself)."""
        if raw is not None:
            name, _, op = path.removeprefix(COLLECTION_PREFIX).partition("/")
            if method != "POST" or not path.startswith(COLLECTION_PREFIX):
                raise NotFound(f"no frame route {method} {path}")
            return await self.frame_op(op, name, raw)
        if (method, path) == ("POST", STATE_PATH):
            return self.state_push(body)
        if not path.startswith(COLLECTION_PREFIX):
            raise NotFound(f"no route {method} {path}")
        name, _, op = path[len(COLLECTION_PREFIX):].partition("/")
        if (method, op) == ("GET", "stats"):
            return await self.stats(name)
        if method != "POST":
            raise BadRequest(f"{method} is not allowed on {path}")
        return await self.collection_op(op, name, body)

    async def collection_op(self, op: str, name: str, body: Any) -> Any:
        """Dispatch by route name (the in-process network's entry point)."""
        if op == "stats":
            return await self.stats(name)
        handler = _OPS.get(op)
        if handler is None:
            raise NotFound(f"no internal operation {op!r}")
        if not isinstance(body, dict):
            raise ValueError("a peer request body is a JSON object")
        return await handler(self, name, body)


_OPS = {
    "write": PeerService.write,
    "search": PeerService.search,
    "count": PeerService.count,
    "scroll": PeerService.scroll,
    "get": PeerService.get,
    "stream": PeerService.stream,
    "digests": PeerService.digests,
    "buckets": PeerService.buckets,
    "purge": PeerService.purge,
    "drop_shard": PeerService.drop_shard,
}

_FRAME_OPS = {
    "search": PeerService.search_frame,
    "write": PeerService.write_frame,
    "get": PeerService.get_frame,
}

# The POST routes of replica operations (`collection_path(name, op)`); stats is a GET.
COLLECTION_OPS = tuple(_OPS)


def _shard(body: dict[str, Any], spec: CollectionSpec) -> int:
    return checked_int(body.get("shard"), 0, spec.shards - 1, "shard")
