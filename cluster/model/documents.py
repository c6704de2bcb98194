"""Documents as the cluster layer handles them: a write on its way to a replica (`Incoming`)
and a search hit (`Hit`); their wire form is `cluster.replication.remote`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson


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
