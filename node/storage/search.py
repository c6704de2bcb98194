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
    scored again with their stored vectors, and the k best kept per query."""
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
        if tomb or own != label:
            continue
        vec = Record.decode(raw).vector if with_vectors or rescore else b""
        out[r].append(Hit(doc_id.decode(), score, meta, vec, s))
    if rescore is not None:
        out = _rescored(coll.spec.metric, out, *rescore, with_vectors)
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
