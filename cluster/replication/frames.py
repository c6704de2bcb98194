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

import itertools
import math
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson

from aquila.cluster.model.bounds import (
    MAX_NODE_ID_CHARS,
    MAX_NPROBE,
    MAX_QUERIES,
    MAX_QUERY_RESULTS,
    MAX_UID_CHARS,
    MAX_VECTOR_VALUE,
    MAX_VERSION,
    vectors_within,
)
from aquila.cluster.model.documents import Hit, Incoming
from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.operations import MAX_ID_CHARS, MAX_K
from aquila.cluster.model.recall import check_target
from aquila.cluster.model.spec import MAX_SHARDS
from aquila.cluster.peers.client import FRAME_TYPE as FRAME_TYPE  # the routes' content type

VERSION = 1

SEARCH, HITS, WRITE, GET = 1, 2, 3, 4
# Flags of a search request and of a hits answer.
WITH_METADATA, WITH_VECTOR, EXPLAIN = 1, 2, 4
# Of a search request only: a target recall (float64) follows the shards, in place of nprobe.
BY_RECALL = 8

# Bytes of a JSON part.
MAX_JSON_PART = 1 << 20
# Documents in one write frame (a node sends batches of at most 10,000 per request).
MAX_WRITE_DOCS = 1 << 20
MAX_DIM = 65_536


class FrameError(BadRequest):
    """A frame that is not one: truncated, trailing bytes, another version or kind, or a field
    out of bounds."""


# Small columns (lengths, counts, scores) through `array`, which costs far less per call than
# numpy for a few values; numpy for the vectors. Typecodes of fixed sizes, little-endian.
_LITTLE = sys.byteorder == "little"
_SIZES = {"B": 1, "H": 2, "h": 2, "I": 4, "Q": 8, "d": 8}
assert all(array(t).itemsize == n for t, n in _SIZES.items())
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")


def _column(typecode: str, values: Iterable[Any]) -> bytes:
    a = array(typecode, values)
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


class _Reader:
    """Reads a frame front to back; every read is checked against the bytes left."""

    def __init__(self, buf: bytes, kind: int) -> None:
        self.buf = buf
        self.pos = 0
        if len(buf) < 2:
            raise FrameError("truncated frame: no header")
        if buf[0] != VERSION:
            raise FrameError(f"frame version {buf[0]} is not {VERSION}")
        if buf[1] != kind:
            raise FrameError(f"frame kind {buf[1]} where {kind} was expected")
        self.pos = 2

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise FrameError(f"truncated frame: {what} runs past its end")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, s: struct.Struct, what: str) -> tuple[Any, ...]:
        return s.unpack(self.take(s.size, what))

    def uint(self, fmt: str, lo: int, hi: int, what: str) -> int:
        value = int(self.unpack(struct.Struct("<" + fmt), what)[0])
        return _bounded(value, lo, hi, what)

    def column(self, typecode: str, count: int, what: str) -> list[Any]:
        a = array(typecode)
        a.frombytes(self.take(_SIZES[typecode] * count, what))
        if not _LITTLE:
            a.byteswap()
        return a.tolist()

    def matrix(self, rows: int, dim: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * rows * dim, what), dtype="<f4").reshape(rows, dim)

    def strings(self, count: int, max_chars: int, what: str, least: int = 1) -> list[str]:
        """A column of `count` strings of `least` to `max_chars` characters: their lengths in
        bytes (u16), then their UTF-8 bytes."""
        lens = self.column("H", count, f"{what} lengths")
        longest = max(lens, default=0)
        if count and (longest > 4 * max_chars or min(lens) < least):
            raise FrameError(f"{what} must be {least} to {max_chars} characters")
        blob = self.take(sum(lens), what)
        try:
            text = blob.decode()
            # All ASCII (ids are, as a rule): a character a byte, the text cut where the bytes
            # are. Else each piece decoded (the whole may be UTF-8 and a piece not).
            out = _cut(text, lens) if len(text) == len(blob) else [
                piece.decode() for piece in _cut(blob, lens)]
        except UnicodeDecodeError:
            raise FrameError(f"{what} is not UTF-8") from None
        # Characters are counted only when some string has more bytes than `max_chars`.
        if longest > max_chars and max(map(len, out)) > max_chars:
            raise FrameError(f"{what} must be {least} to {max_chars} characters")
        return out

    def blobs(self, count: int, what: str) -> list[bytes]:
        """A column of `count` byte strings: their lengths (u32), then the bytes."""
        lens = self.column("I", count, f"{what} lengths")
        return _cut(self.take(sum(lens), what), lens)

    def json(self, what: str) -> Any:
        """A JSON part (u32 length; empty: None)."""
        n = _bounded(self.unpack(_U32, f"{what} length")[0], 0, MAX_JSON_PART, f"{what} length")
        if n == 0:
            return None
        try:
            return orjson.loads(self.take(n, what))
        except orjson.JSONDecodeError as exc:
            raise FrameError(f"{what} is not JSON: {exc}") from None

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise FrameError(f"{len(self.buf) - self.pos} byte(s) after the end of the frame")


