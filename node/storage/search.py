"""Searching a collection's local index (blocking; runs on a search thread under the
collection's read lock): the batched unfiltered path, and turning index keys into documents:
two multi-gets of the store per batch (the hits' ids by label, then their records; a third,
their vectors by label, when asked for), through RocksDB's block cache; nothing per document
is kept in memory. A compressed index's candidates are re-ranked before that, on arrays: their
vectors read by label (one multi-get of V keys, no id, no record), scored exactly, the k best
kept per query. The filtered path is `node.storage.filtered`."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from aquila.cluster.model.bounds import MAX_ANSWER_METADATA
from aquila.cluster.model.documents import Hit
from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.spec import CollectionSpec
from aquila.node.storage.index import LABEL_BITS, VectorIndex, prepare
from aquila.node.storage.shard import Shard
from aquila.node.storage.store import (
    VEC_PREFIX,
    Store,
    doc_key,
    label_key,
    record_meta,
    same_change,
    vec_key,
)

_MASK = (1 << LABEL_BITS) - 1
# Reads of a hit's record and vector, at most, until they are of the same change (`_as_now`).
_REREADS = 8
# Below this many index answers (queries × candidates) a batch's hits are read one by one
# (`_resolve_few`); from it on together, on arrays.
FEW_HITS = 128


class Searchable(Protocol):
    """What a search reads of a collection's local part (`node.storage.collection.Collection`)."""

    spec: CollectionSpec
    index: VectorIndex
    shards: dict[int, Shard]
    store: Store


def run_batch(
    coll: Searchable, q: np.ndarray, k: int, nprobe: int, wanted: tuple[int, ...],
    with_vectors: bool,
) -> list[list[Hit]]:
    """One FAISS call for the whole batch; restricted to `wanted` when that is not every
    local shard."""
    if coll.index.ntotal == 0 or not wanted:  # a peer's frame may name no shard at all
        return [[] for _ in range(len(q))]
    d, keys = find_batch(coll, q, k, nprobe, wanted)
    return resolve(coll, d, keys, with_vectors)


