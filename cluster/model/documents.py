"""Documents as the cluster layer handles them: a write on its way to a replica (`Incoming`)
and a search hit (`Hit`); their wire form is `cluster.replication.remote`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.bounds import MAX_ANSWER_METADATA
from aquila.cluster.model.errors import BadRequest


def json_bytes(obj: Any) -> bytes:
    """`orjson.dumps`, for JSON kept in memory: orjson's result holds on to its whole initial
    buffer (about 4 KiB) however short the JSON, and a shard keeps every live document's
    metadata, so each replicated or moved document cost 4 KiB of RAM instead of its length.
    A copy of exactly its length."""
    return bytes(memoryview(orjson.dumps(obj)))


@dataclass(slots=True)
class Incoming:
    """A document write as it reaches a replica: already validated and versioned."""

    id: str
    vector: np.ndarray | None  # float32 row; None for a delete (tombstone)
    metadata: bytes  # a JSON object, serialised
    version: int
    writer: str  # node id of the coordinator that versioned it (last-writer-wins tie-break)


@dataclass(slots=True)
class Hit:
    id: str
    score: float
    metadata: bytes  # the stored JSON object
    vector: bytes  # float32 little-endian
    shard: int = -1  # the shard it came from (fan-out keeps one answer per shard)


def hit_json(h: Hit, metadata: bool, vector: bool) -> dict[str, Any]:
    """A hit as the public API shows it."""
    out: dict[str, Any] = {"id": h.id, "score": h.score}
    if metadata:
        out["metadata"] = orjson.Fragment(h.metadata or b"{}")
    if vector:
        out["vector"] = np.frombuffer(h.vector, dtype="<f4").tolist()
    return out


# An answer's hits weighed by what their JSON costs to build (a vector's floats count an
# eighth each): above this, it is built on a thread, not on the loop. 100 queries of k
# 1,000 with vectors of dim 32 held a node's loop 1.2 s (`hit_json` and the response's
# serialisation); 100,000 hits without vectors, 0.13 s.
RESULTS_ON_THREAD = 20_000


def answer_weight(rows: list[list[Hit]], dim: int, vector: bool) -> int:
    return sum(map(len, rows)) * (1 + dim // 8 if vector else 1)


def check_answer_metadata(rows: list[list[Hit]]) -> None:
    """Refuse (400) an answer with more than `MAX_ANSWER_METADATA` bytes of metadata, before
    any of it is built: 1,000 documents of 1 MiB of metadata each, found by each of 100
    queries, would be 100 GiB of JSON."""
    total = sum(len(h.metadata) for row in rows for h in row)
    if total > MAX_ANSWER_METADATA:
        raise BadRequest(
            f"the answer would hold {total:,} bytes of metadata, over the limit of "
            f"{MAX_ANSWER_METADATA:,}: ask for fewer results or leave 'metadata' out of include")


def results_json(rows: list[list[Hit]], metadata: bool, vector: bool) -> list[list[Any]]:
    """Each query's hits as the public API shows them."""
    return [[hit_json(h, metadata, vector) for h in row] for row in rows]


@dataclass(frozen=True)
class Found:
    """A local search's answer before its documents are read (`ShardBackend.search_found`):
    per query row, the scores best first, the backend's keys of the hits (-1: one left out
    since, by a hedge's cut) and each hit's shard, as plain lists (a few hits a query: lists
    cost less than arrays here, and the merge takes them one by one). Only the hits
    that survive the merge with the other nodes' are then read (`ShardBackend.read_found`):
    a coordinator keeps about a third of its own k hits per query on three nodes, and
    reading a hit's id and record is most of what resolving it costs. `token`: what the
    backend needs to tell whether its keys still mean the documents they meant."""

    scores: list[list[float]]
    keys: list[list[int]]
    shards: list[list[int]]
    token: object = None


class StaleFound(Exception):  # noqa: N818 - a condition, not a failure
    """`read_found`: the keys may no longer name the documents the search found (the backend
    gave some of their labels to other documents since); the caller searches again."""