def _bounded(value: int, lo: int, hi: int, what: str) -> int:
    if not lo <= value <= hi:
        raise FrameError(f"{what} must be from {lo} to {hi}, got {value}")
    return value


_Cut = TypeVar("_Cut", bytes, str, list[Hit])


def _cut(whole: _Cut, lens: list[int]) -> list[_Cut]:
    """`whole` cut into consecutive pieces of these lengths (which add up to its own)."""
    out = []
    start = 0
    for n in lens:
        end = start + n
        out.append(whole[start:end])
        start = end
    return out


def _json_part(value: Any) -> bytes:
    raw = b"" if value is None else orjson.dumps(value)
    return struct.pack("<I", len(raw)) + raw


def _strings(values: list[str]) -> bytes:
    raw = [v.encode() for v in values]
    return _column("H", map(len, raw)) + b"".join(raw)


def _blobs(values: list[bytes]) -> bytes:
    return _column("I", map(len, values)) + b"".join(values)


# -- search ---------------------------------------------------------------------------------
@dataclass
class SearchFrame:
    vectors: np.ndarray  # nq × dim float32
    k: int
    nprobe: int | None
    shards: list[int]
    filter: Any
    flags: int
    recall: float | None = None


_SEARCH_HEAD = struct.Struct("<IIIIBH")  # nq, dim, k, nprobe (0: none), flags, shard count


def encode_search(vectors: np.ndarray, k: int, nprobe: int | None, shards: list[int],
                  flt: Any, flags: int, recall: float | None = None) -> bytes:
    nq, dim = vectors.shape
    flags = flags | BY_RECALL if recall is not None else flags & ~BY_RECALL
    return b"".join((
        bytes((VERSION, SEARCH)),
        _SEARCH_HEAD.pack(nq, dim, k, nprobe or 0, flags, len(shards)),
        _column("H", shards),
        b"" if recall is None else _F64.pack(recall),
        _json_part(flt),
        np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
    ))


