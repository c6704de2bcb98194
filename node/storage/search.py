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
from aquila.node.storage.store import Record, Store, doc_key, record_meta

_MASK = (1 << LABEL_BITS) - 1


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

    The whole batch at once: the hits are picked on arrays, a document found by several
    queries is read once (one multi-get of labels, one of records for the batch), and each
    record gives only what the answer holds (its metadata; its vector when asked for or
    re-scored): per hit there is one `Hit` to make and nothing else."""
    out: list[list[Hit]] = [[] for _ in range(len(scores))]
    keys = np.asarray(keys, dtype=np.int64)
    if not keys.size:
        return out
    shard_of = keys >> LABEL_BITS
    # A row ends at its first -1 (FAISS pads a row with them), and hits of shards not held
    # here (any more) are left out.
    take = np.logical_and.accumulate(keys >= 0, axis=1) & np.isin(
        shard_of, np.fromiter(coll.shards, np.int64, len(coll.shards)))
    if not take.any():
        return out
    rows_of = np.nonzero(take)[0]
    picked = keys[take]
    unique, which = np.unique(picked, return_inverse=True)
    docs = _documents(coll.store, unique, with_vectors or rescore is not None)
    for r, score, d, s in zip(rows_of.tolist(), scores[take].tolist(), which.tolist(),
                              (picked >> LABEL_BITS).tolist(), strict=True):
        doc = docs[d]
        if doc is not None:
            out[r].append(Hit(doc[0], score, doc[1], doc[2], s))
    if rescore is not None:
        out = _rescored(coll.spec.metric, out, *rescore, with_vectors)
    return out


# Bytes of a label key: tag, shard (u16), label (u64), big-endian as `store.label_key` has it.
_LABEL_KEY = np.dtype([("tag", "S1"), ("shard", ">u2"), ("label", ">u8")])


def _documents(store: Store, keys: np.ndarray, vectors: bool
               ) -> list[tuple[str, bytes, bytes] | None]:
    """For each (distinct) index key, the live document it stands for: (id, metadata,
    vector or b""), or None when its record is gone, a tombstone or now of another label.

    Both reads go in key order (the label keys are, as `keys` is sorted): neighbouring keys
    share index and data blocks, and a batch's reads cost a quarter to a third less."""
    shards, labels = keys >> LABEL_BITS, keys & _MASK
    packed = np.empty(len(keys), _LABEL_KEY)
    packed["tag"], packed["shard"], packed["label"] = b"L", shards, labels
    raw = packed.tobytes()
    width = _LABEL_KEY.itemsize
    ids = store.raw_records([raw[i : i + width] for i in range(0, len(raw), width)])
    prefixes = {s: doc_key(s, "") for s in set(shards.tolist())}
    wanted = sorted((prefixes[s] + i, d, lab) for d, (s, lab, i) in enumerate(
        zip(shards.tolist(), labels.tolist(), ids, strict=True)) if i is not None)
    records = store.raw_records([key for key, _, _ in wanted])
    out: list[tuple[str, bytes, bytes] | None] = [None] * len(keys)
    cut = len(doc_key(0, ""))
    for (key, d, label), rec in zip(wanted, records, strict=True):
        if rec is None:
            continue
        own, tomb, meta = record_meta(rec)
        if tomb or own != label:
            continue
        out[d] = (key[cut:].decode(), meta, Record.decode(rec).vector if vectors else b"")
    return out


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
