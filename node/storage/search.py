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
from aquila.node.storage.index import LABEL_BITS, VectorIndex
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
    if coll.index.ntotal == 0:
        return [[] for _ in range(len(q))]
    sel = None
    if len(wanted) < len(coll.shards):
        below = max(coll.shards[s].next_label for s in wanted)
        sel = coll.index.shards_selector(wanted, below)
    d, keys = coll.index.search(q, k, nprobe, selector=sel)
    return resolve(coll, d, keys, with_vectors)


def resolve(
    coll: Searchable, scores: np.ndarray, keys: np.ndarray, with_vectors: bool
) -> list[list[Hit]]:
    """Index answers (best first, key -1 for none) to documents: their ids and records read
    from the store, a hit whose record is gone or a tombstone left out (deleted since: the
    index catches up right after)."""
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
        vec = Record.decode(raw).vector if with_vectors else b""
        out[r].append(Hit(doc_id.decode(), score, meta, vec, s))
    return out
