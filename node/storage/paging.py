"""Counting and paging through a collection's local shards (blocking; run on a search thread
under the collection's read lock, like a search). A filter is answered by the same match sets
filtered search uses (`Shard.matches`: evaluated once per shard and filter over the payload
index, kept in the shard's LRU and updated by writes): a count is the set's popcount, a page
tests each record's label against its bitmap. Pages come from the store in id (key) order.

A page looks at no more than SCAN_LIMIT live documents, matching or not, so that a filter that
matches little costs a bounded amount of work per request: the caller goes on from the last id
looked at. Tombstones are not looked at (their records are in a column family of their own)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.bounds import MAX_PAGE_METADATA
from aquila.cluster.model.documents import Hit
from aquila.cluster.model.filters import Filter
from aquila.node.storage.matches import MatchSet, pack
from aquila.node.storage.search import Searchable

# Live documents (matching or not) one page request may look at.
SCAN_LIMIT = 20_000


def match_set(coll: Searchable, shard: int, predicate: Callable[[Any], bool]) -> MatchSet:
    """The shard's live documents `predicate` admits. A parsed filter's set comes from the
    shard's cache (or is evaluated once and kept there); any other predicate is evaluated on
    every document and kept nowhere."""
    sh = coll.shards[shard]
    if isinstance(predicate, Filter):
        return sh.matches(predicate)[0]
    mask = np.zeros(sh.next_label, dtype=bool)
    for label, meta in sh.meta.items():
        if predicate(orjson.loads(meta or b"{}")):
            mask[label] = True
    return MatchSet(pack(mask), int(np.count_nonzero(mask)), 0)


def count_shards(
    coll: Searchable, shards: Iterable[int], predicate: Callable[[Any], bool] | None
) -> dict[int, int]:
    """Per shard, its live documents that `predicate` admits (all without one)."""
    if predicate is None:
        return {s: coll.shards[s].count for s in shards}
    return {s: match_set(coll, s, predicate).count for s in shards}


def scroll_shard(
    coll: Searchable, shard: int, after: str | None, limit: int,
    predicate: Callable[[Any], bool] | None, with_vectors: bool,
) -> tuple[list[Hit], str | None]:
    """Up to `limit` live documents of the shard that `predicate` admits, with ids after
    `after`, in id order (fewer once their metadata reach `MAX_PAGE_METADATA` bytes); and
    the id to go on after, None once the shard is done."""
    # The bitmap as bytes: one index and one shift per record looked at, no numpy call each.
    # (Read under the read lock: writes, which change the cached set, wait for it.)
    bits = None if predicate is None else match_set(coll, shard, predicate).bits.tobytes()
    size = 0 if bits is None else len(bits)
    out: list[Hit] = []
    held = 0  # bytes of metadata in `out`
    for looked, (doc_id, rec) in enumerate(coll.store.iter_docs(
            shard, after, vectors=with_vectors, live_only=True), 1):
        if not rec.tombstone:
            label = rec.label
            if bits is None or (
                    label >> 3 < size and bits[label >> 3] >> (label & 7) & 1):
                out.append(
                    Hit(doc_id, 0.0, rec.metadata, rec.vector if with_vectors else b"", shard))
                held += len(rec.metadata)
                if len(out) >= limit or held >= MAX_PAGE_METADATA:
                    return out, doc_id
        if looked >= SCAN_LIMIT:
            return out, doc_id
    return out, None
