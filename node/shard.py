"""One local shard = its slice of the collection's store + its FAISS index + its label map,
and the invariants between them:

- every live document of the shard (and nothing else) is in the index under its label, once
  every change up to `applied_seq` has been applied;
- the snapshot on disk covers the changes up to the seq stored in it; the change log replays
  the rest.

Methods here are blocking (RocksDB, FAISS) and run on `node.blocking` threads; the collection
serialises mutations and excludes them from searches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from cluster.docs import Incoming
from cluster.spec import CollectionSpec
from node.index import ShardIndex, prepare
from node.store import Record, Store, WriteBatch

log = logging.getLogger(__name__)


class IndexState(StrEnum):
    BUFFERING = "buffering"
    """Exact flat search: too few vectors to train IVF yet."""
    TRAINING = "training"
    """An IVF index is being trained in the background; the current index keeps serving."""
    TRAINED = "trained"
    """Serving from a trained IVF index (or a collection of type flat, which never trains)."""


@dataclass
class IndexOps:
    """What a durable write batch changes in one shard's index, applied after the write."""

    remove: list[int] = field(default_factory=list)
    add_labels: list[int] = field(default_factory=list)
    add_vectors: list[np.ndarray] = field(default_factory=list)
    new_labels: dict[int, str] = field(default_factory=dict)
    count_delta: int = 0
    last_seq: int = 0
    applied: int = 0  # documents that changed (a stale version changes nothing)
    deleted: int = 0  # live documents turned into tombstones


