"""The binary frames of the peer protocol's hot paths (search, write, get): both ends' codecs.

One framing for all: a version byte, a kind byte, then the kind's fields, little-endian.
Vectors and scores travel as raw arrays (float32, float64), ids, writers and metadata as
length-prefixed bytes in columns (all the lengths, then all the bytes), which the receiving
end slices without parsing; the few structured parts (a filter, a spec, the plans that explain
a search) stay small JSON parts. A frame is read exactly: every count, length and number is
bounded before it is used (`model.bounds`, and what the request asked for), and a frame that
is truncated, too long, of another version or kind raises `FrameError` (a 400 to a peer that
sent it; the coordinator treats a malformed answer as the node's failure).

`remote.py` maps requests and answers to these frames; the peer routes tell them from JSON by
their content type (FRAME_TYPE).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.bounds import (
    MAX_NODE_ID_CHARS,
    MAX_NPROBE,
    MAX_QUERIES,
    MAX_QUERY_RESULTS,
    MAX_UID_CHARS,
    MAX_VERSION,
)
from aquila.cluster.model.documents import Hit, Incoming
from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.operations import MAX_ID_CHARS, MAX_K
from aquila.cluster.model.spec import MAX_SHARDS
from aquila.cluster.peers.client import FRAME_TYPE as FRAME_TYPE  # the routes' content type

VERSION = 1

SEARCH, HITS, WRITE, GET = 1, 2, 3, 4
# Flags of a search request and of a hits answer.
WITH_METADATA, WITH_VECTOR, EXPLAIN = 1, 2, 4

# Bytes of an id and of a writer (UTF-8: up to 4 per character), of the JSON parts.
_MAX_ID_BYTES = 4 * MAX_ID_CHARS
_MAX_WRITER_BYTES = 4 * MAX_NODE_ID_CHARS
MAX_JSON_PART = 1 << 20
# Documents in one write frame (a node sends batches of at most 10,000 per request).
MAX_WRITE_DOCS = 1 << 20
MAX_DIM = 65_536


class FrameError(BadRequest):
    """A frame that is not one: truncated, trailing bytes, another version or kind, or a field
    out of bounds."""


class _Reader:
    """Reads a frame front to back; every read is checked against the bytes left."""

    def __init__(self, buf: bytes, kind: int) -> None:
        self.buf = memoryview(buf)
        self.pos = 0
        if len(buf) < 2:
            raise FrameError("truncated frame: no header")
        if buf[0] != VERSION:
            raise FrameError(f"frame version {buf[0]} is not {VERSION}")
        if buf[1] != kind:
            raise FrameError(f"frame kind {buf[1]} where {kind} was expected")
        self.pos = 2

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise FrameError(f"truncated frame: {what} runs past its end")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, what))

    def uint(self, fmt: str, lo: int, hi: int, what: str) -> int:
        value = int(self.unpack(fmt, what)[0])
        if not lo <= value <= hi:
            raise FrameError(f"{what} must be from {lo} to {hi}, got {value}")
        return value

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(size * count, what), dtype=dtype)

    def strings(self, count: int, max_bytes: int, what: str, least: int = 1) -> list[str]:
        """A column of `count` strings: their lengths (u16), then their UTF-8 bytes."""
        lens = self.array("<u2", count, f"{what} lengths")
        if count and (int(lens.max()) > max_bytes or int(lens.min()) < least):
            raise FrameError(f"{what} must be {least} to {max_bytes} bytes")
        blob = bytes(self.take(int(lens.sum(dtype=np.int64)), what))
        ends = np.cumsum(lens, dtype=np.int64).tolist()
        try:
            return [blob[a:b].decode() for a, b in zip(_starts(ends), ends, strict=True)]
        except UnicodeDecodeError:
            raise FrameError(f"{what} is not UTF-8") from None

    def blobs(self, count: int, what: str) -> list[bytes]:
        """A column of `count` byte strings: their lengths (u32), then the bytes."""
        lens = self.array("<u4", count, f"{what} lengths")
        blob = bytes(self.take(int(lens.sum(dtype=np.int64)), what))
        ends = np.cumsum(lens, dtype=np.int64).tolist()
        return [blob[a:b] for a, b in zip(_starts(ends), ends, strict=True)]

    def json(self, what: str) -> Any:
        """A JSON part (u32 length; empty: None)."""
        n = self.uint("I", 0, MAX_JSON_PART, f"{what} length")
        if n == 0:
            return None
        try:
            return orjson.loads(bytes(self.take(n, what)))
        except orjson.JSONDecodeError as exc:
            raise FrameError(f"{what} is not JSON: {exc}") from None

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise FrameError(f"{len(self.buf) - self.pos} byte(s) after the end of the frame")


def _starts(ends: list[int]) -> list[int]:
    """Where the pieces that end at `ends` start."""
    return [0, *ends[:-1]] if ends else []


def _json_part(value: Any) -> bytes:
    raw = b"" if value is None else orjson.dumps(value)
    return struct.pack("<I", len(raw)) + raw


def _strings(values: list[str]) -> bytes:
    raw = [v.encode() for v in values]
    return np.fromiter(map(len, raw), "<u2", len(raw)).tobytes() + b"".join(raw)


def _blobs(values: list[bytes]) -> bytes:
    return np.fromiter(map(len, values), "<u4", len(values)).tobytes() + b"".join(values)


# -- search ---------------------------------------------------------------------------------
@dataclass
class SearchFrame:
    vectors: np.ndarray  # nq × dim float32
    k: int
    nprobe: int | None
    shards: list[int]
    filter: Any
    flags: int


def encode_search(vectors: np.ndarray, k: int, nprobe: int | None, shards: list[int],
                  flt: Any, flags: int) -> bytes:
    nq, dim = vectors.shape
    return b"".join((
        struct.pack("<BBIIIIBH", VERSION, SEARCH, nq, dim, k, nprobe or 0, flags, len(shards)),
        np.asarray(shards, dtype="<u2").tobytes(),
        _json_part(flt),
        np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
    ))


def decode_search(buf: bytes, dim: int, shards: int) -> SearchFrame:
    """A search of a collection of this dimension and shard count, every field bounded."""
    r = _Reader(buf, SEARCH)
    nq = r.uint("I", 1, MAX_QUERIES, "nq")
    if r.uint("I", 0, MAX_DIM, "dim") != dim:
        raise FrameError(f"the query vectors are not of the collection's dimension {dim}")
    # A search by stored documents asks for one more hit than the client.
    k = r.uint("I", 1, MAX_K + 1, "k")
    if nq * k > MAX_QUERY_RESULTS + nq:
        raise FrameError(f"nq × k must be at most {MAX_QUERY_RESULTS} (+ nq)")
    nprobe = r.uint("I", 0, MAX_NPROBE, "nprobe")
    flags = r.uint("B", 0, WITH_METADATA | WITH_VECTOR | EXPLAIN, "flags")
    n = r.uint("H", 0, shards, "shard count")
    wanted = r.array("<u2", n, "shards")
    if n and int(wanted.max()) >= shards:
        raise FrameError(f"shards must be below {shards}")
    flt = r.json("filter")
    vectors = r.array("<f4", nq * dim, "vectors").reshape(nq, dim)
    r.end()
    if not np.isfinite(vectors).all():
        raise FrameError("query vectors must be finite")
    return SearchFrame(vectors, k, nprobe or None, wanted.tolist(), flt, flags)


# -- hits: a search's answer, and a get's -----------------------------------------------------
def encode_hits(rows: list[list[Hit]], flags: int, dim: int, plans: Any = None) -> bytes:
    hits = [h for row in rows for h in row]
    total = len(hits)
    parts = [
        struct.pack("<BBIIBI", VERSION, HITS, len(rows), dim if flags & WITH_VECTOR else 0,
                    flags & (WITH_METADATA | WITH_VECTOR), total),
        np.fromiter(map(len, rows), "<u4", len(rows)).tobytes(),
        np.fromiter((h.score for h in hits), "<f8", total).tobytes(),
        np.fromiter((h.shard for h in hits), "<i2", total).tobytes(),  # -1: not said
        _strings([h.id for h in hits]),
    ]
    if flags & WITH_METADATA:
        parts.append(_blobs([h.metadata or b"{}" for h in hits]))
    if flags & WITH_VECTOR:
        parts.extend(h.vector for h in hits)
    parts.append(_json_part(plans))
    return b"".join(parts)


@dataclass
class HitsFrame:
    rows: list[list[Hit]]
    plans: Any


def decode_hits(buf: bytes, nq: int, k: int, flags: int, dim: int,
                shards: list[int]) -> HitsFrame:
    """A replica's answer to a search of `nq` queries for `k` hits each, with the metadata and
    vectors `flags` asked for, from these shards (a get's: [-1]): checked before it reaches a
    client."""
    r = _Reader(buf, HITS)
    r.uint("I", nq, nq, "query count")
    want = flags & (WITH_METADATA | WITH_VECTOR)
    r.uint("I", dim if want & WITH_VECTOR else 0, dim if want & WITH_VECTOR else 0, "dim")
    r.uint("B", want, want, "flags")
    total = r.uint("I", 0, nq * k, "hit count")
    counts = r.array("<u4", nq, "counts")
    if nq and (int(counts.max()) > k or int(counts.sum(dtype=np.int64)) != total):
        raise FrameError(f"a row holds more than {k} hits, or the rows do not add up")
    scores = r.array("<f8", total, "scores")
    of = r.array("<i2", total, "shards")
    if total and not np.isin(of, shards).all():
        raise FrameError("a hit names a shard that was not asked for")
    if not np.isfinite(scores).all():
        raise FrameError("scores must be finite")
    ids = r.strings(total, _MAX_ID_BYTES, "ids")
    if any(len(i) > MAX_ID_CHARS for i in ids):
        raise FrameError(f"ids have at most {MAX_ID_CHARS} characters")
    metas = r.blobs(total, "metadata") if want & WITH_METADATA else [b"{}"] * total
    vecs = bytes(r.take(4 * dim * total, "vectors")) if want & WITH_VECTOR else b""
    plans = r.json("plans")
    r.end()
    step = 4 * dim
    hits = [Hit(i, s, m, vecs[j * step : (j + 1) * step] if vecs else b"", sh)
            for j, (i, s, m, sh) in enumerate(zip(ids, scores.tolist(), metas, of.tolist(),
                                                  strict=True))]
    ends = np.cumsum(counts, dtype=np.int64).tolist()
    return HitsFrame([hits[a:b] for a, b in zip(_starts(ends), ends, strict=True)], plans)


# -- write ------------------------------------------------------------------------------------
@dataclass
class WriteFrame:
    spec: Any  # the sender's spec of the collection, as JSON (compared, never adopted)
    uid: str | None
    dim: int  # of the vectors
    by_shard: dict[int, list[Incoming]]


def encode_write(spec: Any, uid: str | None, dim: int,
                 by_shard: dict[int, list[Incoming]]) -> bytes:
    parts = [struct.pack("<BB", VERSION, WRITE), _json_part(spec), _json_part(uid),
             struct.pack("<IH", dim, len(by_shard))]
    for shard, docs in by_shard.items():
        live = [d for d in docs if d.vector is not None]
        parts += [
            struct.pack("<HI", shard, len(docs)),
            _strings([d.id for d in docs]),
            np.fromiter((d.version for d in docs), "<u8", len(docs)).tobytes(),
            _strings([d.writer for d in docs]),
            np.fromiter((d.vector is not None for d in docs), "u1", len(docs)).tobytes(),
            b"".join(np.ascontiguousarray(d.vector, dtype="<f4").tobytes() for d in live),
            _blobs([d.metadata or b"{}" for d in live]),
        ]
    return b"".join(parts)


def decode_write(buf: bytes, dim: int | None = None, shards: int = MAX_SHARDS) -> WriteFrame:
    """A write batch: shard numbers below `shards`, valid ids, finite vectors of `dim` (None:
    of the dimension the frame says, checked by the caller against its map), metadata JSON
    objects, versions and writers within bounds."""
    r = _Reader(buf, WRITE)
    spec = r.json("spec")
    uid = r.json("uid")
    if uid is not None and (not isinstance(uid, str) or len(uid) > MAX_UID_CHARS):
        raise FrameError(f"uid is a string of at most {MAX_UID_CHARS} characters")
    fdim = r.uint("I", 1, MAX_DIM, "dim")
    if dim is not None and fdim != dim:
        raise FrameError(f"vectors must have the collection's dimension {dim}")
    by_shard: dict[int, list[Incoming]] = {}
    left = MAX_WRITE_DOCS
    for _ in range(r.uint("H", 0, MAX_SHARDS, "part count")):
        shard = r.uint("H", 0, shards - 1, "shard")
        n = r.uint("I", 1, left, "document count")
        left -= n
        ids = r.strings(n, _MAX_ID_BYTES, "ids")
        versions = r.array("<u8", n, "versions")
        if int(versions.max()) > MAX_VERSION:
            raise FrameError(f"versions must be at most {MAX_VERSION}")
        writers = r.strings(n, _MAX_WRITER_BYTES, "writers", least=0)
        live = r.array("u1", n, "live flags")
        if int(live.max()) > 1:
            raise FrameError("a live flag is 0 or 1")
        nlive = int(live.sum())
        vectors = r.array("<f4", nlive * fdim, "vectors").reshape(nlive, fdim)
        if not np.isfinite(vectors).all():
            raise FrameError("vectors must be finite")
        metas = r.blobs(nlive, "metadata")
        docs = []
        j = 0
        for i, doc_id in enumerate(ids):
            if len(doc_id) > MAX_ID_CHARS or len(writers[i]) > MAX_NODE_ID_CHARS:
                raise FrameError("an id or a writer is too long")
            if live[i]:
                docs.append(Incoming(doc_id, vectors[j], _metadata(metas[j], doc_id),
                                     int(versions[i]), writers[i]))
                j += 1
            else:
                docs.append(Incoming(doc_id, None, b"", int(versions[i]), writers[i]))
        if shard in by_shard:
            raise FrameError(f"shard {shard} appears twice")
        by_shard[shard] = docs
    r.end()
    return WriteFrame(spec, uid, fdim, by_shard)


def _metadata(meta: bytes, doc_id: str) -> bytes:
    """A document's metadata as the JSON path has it: an object, re-encoded (as deep as data
    stored by older versions may be, within what JSON encoding allows)."""
    try:
        obj = orjson.loads(meta)
        if isinstance(obj, dict):
            return orjson.dumps(obj)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        pass
    raise FrameError(f"metadata of {doc_id!r} is not a JSON object (or nests too deep)")


# -- get --------------------------------------------------------------------------------------
def encode_get(shard: int, doc_id: str) -> bytes:
    return struct.pack("<BBH", VERSION, GET, shard) + _strings([doc_id])


def decode_get(buf: bytes, shards: int) -> tuple[int, str]:
    r = _Reader(buf, GET)
    shard = r.uint("H", 0, shards - 1, "shard")
    (doc_id,) = r.strings(1, _MAX_ID_BYTES, "id")
    r.end()
    if len(doc_id) > MAX_ID_CHARS:
        raise FrameError(f"ids have at most {MAX_ID_CHARS} characters")
    return shard, doc_id