def decode_search(buf: bytes, dim: int, shards: int) -> SearchFrame:
    """A search of a collection of this dimension and shard count, every field bounded."""
    r = _Reader(buf, SEARCH)
    nq, fdim, k, nprobe, flags, n = r.unpack(_SEARCH_HEAD, "header")
    _bounded(nq, 1, MAX_QUERIES, "nq")
    if fdim != dim:
        raise FrameError(f"the query vectors are not of the collection's dimension {dim}")
    # A search by stored documents asks for one more hit than the client.
    _bounded(k, 1, MAX_K + 1, "k")
    if nq * k > MAX_QUERY_RESULTS + nq:
        raise FrameError(f"nq × k must be at most {MAX_QUERY_RESULTS} (+ nq)")
    _bounded(nprobe, 0, MAX_NPROBE, "nprobe")
    _bounded(flags, 0, WITH_METADATA | WITH_VECTOR | EXPLAIN | BY_RECALL, "flags")
    _bounded(n, 0, shards, "shard count")
    wanted = r.column("H", n, "shards")
    if n and max(wanted) >= shards:
        raise FrameError(f"shards must be below {shards}")
    recall = None
    if flags & BY_RECALL:
        if nprobe:
            raise FrameError("a search gives nprobe or a target recall, not both")
        try:
            recall = check_target(r.unpack(_F64, "recall")[0])
        except BadRequest as exc:
            raise FrameError(str(exc)) from None
    flt = r.json("filter")
    vectors = r.matrix(nq, dim, "vectors")
    r.end()
    if not within(vectors):
        raise FrameError(f"query vectors must be finite and within ±{MAX_VECTOR_VALUE:g}")
    return SearchFrame(vectors, k, nprobe or None, wanted, flt, flags, recall)


# A sum of squares at most this leaves every component within half of MAX_VECTOR_VALUE (a
# sum of non-negative terms rounds to no less than its largest term).
_SAFE_SQUARES = (MAX_VECTOR_VALUE / 2) ** 2


def within(vectors: np.ndarray) -> bool:
    """`vectors_within(vectors).all()`, at the cost of one dot product when the vectors are
    small (as queries are), in float64 (no float32 component's square overflows it): a NaN
    or an infinity makes the sum of squares NaN or infinite, and a component too large makes
    it larger than its own square; only a sum above `_SAFE_SQUARES` (or not a number) is
    looked at component by component."""
    flat = vectors.reshape(-1).astype(np.float64)
    if float(np.dot(flat, flat)) <= _SAFE_SQUARES:
        return True
    return bool(vectors_within(vectors).all())


# -- hits: a search's answer, and a get's -----------------------------------------------------
_HITS_HEAD = struct.Struct("<IIBI")  # queries, dim (0: no vectors), flags, hits


def encode_hits(rows: list[list[Hit]], flags: int, dim: int, plans: Any = None) -> bytes:
    hits = [h for row in rows for h in row]
    parts = [
        bytes((VERSION, HITS)),
        _HITS_HEAD.pack(len(rows), dim if flags & WITH_VECTOR else 0,
                        flags & (WITH_METADATA | WITH_VECTOR), len(hits)),
        _column("I", map(len, rows)),
        _column("d", [h.score for h in hits]),
        _column("h", [h.shard for h in hits]),  # -1: not said (a get's)
        _strings([h.id for h in hits]),
    ]
    if flags & WITH_METADATA:
        parts.append(_blobs([h.metadata or b"{}" for h in hits]))
    if flags & WITH_VECTOR:
        parts.extend(h.vector for h in hits)
    parts.append(_json_part(plans))
    return b"".join(parts)


# The least an answer is allowed, whatever it answers: room for an error's JSON.
MIN_ANSWER_BOUND = 64 * 1024


def hits_answer_bound(nq: int, k: int, flags: int, dim: int, metadata_cap: int) -> int:
    """The most bytes a hits frame answering `nq` queries for `k` hits each can take, with
    the metadata (each document's at most `metadata_cap` bytes) and vectors `flags` ask for
    (`encode_hits`): ids at their longest in UTF-8, a plans part at its largest."""
    total = nq * k
    per_hit = 8 + 2 + 2 + 4 * MAX_ID_CHARS  # score, shard, id length, id
    if flags & WITH_METADATA:
        per_hit += 4 + metadata_cap
    if flags & WITH_VECTOR:
        per_hit += 4 * dim
    head = 2 + _HITS_HEAD.size + 4 * nq + 4 + MAX_JSON_PART
    return max(MIN_ANSWER_BOUND, head + total * per_hit)