class Shard:
    def __init__(self, spec: CollectionSpec, shard: int, store: Store, snap_dir: Path) -> None:
        self.spec = spec
        self.shard = shard
        self.store = store
        self.snap_path = snap_dir / f"shard-{shard}.faiss"
        self.index = ShardIndex.flat(spec.dim, spec.metric)
        self.labels: dict[int, str] = {}
        self.next_seq = 1
        self.next_label = 1
        self.applied_seq = 0
        self.snapshot_seq = 0
        self.count = 0
        self.training = False

    @property
    def state(self) -> IndexState:
        if self.training:
            return IndexState.TRAINING
        if self.index.trained or self.spec.index.type == "flat":
            return IndexState.TRAINED
        return IndexState.BUFFERING

    # -- start ----------------------------------------------------------------------------
    def load(self) -> None:
        """Counters and labels from the store, the index from its snapshot (or rebuilt from
        the store when missing or damaged), then the changes the snapshot does not cover."""
        self.next_seq, self.next_label = self.store.counters(self.shard)
        self.labels = dict(self.store.iter_labels(self.shard))
        loaded = ShardIndex.load(self.snap_path)
        if loaded is not None:
            self.index, covered = loaded
            self.replay(self.index, covered)
            self.snapshot_seq = covered
        else:
            if self.snap_path.exists():
                log.warning("snapshot %s is damaged; rebuilding from the store", self.snap_path)
            self.index = self.build_flat()
        self.applied_seq = self.next_seq - 1
        self.count = self.index.ntotal

    def build_flat(self) -> ShardIndex:
        vectors, labels = self.live_vectors(None)
        index = ShardIndex.flat(self.spec.dim, self.spec.metric)
        index.add(vectors, labels)
        return index

    def live_vectors(self, max_seq: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Every live document's (prepared) vector and label, with seq ≤ max_seq if given."""
        vecs: list[bytes] = []
        labels: list[int] = []
        for _, rec in self.store.iter_docs(self.shard):
            if rec.tombstone or (max_seq is not None and rec.seq > max_seq):
                continue
            vecs.append(rec.vector)
            labels.append(rec.label)
        if not vecs:
            return np.zeros((0, self.spec.dim), np.float32), np.zeros(0, np.int64)
        x = np.frombuffer(b"".join(vecs), dtype="<f4").reshape(len(vecs), self.spec.dim)
        return prepare(x, self.spec.metric), np.asarray(labels, dtype=np.int64)

    def replay(self, index: ShardIndex, after_seq: int) -> int:
        """Apply to `index` every change logged after `after_seq`; returns how many."""
        changes = list(self.store.iter_changes(self.shard, after_seq))
        if not changes:
            return 0
        recs = self.store.get_records(self.shard, [doc_id for _, doc_id in changes])
        remove = [r.label for r in recs if r is not None]
        live = [r for r in recs if r is not None and not r.tombstone]
        index.remove(np.asarray(remove, dtype=np.int64))
        if live:
            x = np.frombuffer(b"".join(r.vector for r in live), dtype="<f4")
            x = prepare(x.reshape(len(live), self.spec.dim), self.spec.metric)
            index.add(x, np.asarray([r.label for r in live], dtype=np.int64))
        return len(changes)

    # -- writes ---------------------------------------------------------------------------
    def prepare_writes(self, docs: list[Incoming], batch: WriteBatch) -> IndexOps:
        """Stage `docs` (upserts and deletes) into `batch`; last writer wins per document.

        Counters advance here; they are written in the same batch, so a failed write is
        rolled back by `rollback` and a crash leaves none of it."""
        ops = IndexOps()
        olds = self.store.get_records(self.shard, [d.id for d in docs])
        staged: dict[str, Record] = {}
        for doc, old in zip(docs, olds, strict=True):
            old = staged.get(doc.id, old)
            tomb = doc.vector is None
            if old is not None and not _wins(doc, old):
                continue
            if tomb and (old is None or old.tombstone):
                continue  # deleting what is not there: nothing to record
            label = old.label if old is not None else self.next_label
            if old is None:
                self.next_label += 1
                ops.new_labels[label] = doc.id
            rec = Record(
                version=doc.version,
                label=label,
                seq=self.next_seq,
                tombstone=tomb,
                writer=doc.writer,
                vector=b"" if doc.vector is None else doc.vector.astype("<f4").tobytes(),
                metadata=b"" if tomb else doc.metadata,
            )
            self.next_seq += 1
            batch.put_doc(self.shard, doc.id, rec, old)
            staged[doc.id] = rec
            was_live = old is not None and not old.tombstone
            if was_live:
                ops.remove.append(label)
            if not tomb:
                ops.add_labels.append(label)
                ops.add_vectors.append(rec.vector_array())
            ops.count_delta += (0 if tomb else 1) - (1 if was_live else 0)
            ops.deleted += int(tomb and was_live)
            ops.applied += 1
        # An id written twice in one batch: only its last version stays in the index.
        if len(set(ops.add_labels)) != len(ops.add_labels):
            last: dict[int, np.ndarray] = {}
            for lab, vec in zip(ops.add_labels, ops.add_vectors, strict=True):
                last[lab] = vec
            ops.remove = [lab for lab in dict.fromkeys(ops.remove) if lab not in ops.new_labels]
            ops.add_labels = list(last)
            ops.add_vectors = list(last.values())
        batch.put_counters(self.shard, self.next_seq, self.next_label)
        ops.last_seq = self.next_seq - 1
        return ops

    def rollback(self, seq: int, label: int) -> None:
        self.next_seq, self.next_label = seq, label

    def apply(self, ops: IndexOps) -> None:
        """Bring the index up to the durable state (caller holds the index write lock)."""
        self.index.remove(np.asarray(ops.remove, dtype=np.int64))
        if ops.add_labels:
            x = prepare(np.vstack(ops.add_vectors), self.spec.metric)
            self.index.add(x, np.asarray(ops.add_labels, dtype=np.int64))
        self.labels.update(ops.new_labels)
        self.count += ops.count_delta
        self.applied_seq = max(self.applied_seq, ops.last_seq)

    # -- training -------------------------------------------------------------------------
    def wants_training(self, train_min: int, growth: float) -> bool:
        if self.training or self.spec.index.type == "flat" or self.count < train_min:
            return False
        if not self.index.trained:
            return True
        return self.count >= growth * max(1, self.index.trained_at)

    def train(self, upto_seq: int) -> ShardIndex:
        """A new IVF index over the documents as of `upto_seq` (background thread)."""
        vectors, labels = self.live_vectors(upto_seq)
        return ShardIndex.train_ivf(self.spec, vectors, labels)

    def swap_in(self, index: ShardIndex, trained_upto: int) -> None:
        """Catch the new index up with the writes made while it trained, then serve from it
        (caller holds the collection's write mutex and the index write lock)."""
        self.replay(index, trained_upto)
        self.index = index
        self.count = index.ntotal

    # -- snapshots ------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Save the index with the seq it covers (caller excludes index mutations)."""
        covered = self.applied_seq
        self.index.save(self.snap_path, covered)
        self.snapshot_seq = covered


def _wins(doc: Incoming, old: Record) -> bool:
    return (doc.version, doc.writer) > (old.version, old.writer)
