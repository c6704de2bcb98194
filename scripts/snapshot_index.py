"""A node's index read from its snapshot with the node's loader, for benchmarks that search
it in process. An `ivf_flat` snapshot (AQIX5) holds no vectors: its lists are refilled from
the collection's store beside it, as a start does (read-only beside a running node, or
with the node stopped)."""

from __future__ import annotations

from pathlib import Path

import orjson

from aquila.cluster.model.spec import CollectionSpec
from aquila.node.storage.index import VectorIndex, global_keys, prepare
from aquila.node.storage.store import Store

REFILL_CHUNK = 65_536


def snapshot_index(path: Path, shards: int, *, read_only: bool = False) -> VectorIndex | None:
    """The index the snapshot at `path` holds (the state it covers), None if it does not
    load. `read_only`: the store is read beside the node that runs on it."""
    loaded = VectorIndex.load(path, shards)
    if loaded is None:
        return None
    index, covered = loaded
    if index.pending is None:
        return index
    store = Store(path.parent / "db", fsync=False, read_only=read_only)
    store.open()
    try:
        meta = store.get_meta()
        if meta is None:
            return None
        spec = CollectionSpec.from_json(orjson.loads(meta))
        index.refill((prepare(rows, spec.metric), global_keys(s, labels))
                     for s, q in sorted(covered.items())
                     for rows, labels in store.iter_live_vectors(s, q, REFILL_CHUNK, spec.dim))
    finally:
        store.close()
    return index