def find_batch(
    coll: Searchable, q: np.ndarray, k: int, nprobe: int, wanted: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """`run_batch` before any document is read: per query, the index's scores and keys best
    first (-1 for none), a compressed index's candidates re-ranked to the k best already."""
    if coll.index.ntotal == 0 or not wanted:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    sel = None
    if len(wanted) < len(coll.shards):
        below = max(coll.shards[s].next_label for s in wanted)
        sel = coll.index.shards_selector(wanted, below)
    want = candidates(coll, k)
    d, keys = coll.index.search(q, want, nprobe, selector=sel)
    if want > k:
        return rerank(coll, d, keys, q, k)
    return d, keys


FoundRow = tuple[list[float], list[int], list[int]]  # scores, keys, shards


def found_rows(coll: Searchable, scores: np.ndarray, keys: np.ndarray) -> list[FoundRow]:
    """The index's answers as a search's `Found` holds them, per query: the scores, keys and
    shards of its hits up to the row's first -1 (as `resolve` stops there), keys of shards
    no longer local left out. In Python: a few hits a query cost less so than on arrays."""
    local = coll.shards
    out: list[FoundRow] = []
    for srow, krow in zip(scores.tolist(), keys.tolist(), strict=True):
        s_out: list[float] = []
        k_out: list[int] = []
        sh_out: list[int] = []
        for score, key in zip(srow, krow, strict=True):
            if key < 0:
                break
            shard = key >> LABEL_BITS
            if shard in local:
                s_out.append(score)
                k_out.append(key)
                sh_out.append(shard)
        out.append((s_out, k_out, sh_out))
    return out


# Candidates a compressed index is asked for, per hit wanted, before they are re-ranked with
# their exact vectors: its codes alone misrank near neighbours (ivf_pq's most of all).
OVERSAMPLE = {"ivf_sq8": 4, "ivf_pq": 10}
# Candidates per query re-ranked at most (each is a vector read by label, through the block
# cache).
MAX_CANDIDATES = 1024


def candidates(coll: Searchable, k: int) -> int:
    """How many candidates per query to ask the index for, to return `k` hits."""
    factor = OVERSAMPLE.get(coll.spec.index.type, 1) if coll.index.trained else 1
    return max(k, min(k * factor, MAX_CANDIDATES))


def exact_scores(metric: str, q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row by row, the score the index would give query q[i] and stored vector v[i] had it
    kept them exactly (q prepared as the index's queries are: unit length for cosine)."""
    v = prepare(v, metric)  # as the index holds it: unit length for cosine
    if metric == "l2":
        diff = q - v
        out: np.ndarray = (diff * diff).sum(axis=1)
        return out
    dots: np.ndarray = (q * v).sum(axis=1)
    return dots


def resolve(
    coll: Searchable, scores: np.ndarray, keys: np.ndarray, with_vectors: bool,
    rescore: tuple[np.ndarray, int] | None = None,
) -> list[list[Hit]]:
    """Index answers (best first, key -1 for none) to documents: their ids and records read
    from the store, a hit whose record is gone or a tombstone left out (deleted since: the
    index catches up right after). `rescore` (the prepared queries, k): the candidates are
    first re-ranked with their stored vectors (`rerank`), and only the k best per query
    resolved.

    From `FEW_HITS` answers on, the whole batch's hits are read together: each document once
    however many queries found it, in key order (two multi-gets: ids by label, then records
    by id), and decoded once; the hits are then made from what was read, per query in the
    index's order."""
    if rescore is not None:
        scores, keys = rerank(coll, scores, keys, *rescore)
    if keys.size < FEW_HITS:
        return _resolve_few(coll, scores, keys, with_vectors)
    out: list[list[Hit]] = [[] for _ in range(len(scores))]
    rows, at, keys_u, of = _local_hits(coll, keys)
    if not len(rows):
        return out
    ids, metas, vecs = _read_documents(coll.store, keys_u, with_vectors)
    shard = (keys_u >> LABEL_BITS).tolist()
    hit_scores = scores.reshape(-1)[at].tolist()
    for r, u, score in zip(rows.tolist(), of.tolist(), hit_scores, strict=True):
        doc_id = ids[u]
        if doc_id is not None:
            out[r].append(Hit(doc_id, score, metas[u], vecs[u], shard[u]))
    return out


def rerank(coll: Searchable, scores: np.ndarray, keys: np.ndarray, q: np.ndarray, k: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The candidates (`keys`, best first by the index's codes) scored again with their
    stored vectors, the k best per query kept, best first: (scores, keys) of shape
    (queries, k), rows ending with -1 keys where fewer remain. On arrays: the distinct
    candidates' vectors are one multi-get of V keys by label (a candidate deleted since has
    none and drops out), no id, no record, no object per candidate."""
    nq = len(keys)
    out_keys = np.full((nq, k), -1, np.int64)
    out_scores = np.zeros((nq, k), np.float32)
    rows, at, keys_u, of = _local_hits(coll, keys)
    if not len(rows):
        return out_scores, out_keys
    got = coll.store.vectors(label_keys(keys_u >> LABEL_BITS, keys_u & _MASK, b"V"))
    present = np.fromiter((v is not None for v in got), bool, len(got))
    if not present.any():
        return out_scores, out_keys
    width = VEC_PREFIX + 4 * coll.spec.dim
    raw = np.frombuffer(b"".join([v for v in got if v is not None]), np.uint8)
    vecs = raw.reshape(-1, width)[:, VEC_PREFIX:].copy().view("<f4")
    pos = np.cumsum(present) - 1  # a distinct key's row in `vecs`
    keep = present[of]
    rows, at, of = rows[keep], at[keep], pos[of[keep]]
    exact = exact_scores(coll.spec.metric, q[rows], vecs[of])
    flat_valid = np.zeros(keys.size, bool)
    flat_valid[at] = True
    flat_full = np.zeros(keys.size, np.float32)
    flat_full[at] = exact
    valid, full = flat_valid.reshape(keys.shape), flat_full.reshape(keys.shape)
    order_by = np.where(valid, full if coll.spec.metric == "l2" else -full, np.inf)
    top = np.argsort(order_by, axis=1, kind="stable")[:, :k]
    taken = np.take_along_axis(valid, top, axis=1)
    n = top.shape[1]
    out_keys[:, :n] = np.where(taken, np.take_along_axis(np.asarray(keys, np.int64), top,
                                                         axis=1), -1)
    out_scores[:, :n] = np.take_along_axis(full, top, axis=1)
    return out_scores, out_keys


def _resolve_few(coll: Searchable, scores: np.ndarray, keys: np.ndarray, with_vectors: bool
                 ) -> list[list[Hit]]:
    """`resolve` of a few hits (one query's, a small batch's), hit by hit in Python: the
    arrays' set-up costs more than it saves below `FEW_HITS` (one query's 10 hits: 53 µs
    this way, 83 on arrays; 100 queries' 1,000: 41 µs a query this way, 33-36 on arrays)."""
    shards = coll.shards
    rows: list[int] = []
    scored: list[float] = []
    found: list[tuple[int, int]] = []  # shard, label
    for r, (srow, krow) in enumerate(zip(scores.tolist(), keys.tolist(), strict=True)):
        for score, key in zip(srow, krow, strict=True):
            if key < 0:
                break
            if key >> LABEL_BITS in shards:
                rows.append(r)
                scored.append(score)
                found.append((key >> LABEL_BITS, key & _MASK))
    out: list[list[Hit]] = [[] for _ in range(len(scores))]
    if not found:
        return out
    docs = read_labels(coll.store, found, with_vectors)
    for r, score, (s, _), doc in zip(rows, scored, found, docs, strict=True):
        if doc is not None:
            out[r].append(Hit(doc[0], score, doc[1], doc[2], s))
    return out


def read_keys(store: Store, keys: list[int], with_vectors: bool
              ) -> list[tuple[str, bytes, bytes] | None]:
    """Per global key (a hit's: shard and label), its document as (id, metadata, vector, b""
    unless `with_vectors`), or None when its label no longer names a live document. Many
    are read together on arrays (`_read_documents`), a few one by one (`read_labels`)."""
    if len(keys) < FEW_HITS:
        return read_labels(store, [(key >> LABEL_BITS, key & _MASK) for key in keys],
                           with_vectors)
    keys_u, of = np.unique(np.asarray(keys, np.int64), return_inverse=True)
    ids, metas, vecs = _read_documents(store, keys_u, with_vectors)
    return [None if ids[u] is None else (ids[u], metas[u], vecs[u])  # type: ignore[misc]
            for u in of.reshape(-1).tolist()]


def read_labels(store: Store, found: list[tuple[int, int]], with_vectors: bool
                ) -> list[tuple[str, bytes, bytes] | None]:
    """`read_keys` by (shard, label), one by one in Python (two multi-gets, a third for the
    vectors): what `_resolve_few` reads."""
    out: list[tuple[str, bytes, bytes] | None] = [None] * len(found)
    if not found:
        return out
    ids = store.raw_records([label_key(s, lab) for s, lab in found])
    raws = store.raw_records([doc_key(s, "") + i for (s, _), i in zip(found, ids, strict=True)
                              if i is not None])
    it = iter(raws)
    kept: list[tuple[int, int, int, str, bytes, bytes]] = []  # at, shard, label, id, meta, raw
    for at, ((s, label), doc_id) in enumerate(zip(found, ids, strict=True)):
        if doc_id is None:
            continue
        raw = next(it)
        if raw is None:
            continue
        own, tomb, meta = record_meta(raw)
        if tomb or own != label:  # deleted, or the label was given again since
            continue
        kept.append((at, s, label, doc_id.decode(), meta, raw))
    if not with_vectors:
        for at, _, _, name, meta, _ in kept:
            out[at] = (name, meta, b"")
        return out
    vecs = store.vectors([vec_key(s, lab) for _, s, lab, _, _, _ in kept])
    for (at, s, label, name, meta, raw), v in zip(kept, vecs, strict=True):
        if same_change(raw, v):
            assert v is not None
            out[at] = (name, meta, v[VEC_PREFIX:])
        elif (now := _as_now(store, s, name, label)) is not None:
            out[at] = (name, now[0], now[1])
    return out


def _as_now(store: Store, shard: int, doc_id: str, label: int) -> tuple[bytes, bytes] | None:
    """(metadata, vector) of a hit written again between its record's read and its vector's,
    both read again until they agree: still live under its label, the hit is kept, as it is
    now (an overwrite is never a miss); None when it was deleted meanwhile (left out, as one
    whose record is gone), or when they never agree within a few reads (a store whose vector
    of a live document is missing: a damaged one's hit is left out, the search not failed)."""
    rec = store.read_again(doc_key(shard, doc_id), _REREADS, damaged_ok=True)
    if rec is None or rec.tombstone or rec.label != label:
        return None
    return rec.metadata, rec.vector


def _local_hits(
    coll: Searchable, keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The index's answers that are documents of local shards, in answer order (query by
    query, best first; a row ends at its first -1): their queries, their positions in the
    flattened answer, and the distinct keys among them (ascending) with, per hit, which."""
    if not keys.size:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty
    keys = np.asarray(keys, dtype=np.int64)
    answered = np.cumprod(keys >= 0, axis=1, dtype=bool)  # up to the first -1 of each row
    local = np.fromiter(coll.shards, np.int64, len(coll.shards))
    keep = answered & np.isin(keys >> LABEL_BITS, local)
    at = np.flatnonzero(keep)
    keys_u, of = np.unique(keys.reshape(-1)[at], return_inverse=True)
    return at // keys.shape[1], at, keys_u, of.reshape(-1)


# A label key (`store.label_key`) as a numpy record: tag, shard, label; big-endian, packed.
_LABEL_KEY = np.dtype([("tag", "S1"), ("shard", ">u2"), ("label", ">u8")])


def label_keys(shards: np.ndarray, labels: np.ndarray, tag: bytes = b"L") -> list[bytes]:
    """`store.label_key` of each (shard, label), made on arrays (`store.vec_key` with tag
    V)."""
    packed = np.empty(len(labels), _LABEL_KEY)
    packed["tag"], packed["shard"], packed["label"] = tag, shards, labels
    buf, size = packed.tobytes(), _LABEL_KEY.itemsize
    return [buf[i : i + size] for i in range(0, len(buf), size)]


# Records a search reads in one multi-get before it counts their bytes: with metadata of
# at most `MAX_DOCUMENT_METADATA` (1 MiB) a record, at most 256 MiB read past the limit.
_RECORDS_AT_ONCE = 256


def _records_within(store: Store, keys: list[bytes]) -> list[bytes | None]:
    """`store.raw_records(keys)`, a few hundred at a time, refused (400) once they add up
    past `MAX_ANSWER_METADATA`: a search's hits are at most 100,000 documents, and of
    documents of 1 MiB of metadata each it would have read 100 GiB before any check."""
    got: list[bytes | None] = []
    total = 0
    for lo in range(0, len(keys), _RECORDS_AT_ONCE):
        part = store.raw_records(keys[lo:lo + _RECORDS_AT_ONCE])
        total += sum(len(r) for r in part if r is not None)
        if total > MAX_ANSWER_METADATA:
            raise BadRequest(
                f"the hits' documents hold over {MAX_ANSWER_METADATA:,} bytes (their "
                "metadata): ask for fewer results (queries or k)")
        got += part
    return got


def _read_documents(
    store: Store, keys: np.ndarray, with_vectors: bool
) -> tuple[list[str | None], list[bytes], list[bytes]]:
    """For each of these global keys (ascending, distinct): the document's id, or None when
    its label no longer names a live document; its metadata; its vector (b"" unless
    `with_vectors`)."""
    n = len(keys)
    shards = keys >> LABEL_BITS
    labels = keys & _MASK
    # Ascending global keys are ascending label keys: the multi-get's input is sorted.
    found = store.raw_records(label_keys(shards, labels))
    prefix = {s: doc_key(s, "") for s in set(shards.tolist())}
    wanted = [(u, prefix[s] + doc_id) for u, (s, doc_id)
              in enumerate(zip(shards.tolist(), found, strict=True)) if doc_id is not None]
    raws = _records_within(store, [key for _, key in wanted])
    ids: list[str | None] = [None] * n
    metas: list[bytes] = [b""] * n
    vecs: list[bytes] = [b""] * n
    label_of = labels.tolist()
    heads: list[bytes] = [b""] * n
    for (u, _), raw in zip(wanted, raws, strict=True):
        if raw is None:
            continue
        own, tomb, meta = record_meta(raw)
        if tomb or own != label_of[u]:  # deleted, or the label was given again since
            continue
        doc_id = found[u]
        assert doc_id is not None
        ids[u] = doc_id.decode()
        metas[u] = meta
        heads[u] = raw
    if with_vectors:
        live = [u for u in range(n) if ids[u] is not None]
        got = store.vectors(label_keys(shards[live], labels[live], b"V"))
        for u, v in zip(live, got, strict=True):
            if same_change(heads[u], v):
                assert v is not None
                vecs[u] = v[VEC_PREFIX:]
                continue
            name = ids[u]
            assert name is not None
            # Written or deleted since its record was read: as it is now, or left out.
            now = _as_now(store, int(shards[u]), name, label_of[u])
            if now is None:
                ids[u] = None
            else:
                metas[u], vecs[u] = now
    return ids, metas, vecs
