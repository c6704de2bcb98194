"""The replica protocol between nodes, both ends, and every wire format of the internal routes
in one place: a peer's `Replica` (`RemoteReplica`, over the peer client), the direct state
push, and the serving side (`PeerService`) that the HTTP routes (`node.http.internal_api`) and the
in-process network (`cluster.peers.memory`) hand decoded requests to.

Formats: JSON bodies; vectors as base64 float32 little-endian; metadata as raw JSON. A field
missing or of the wrong type raises KeyError / ValueError / TypeError, which the HTTP layer
answers with 400 (the sender may be another version, or not a node).
"""

from __future__ import annotations

import base64
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.documents import Hit, Incoming
from aquila.cluster.model.errors import BadRequest, NotFound, Unavailable
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.hlc import HybridClock
from aquila.cluster.model.operations import SearchRequest
from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.peers.client import (
    COLLECTION_PREFIX,
    STATE_PATH,
    PeerClient,
    collection_path,
)
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


def decode_writes(raw: list[dict[str, Any]], dim: int) -> dict[int, list[Incoming]]:
    by_shard: dict[int, list[Incoming]] = {}
    for part in raw:
        docs = []
        for d in part["docs"]:
            vec = None
            if d["v"] is not None:
                vec = np.frombuffer(base64.b64decode(d["v"]), dtype="<f4")
                if vec.shape != (dim,):
                    raise ValueError(f"vector of {d['id']!r} has the wrong dimension")
            docs.append(Incoming(d["id"], vec, orjson.dumps(d["m"]) if vec is not None else b"",
                                 int(d["ver"]), str(d["w"])))
        by_shard[int(part["shard"])] = docs
    return by_shard


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
             base64.b64decode(h[3]) if h[3] else b"", int(h[4]) if len(h) > 4 else -1)
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
    return {**body, "shards": shards}


def decode_search(body: dict[str, Any], dim: int) -> tuple[SearchRequest, list[int]]:
    vectors = np.frombuffer(base64.b64decode(body["vectors"]), dtype="<f4")
    include = body.get("include", ["metadata"])
    flt = body.get("filter")
    req = SearchRequest(
        vectors=vectors.reshape(int(body["nq"]), dim),
        k=int(body["k"]),
        nprobe=body.get("nprobe"),
        filter=flt,
        predicate=parse_filter(flt),
        include_metadata="metadata" in include,
        include_vector="vector" in include,
        allow_partial=True,
        timeout_ms=None,
    )
    return req, [int(s) for s in body["shards"]]


def encode_rows(rows: list[list[Hit]], req: SearchRequest) -> dict[str, Any]:
    return {"results": encode_hits(rows, req.include_metadata, req.include_vector)}


# -- the other operations: (request, answer) codecs ---------------------------------------
def encode_write(spec: CollectionSpec, uid: str, by_shard: dict[int, list[Incoming]]
                 ) -> dict[str, Any]:
    return {"spec": spec.to_json(), "uid": uid, "writes": encode_writes(by_shard)}


def encode_write_result(out: WriteResult) -> dict[str, Any]:
    return {"shards": {str(s): list(v) for s, v in out.items()}}


def decode_write_result(raw: dict[str, Any]) -> WriteResult:
    return {int(s): (int(v[0]), int(v[1])) for s, v in raw["shards"].items()}


def encode_doc(hit: Hit | None) -> dict[str, Any]:
    return {"doc": None if hit is None else encode_hits([[hit]], True, True)[0][0]}


def decode_doc(raw: Any) -> Hit | None:
    if raw is None or raw.get("doc") is None:
        return None
    return decode_hits([[raw["doc"]]])[0][0]


