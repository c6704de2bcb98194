"""The public operations of the API over this node's engine: validate, version, route to
shards, search, shape the answers. Handlers in `api.py` only parse and serialise.

On a one-node cluster every shard is local. The cluster coordinator wraps the same engine
calls with routing and fan-out.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import orjson

from cluster.errors import NotFound
from cluster.hlc import HybridClock
from cluster.requests import check_id, parse_documents, parse_ids, parse_search
from cluster.sharding import shard_of
from cluster.spec import CollectionSpec, check_name
from node.collection import Collection, Hit
from node.engine import Engine
from node.shard import Incoming


class LocalService:
    def __init__(self, engine: Engine, node_id: str) -> None:
        self.engine = engine
        self.node_id = node_id
        self.hlc = HybridClock()

    # -- collections ----------------------------------------------------------------------
    def describe(self, coll: Collection) -> dict[str, Any]:
        spec = coll.spec
        states = coll.shard_states()
        return {
            **spec.to_json(),
            "count": coll.count(),
            "shard_states": [
                {
                    "shard": s,
                    "replicas": [self.node_id],
                    "count": states[s]["count"],
                    "index_state": states[s]["index_state"],
                }
                for s in range(spec.shards)
                if s in states
            ],
        }

    async def create_collection(self, spec: CollectionSpec) -> tuple[dict[str, Any], bool]:
        created = await self.engine.create(spec, range(spec.shards))
        return self.describe(self.engine.get(spec.name)), created

    async def list_collections(self) -> list[dict[str, Any]]:
        return [self.describe(c) for _, c in sorted(self.engine.collections.items())]

    async def get_collection(self, name: str) -> dict[str, Any]:
        return self.describe(self.engine.get(check_name(name)))

    async def delete_collection(self, name: str) -> None:
        await self.engine.drop(check_name(name))

    # -- documents ------------------------------------------------------------------------
    async def upsert(self, name: str, body: Any) -> dict[str, Any]:
        coll = self.engine.get(check_name(name))
        batch = parse_documents(body, coll.spec.dim)
        by_shard: dict[int, list[Incoming]] = defaultdict(list)
        for doc_id, vec, meta in zip(batch.ids, batch.vectors, batch.metadata, strict=True):
            version = self.hlc.next()
            by_shard[shard_of(doc_id, coll.spec.shards)].append(
                Incoming(doc_id, vec, meta, version, self.node_id)
            )
        await coll.write(dict(by_shard))
        return {"ids": batch.ids, "upserted": len(batch.ids)}

    async def get_document(self, name: str, doc_id: str, with_vector: bool) -> dict[str, Any]:
        coll = self.engine.get(check_name(name))
        rec = await coll.get(shard_of(check_id(doc_id), coll.spec.shards), doc_id)
        if rec is None:
            raise NotFound(f"document {doc_id!r} does not exist in {name!r}")
        out: dict[str, Any] = {"id": doc_id, "metadata": orjson.Fragment(rec.metadata or b"{}")}
        if with_vector:
            out["vector"] = rec.vector_array().tolist()
        return out

    async def delete_documents(self, name: str, body: Any) -> int:
        coll = self.engine.get(check_name(name))
        return await self._delete(coll, parse_ids(body))

    async def delete_document(self, name: str, doc_id: str) -> None:
        coll = self.engine.get(check_name(name))
        if await self._delete(coll, [check_id(doc_id)]) == 0:
            raise NotFound(f"document {doc_id!r} does not exist in {name!r}")

    async def _delete(self, coll: Collection, ids: list[str]) -> int:
        by_shard: dict[int, list[Incoming]] = defaultdict(list)
        for doc_id in ids:
            by_shard[shard_of(doc_id, coll.spec.shards)].append(
                Incoming(doc_id, None, b"", self.hlc.next(), self.node_id)
            )
        _, deleted = await coll.write(dict(by_shard))
        return deleted

    # -- search ---------------------------------------------------------------------------
    async def search(self, name: str, body: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        coll = self.engine.get(check_name(name))
        req = parse_search(body, coll.spec.dim)
        rows = await coll.search(req.vectors, req.k, req.nprobe, req.predicate)
        return {
            "results": [
                [hit_json(h, req.include_metadata, req.include_vector) for h in row] for row in rows
            ],
            "partial": False,
            "missing_shards": [],
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
        }


def hit_json(h: Hit, metadata: bool, vector: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": h.id, "score": h.score}
    if metadata:
        out["metadata"] = orjson.Fragment(h.metadata or b"{}")
    if vector:
        out["vector"] = np.frombuffer(h.vector, dtype="<f4").tolist()
    return out