# A write's answer: {"shards": {"<shard>": [applied, deleted]}} per shard written.
def write_answer_bound(shards: int) -> int:
    return MIN_ANSWER_BOUND + 64 * shards


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
    fnq, fdim, fflags, total = r.unpack(_HITS_HEAD, "header")
    want = flags & (WITH_METADATA | WITH_VECTOR)
    _bounded(fnq, nq, nq, "query count")
    _bounded(fdim, dim if want & WITH_VECTOR else 0, dim if want & WITH_VECTOR else 0, "dim")
    _bounded(fflags, want, want, "flags")
    _bounded(total, 0, nq * k, "hit count")
    counts = r.column("I", nq, "counts")
    if nq and (max(counts) > k or sum(counts) != total):
        raise FrameError(f"a row holds more than {k} hits, or the rows do not add up")
    scores = r.column("d", total, "scores")
    of = r.column("h", total, "shards")
    if not set(of) <= set(shards):
        raise FrameError("a hit names a shard that was not asked for")
    if not all(map(math.isfinite, scores)):
        raise FrameError("scores must be finite")
    ids = r.strings(total, MAX_ID_CHARS, "ids")
    metas = r.blobs(total, "metadata") if want & WITH_METADATA else [b"{}"] * total
    if want & WITH_METADATA:
        _objects(metas)
    step = 4 * dim
    vecs = r.take(step * total, "vectors") if want & WITH_VECTOR else b""
    plans = r.json("plans")
    r.end()
    if vecs:
        hits = [Hit(i, s, m, vecs[j * step : (j + 1) * step], sh)
                for j, (i, s, m, sh) in enumerate(zip(ids, scores, metas, of, strict=True))]
    else:
        hits = list(map(Hit, ids, scores, metas, itertools.repeat(b""), of))
    return HitsFrame(_cut(hits, counts), plans)


def _objects(metas: list[bytes]) -> None:
    """Each piece of metadata a JSON object: the coordinator puts them in its clients'
    answers as they are (`hit_json`), so a peer's must not be any other JSON, or none."""
    loads = orjson.loads
    try:
        for m in metas:
            if m != b"{}" and not isinstance(loads(m), dict):
                break
        else:
            return
    except orjson.JSONDecodeError:
        pass
    raise FrameError("metadata must be JSON objects")


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
            _column("Q", [d.version for d in docs]),
            _strings([d.writer for d in docs]),
            _column("B", [d.vector is not None for d in docs]),
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
        ids = r.strings(n, MAX_ID_CHARS, "ids")
        versions = r.column("Q", n, "versions")
        if max(versions) > MAX_VERSION:
            raise FrameError(f"versions must be at most {MAX_VERSION}")
        writers = r.strings(n, MAX_NODE_ID_CHARS, "writers", least=0)
        live = r.column("B", n, "live flags")
        if max(live) > 1:
            raise FrameError("a live flag is 0 or 1")
        nlive = sum(live)
        vectors = r.matrix(nlive, fdim, "vectors")
        if not vectors_within(vectors).all():
            raise FrameError(f"vectors must be finite and within ±{MAX_VECTOR_VALUE:g}")
        metas = r.blobs(nlive, "metadata")
        docs = []
        j = 0
        for i, doc_id in enumerate(ids):
            if live[i]:
                docs.append(Incoming(doc_id, vectors[j], _metadata(metas[j], doc_id),
                                     versions[i], writers[i]))
                j += 1
            else:
                docs.append(Incoming(doc_id, None, b"", versions[i], writers[i]))
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
    return bytes((VERSION, GET)) + struct.pack("<H", shard) + _strings([doc_id])


def decode_get(buf: bytes, shards: int) -> tuple[int, str]:
    r = _Reader(buf, GET)
    shard = r.uint("H", 0, shards - 1, "shard")
    (doc_id,) = r.strings(1, MAX_ID_CHARS, "id")
    r.end()
    return shard, doc_id