def encode_stats(stats: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {str(s): v for s, v in stats.items()}


def decode_stats(raw: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(s): v for s, v in raw.items()}


def encode_page(shard: int, docs: list[Incoming], nxt: str | None) -> dict[str, Any]:
    return {"writes": encode_writes({shard: docs}), "next": nxt}


def decode_records(raw: dict[str, Any], shard: int, dim: int) -> list[Incoming]:
    return decode_writes(raw["writes"], dim).get(shard, [])


class RemoteReplica:
    """A peer's copies, through its internal routes. `addr_of` says where the node is now
    (None: not a member, or no longer)."""

    def __init__(
        self, node: str, addr_of: Callable[[str], str | None], peers: PeerClient,
        timeout_s: float,
    ) -> None:
        self.node = node
        self._addr_of = addr_of
        self._peers = peers
        self._timeout_s = timeout_s

    async def _ask(self, method: str, name: str, op: str, body: Any = None,
                   timeout: float | None = None) -> Any:  # noqa: ASYNC109
        addr = self._addr_of(self.node)
        if addr is None:
            raise Unavailable(f"node {self.node} is unknown")
        return await self._peers.request(
            addr, method, collection_path(name, op), body, to=self.node,
            timeout=self._timeout_s if timeout is None else timeout,
        )

    async def _object(self, name: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = await self._ask("POST", name, op, body)
        if not isinstance(raw, dict):
            raise Unavailable(f"node {self.node} answered {op} with something else than an object")
        return raw

    async def write(
        self, spec: CollectionSpec, uid: str, by_shard: dict[int, list[Incoming]]
    ) -> WriteResult:
        raw = await self._ask("POST", spec.name, "write", encode_write(spec, uid, by_shard))
        return decode_write_result(raw)

    async def get(self, spec: CollectionSpec, shard: int, doc_id: str) -> Hit | None:
        return decode_doc(await self._ask("POST", spec.name, "get", {"shard": shard, "id": doc_id}))

    async def search(
        self, spec: CollectionSpec, req: SearchRequest, shards: list[int], budget: float
    ) -> list[list[Hit]]:
        out = await self._ask("POST", spec.name, "search", encode_search(req, shards), budget)
        return decode_hits(out["results"])

    async def stats(
        self, name: str, timeout: float | None = None  # noqa: ASYNC109
    ) -> dict[int, dict[str, Any]]:
        return decode_stats(await self._ask("GET", name, "stats", timeout=timeout))

    async def stream(
        self, spec: CollectionSpec, shard: int, after: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        raw = await self._object(spec.name, "stream",
                                 {"shard": shard, "after": after, "limit": limit})
        return decode_records(raw, shard, spec.dim), raw["next"]

    async def digests(self, spec: CollectionSpec, shard: int, buckets: int) -> list[str]:
        raw = await self._object(spec.name, "digests", {"shard": shard, "buckets": buckets})
        return list(raw["digests"])

    async def bucket_records(
        self, spec: CollectionSpec, shard: int, wanted: list[int], buckets: int
    ) -> list[Incoming]:
        raw = await self._object(spec.name, "buckets",
                                 {"shard": shard, "buckets": wanted, "of": buckets})
        return decode_records(raw, shard, spec.dim)

    async def purge(self, spec: CollectionSpec, shard: int, before: int) -> int:
        raw = await self._object(spec.name, "purge", {"shard": shard, "before": before})
        return int(raw["purged"])

    async def drop_shard(self, name: str, shard: int) -> None:
        if self._addr_of(self.node) is None:
            return  # gone: its copy goes with it, or is dropped as an orphan if it returns
        await self._ask("POST", name, "drop_shard", {"shard": shard})


class PeerService:
    """The serving side of the internal routes (push-pull aside, which is gossip's): decodes
    a peer's request, asks this node's replica, encodes the answer."""

    def __init__(
        self, node_id: str, local: Replica, state: ClusterState,
        merge: Callable[[list[CollectionEntry]], object], hlc: HybridClock,
    ) -> None:
        self.node_id = node_id
        self.local = local
        self.state = state
        self._merge = merge  # adopts entries into the cluster state (ClusterRuntime.merge)
        self.hlc = hlc

    def spec_of(self, name: str, raw: object = None) -> CollectionSpec:
        """The spec a request names (a write carries it: the target of a move may not know
        the collection yet), else the one in this node's map."""
        if isinstance(raw, dict):
            return CollectionSpec.from_json(raw)
        entry = self.state.get(name)
        if entry is None:
            raise NotFound(f"collection {name!r} does not exist")
        return entry.spec

    def state_push(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, list):
            raise ValueError("a state push is a list of entries")
        self._merge([CollectionEntry.from_json(d) for d in body])
        return {"epoch": self.state.epoch}

    async def write(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec_of(name, body.get("spec"))
        by_shard = decode_writes(body["writes"], spec.dim)
        for docs in by_shard.values():
            for d in docs:
                self.hlc.observe(d.version)
        out = await self.local.write(spec, str(body.get("uid", "")), by_shard)
        return encode_write_result(out)

    async def search(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec_of(name)
        req, shards = decode_search(body, spec.dim)
        rows = await self.local.search(spec, req, shards, 0.0)
        return encode_rows(rows, req)

    async def get(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec_of(name)
        return encode_doc(await self.local.get(spec, int(body["shard"]), str(body["id"])))

    async def stats(self, name: str) -> dict[str, Any]:
        return encode_stats(await self.local.stats(name))

    async def stream(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec_of(name)
        shard = int(body["shard"])
        docs, nxt = await self.local.stream(spec, shard, body.get("after"),
                                            int(body.get("limit", 1000)))
        return encode_page(shard, docs, nxt)

    async def digests(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec_of(name)
        out = await self.local.digests(spec, int(body["shard"]), int(body["buckets"]))
        return {"digests": out}

    async def buckets(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec_of(name)
        shard = int(body["shard"])
        docs = await self.local.bucket_records(
            spec, shard, [int(b) for b in body["buckets"]], int(body["of"])
        )
        return {"writes": encode_writes({shard: docs})}

    async def purge(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec_of(name)
        n = await self.local.purge(spec, int(body["shard"]), int(body["before"]))
        return {"purged": n}

    async def drop_shard(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        await self.local.drop_shard(name, int(body["shard"]))
        return {"dropped": True}

    async def handle(self, method: str, path: str, body: Any) -> Any:
        """Serve a decoded request to an internal route (the in-process network's entry
        point; over HTTP, node.http.internal_api routes each path itself)."""
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
    "get": PeerService.get,
    "stream": PeerService.stream,
    "digests": PeerService.digests,
    "buckets": PeerService.buckets,
    "purge": PeerService.purge,
    "drop_shard": PeerService.drop_shard,
}

# The POST routes of replica operations (`collection_path(name, op)`); stats is a GET.
COLLECTION_OPS = tuple(_OPS)
