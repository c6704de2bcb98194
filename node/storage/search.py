"""Searching a collection's local index (blocking; runs on a search thread under the
collection's read lock): the batched unfiltered path, and turning index keys into documents
from the shards' in-memory label and metadata maps (RocksDB is read only when vectors are asked
for). The filtered path is `node.storage.filtered`."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from aquila.cluster.model.documents import Hit
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec
from aquila.node.storage.index import LABEL_BITS, VectorIndex
from aquila.node.storage.shard import Shard
from aquila.node.storage.store import Store

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
    """Index answers (best first, key -1 for none) to documents."""
    shards = coll.shards
    out: list[list[Hit]] = []
    for srow, krow in zip(scores.tolist(), keys.tolist(), strict=True):
        hits = []
        for score, key in zip(srow, krow, strict=True):
            if key < 0:
                break
            shard = shards.get(key >> LABEL_BITS)
            if shard is None:
                continue
            label = key & _MASK
            meta = shard.meta.get(label)
            if meta is not None:  # None: deleted since (the index catches up right after)
                hits.append(Hit(shard.labels[label], score, meta, b"", shard.shard))
        out.append(hits)
    if with_vectors:
        _fill_vectors(coll, out)
    return out


def _fill_vectors(coll: Searchable, rows: list[list[Hit]]) -> None:
    n = coll.spec.shards
    keys = [(shard_of(h.id, n), h.id) for row in rows for h in row]
    recs = iter(coll.store.get_records_multi(keys))
    for row in rows:
        for h in row:
            rec = next(recs)
            h.vector = rec.vector if rec is not None else b""
