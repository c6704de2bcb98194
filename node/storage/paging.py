"""Counting and paging through a collection's local shards (blocking; run on a search thread
under the collection's read lock, like a search): a filter is answered by the shard's payload
index, the one filtered search uses, and pages come from the store in id (key) order.

A page looks at no more than SCAN_LIMIT records, matching or not, so that a filter that
matches little costs a bounded amount of work per request: the caller goes on from the last id
looked at."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from aquila.cluster.model.documents import Hit
from aquila.cluster.model.filters import Filter
from aquila.node.storage.search import Searchable

# Records (live, deleted or not matching) one page request may look at.
SCAN_LIMIT = 20_000


def _matching_labels(coll: Searchable, shard: int, predicate: Callable[[Any], bool]) -> set[int]:
    sh = coll.shards[shard]
    if isinstance(predicate, Filter):
        return sh.payload.evaluate(predicate, sh.meta)
    return {label for label, meta in sh.meta.items() if predicate(orjson.loads(meta))}


def count_shards(
    coll: Searchable, shards: Iterable[int], predicate: Callable[[Any], bool] | None
) -> dict[int, int]:
    """Per shard, its live documents that `predicate` admits (all without one)."""
    if predicate is None:
        return {s: coll.shards[s].count for s in shards}
    return {s: len(_matching_labels(coll, s, predicate)) for s in shards}


def scroll_shard(
    coll: Searchable, shard: int, after: str | None, limit: int,
    predicate: Callable[[Any], bool] | None, with_vectors: bool,
) -> tuple[list[Hit], str | None]:
    """Up to `limit` live documents of the shard that `predicate` admits, with ids after
    `after`, in id order; and the id to go on after, None once the shard is done."""
    allowed = None if predicate is None else _matching_labels(coll, shard, predicate)
    out: list[Hit] = []
    for looked, (doc_id, rec) in enumerate(coll.store.iter_docs(shard, after), 1):
        if not rec.tombstone and (allowed is None or rec.label in allowed):
            out.append(Hit(doc_id, 0.0, rec.metadata, rec.vector if with_vectors else b"", shard))
            if len(out) >= limit:
                return out, doc_id
        if looked >= SCAN_LIMIT:
            return out, doc_id
    return out, None
