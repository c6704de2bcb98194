"""Documents as they travel between coordinator and replicas."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from cluster.bounds import (
    MAX_NODE_ID_CHARS,
    MAX_VERSION,
    BoundsError,
    checked_int,
    checked_list,
    checked_str,
)
from cluster.requests import valid_id
from cluster.spec import MAX_SHARDS


@dataclass
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
                if not np.isfinite(vec).all():
                    raise ValueError(f"vector of {d['id']!r} is not finite")
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
        return orjson.dumps(meta)
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


def hit_json(h: Hit, metadata: bool, vector: bool) -> dict[str, Any]:
    """A hit as the public API shows it."""
    out: dict[str, Any] = {"id": h.id, "score": h.score}
    if metadata:
        out["metadata"] = orjson.Fragment(h.metadata or b"{}")
    if vector:
        out["vector"] = np.frombuffer(h.vector, dtype="<f4").tolist()
    return out
