"""Searching a collection's local index (blocking; runs on a search thread under the
collection's read lock): the batched unfiltered path, the filtered path, and turning index
keys into documents."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster.docs import Hit
from node.index import LABEL_BITS, faiss, faiss_metric, global_keys, prepare, shard_selector

if TYPE_CHECKING:
    from node.collection import Collection

# A filtered search over at most this many matching documents is exact, by brute force.
EXACT_FILTER_MAX = 50_000
_MASK = (1 << LABEL_BITS) - 1


def run_batch(
    coll: Collection, q: np.ndarray, k: int, nprobe: int, wanted: tuple[int, ...]
) -> list[list[Hit]]:
    """One FAISS call for the whole batch; restricted to `wanted` when that is not every
    local shard."""
    if coll.index.ntotal == 0:
        return [[] for _ in range(len(q))]
    sel = None if len(wanted) == len(coll.shards) else shard_selector(list(wanted))
    d, keys = coll.index.search(q, k, nprobe, selector=sel)
    return resolve(coll, d, keys)


def search_filtered(
    coll: Collection,
    q: np.ndarray,
    k: int,
    nprobe: int,
    predicate: Callable[[Any], bool],
    wanted: tuple[int, ...],
) -> list[list[Hit]]:
    """The k best *matching* documents: exact over the matches when they are few enough,
    else the index restricted to them, falling back to exact if it finds too few."""
    keys: list[np.ndarray] = []
    vecs: list[bytes] = []
    for s in wanted:
        labels: list[int] = []
        for _, rec in coll.store.iter_docs(s):
            if not rec.tombstone and predicate(rec.metadata_obj()):
                labels.append(rec.label)
                vecs.append(rec.vector)
        keys.append(global_keys(s, np.asarray(labels, dtype=np.int64)))
    allowed = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    if len(allowed) == 0:
        return [[] for _ in range(len(q))]
    kk = min(k, len(allowed))
    if len(allowed) > EXACT_FILTER_MAX and coll.index.trained:
        d, found = coll.index.search(q, kk, nprobe, allowed=allowed)
        if (found >= 0).sum(axis=1).min() >= kk:
            return resolve(coll, d, found)
    x = np.frombuffer(b"".join(vecs), dtype="<f4").reshape(len(allowed), coll.spec.dim)
    d, pos = faiss.knn(q, prepare(x, coll.spec.metric), kk, metric=faiss_metric(coll.spec.metric))
    found = np.where(pos >= 0, allowed[np.maximum(pos, 0)], -1)
    return resolve(coll, d, found)


def resolve(coll: Collection, scores: np.ndarray, keys: np.ndarray) -> list[list[Hit]]:
    """Index answers (best first, key -1 for none) to documents, read from the store."""
    rows: list[list[tuple[float, int, str]]] = []
    want: list[tuple[int, str]] = []
    shards = coll.shards
    for srow, krow in zip(scores.tolist(), keys.tolist(), strict=True):
        row = []
        for score, key in zip(srow, krow, strict=True):
            if key < 0:
                break
            shard = shards.get(key >> LABEL_BITS)
            doc_id = shard.labels.get(key & _MASK) if shard is not None else None
            if doc_id is None:
                continue
            row.append((score, shard.shard, doc_id))  # type: ignore[union-attr]
            want.append((shard.shard, doc_id))  # type: ignore[union-attr]
        rows.append(row)
    recs = dict(zip(want, coll.store.get_records_multi(want), strict=True))
    out: list[list[Hit]] = []
    for row in rows:
        hits = []
        for score, s, doc_id in row:
            rec = recs[(s, doc_id)]
            if rec is not None and not rec.tombstone:
                hits.append(Hit(doc_id, score, rec.metadata, rec.vector))
        out.append(hits)
    return out


