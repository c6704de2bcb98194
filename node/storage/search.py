"""Searching a collection's local index (blocking; runs on a search thread under the
collection's read lock): the batched unfiltered path, and turning index keys into documents:
two multi-gets of the store per batch (the hits' ids by label, then their records), through
RocksDB's block cache; nothing per document is kept in memory. The filtered path is
`node.storage.filtered`."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from aquila.cluster.model.documents import Hit
from aquila.cluster.model.spec import CollectionSpec
from aquila.node.storage.index import LABEL_BITS, VectorIndex, prepare
from aquila.node.storage.shard import Shard
from aquila.node.storage.store import Record, Store, doc_key, label_key, record_meta

_MASK = (1 << LABEL_BITS) - 1
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
    sel = None
    if len(wanted) < len(coll.shards):
        below = max(coll.shards[s].next_label for s in wanted)
        sel = coll.index.shards_selector(wanted, below)
    want = candidates(coll, k)
    d, keys = coll.index.search(q, want, nprobe, selector=sel)
    return resolve(coll, d, keys, with_vectors, rescore=(q, k) if want > k else None)


# Candidates a compressed index is asked for, per hit wanted, before they are re-ranked with
# their exact vectors: its codes alone misrank near neighbours (ivf_pq's most of all).
OVERSAMPLE = {"ivf_sq8": 4, "ivf_pq": 10}
# Candidates per query re-ranked at most (each is a record read through the block cache).
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
    scored again with their stored vectors, and the k best kept per query.

    From `FEW_HITS` answers on, the whole batch's hits are read together: each document once
    however many queries found it, in key order (two multi-gets: ids by label, then records
    by id), and decoded once; the hits are then made from what was read, per query in the
    index's order."""
    vectors = with_vectors or rescore is not None
    if keys.size < FEW_HITS:
        out = _resolve_few(coll, scores, keys, vectors)
    else:
        out = [[] for _ in range(len(scores))]
        rows, at, keys_u, of = _local_hits(coll, keys)
        if not len(rows):
            return out
        ids, metas, vecs = _read_documents(coll.store, keys_u, vectors)
        shard = (keys_u >> LABEL_BITS).tolist()
        hit_scores = scores.reshape(-1)[at].tolist()
        for r, u, score in zip(rows.tolist(), of.tolist(), hit_scores, strict=True):
            doc_id = ids[u]
            if doc_id is not None:
                out[r].append(Hit(doc_id, score, metas[u], vecs[u], shard[u]))
    if rescore is not None:
        out = _rescored(coll.spec.metric, out, *rescore, with_vectors)
    return out


def _resolve_few(coll: Searchable, scores: np.ndarray, keys: np.ndarray, with_vectors: bool
                 ) -> list[list[Hit]]:
    """`resolve` of a few hits (one query's, a small batch's), hit by hit in Python: the
    arrays' set-up costs more than it saves below `FEW_HITS` (one query's 10 hits: 53 µs
    this way, 83 on arrays; 100 queries' 1,000: 41 µs a query this way, 33-36 on arrays)."""
    shards = coll.shards
    found: list[tuple[int, float, int, int]] = []  # row, score, shard, label
    for r, (srow, krow) in enumerate(zip(scores.tolist(), keys.tolist(), strict=True)):
        for score, key in zip(srow, krow, strict=True):
            if key < 0:
                break
            if key >> LABEL_BITS in shards:
                found.append((r, score, key >> LABEL_BITS, key & _MASK))
    out: list[list[Hit]] = [[] for _ in range(len(scores))]
    if not found:
        return out
    store = coll.store
    ids = store.raw_records([label_key(s, lab) for _, _, s, lab in found])
    raws = store.raw_records([doc_key(s, "") + i for (_, _, s, _), i in zip(found, ids,
                                                                          strict=True)
                              if i is not None])
    it = iter(raws)
    for (r, score, s, label), doc_id in zip(found, ids, strict=True):
        if doc_id is None:
            continue
        raw = next(it)
        if raw is None:
            continue
        own, tomb, meta = record_meta(raw)
        if tomb or own != label:  # deleted, or the label was given again since
            continue
        vec = Record.decode(raw).vector if with_vectors else b""
        out[r].append(Hit(doc_id.decode(), score, meta, vec, s))
    return out


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


def label_keys(shards: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """`store.label_key` of each (shard, label), made on arrays."""
    packed = np.empty(len(labels), _LABEL_KEY)
    packed["tag"], packed["shard"], packed["label"] = b"L", shards, labels
    buf, size = packed.tobytes(), _LABEL_KEY.itemsize
    return [buf[i : i + size] for i in range(0, len(buf), size)]


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
    raws = store.raw_records([key for _, key in wanted])
    ids: list[str | None] = [None] * n
    metas: list[bytes] = [b""] * n
    vecs: list[bytes] = [b""] * n
    label_of = labels.tolist()
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
        if with_vectors:
            vecs[u] = Record.decode(raw).vector
    return ids, metas, vecs


def _rescored(metric: str, rows: list[list[Hit]], q: np.ndarray, k: int, with_vectors: bool
              ) -> list[list[Hit]]:
    """Each row's hits scored again with their stored vectors, the k best kept, best first."""
    hits = [h for row in rows for h in row]
    if not hits:
        return rows
    which = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
    v = np.frombuffer(b"".join(h.vector for h in hits), dtype="<f4").reshape(len(hits), -1)
    exact = exact_scores(metric, q[which], v).tolist()
    out: list[list[Hit]] = []
    at = 0
    for row in rows:
        scored = [
            Hit(h.id, score, h.metadata, h.vector if with_vectors else b"", h.shard)
            for h, score in zip(row, exact[at : at + len(row)], strict=True)
        ]
        at += len(row)
        scored.sort(key=lambda h: h.score, reverse=metric != "l2")
        out.append(scored[:k])
    return out
