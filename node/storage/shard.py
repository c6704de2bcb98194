"""One local shard's bookkeeping: its slice of the collection's store, its counters, its
digests and a bitmap of its live labels, and the index changes its writes imply. The vectors
themselves live in the collection's node-wide index (`node.storage.index`), under global keys
`shard << 40 | label`.

Nothing here is held per document but one bit per label given (the live bitmap): ids and
metadata are read from the store when a search returns them (`node.storage.search`), so a
deleted document costs nothing in memory once its delete is durable, and a start reads the
counters, digests and free labels (kept in the store, written with every batch) instead of
every record. A tombstone's label goes back to the shard's free labels once the snapshot
covers its delete (`release`, long before the purge), and a new document takes a free label
before a new one is minted: the labels given (and every array over them) stay bounded by the
peak of the live documents (and of the deletes not yet snapshotted), whatever the churn.

Invariants: every live document of the shard (and nothing else of it) is in the index under
its key, and its bit is set, once every change up to `applied_seq` has been applied; the
change log replays what a snapshot does not cover.

Methods here are blocking (RocksDB) and run on `node.blocking` threads; the collection
serialises mutations and excludes them from searches.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import orjson

from aquila.cluster.model.digests import BUCKETS, bucket_of, record_hash
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.filters import Filter
from aquila.cluster.model.spec import CollectionSpec
from aquila.node.storage.digest_table import DigestTable
from aquila.node.storage.index import LABEL_BITS, global_key, global_keys, prepare
from aquila.node.storage.label_arrays import FreeLabels, capacity, widened
from aquila.node.storage.matches import (
    DEFAULT_CAPACITY,
    MatchSet,
    ShardFilters,
    bits_labels,
    canonical,
)
from aquila.node.storage.payload_index import PayloadIndex
from aquila.node.storage.store import (
    _HEADER,
    _U64,
    NO_LABEL,
    Record,
    Store,
    WriteBatch,
    change_key,
    digest_key,
    doc_key,
    free_key,
    label_key,
    vec_key,
)

_F4 = np.dtype("<f4")
# `digests.bucket_of`'s hash, keyed once: a copy of it costs less than a new one (~0.4 µs
# of a document's write).
_BUCKET_HASH = hashlib.blake2b(digest_size=8, person=b"aq-ae")
# Changes read and applied at a time by a replay. Each change read is a few small Python
# objects (its record's bytes, key, id, vector and metadata) until its chunk is applied: a
# training's catch-up runs beside a bulk load's writes, and at 16,384 a chunk it took Python's
# small-object arenas some 25 MiB above their size at rest, kept after it by the load's
# long-lived objects allocated in between (an arena is given back only once empty). 2,048
# replays as fast (100k new documents into an ivf_sq8 index, in process, best of 4: 1.89 s
# against 1.92 s at 16,384; 2.17 s at 1,024).
REPLAY_CHUNK = 2048


@dataclass
class IndexOps:
    """What a durable write batch (or a replay) changes in the index, applied after it."""

    remove: list[int] = field(default_factory=list)  # global keys
    add_keys: list[int] = field(default_factory=list)  # global keys
    # Raw float32 rows, little-endian: a write's own rows (views of its batch's array, which
    # its documents hold anyway: no copy of each kept until the index has them) or a replay's.
    add_vectors: list[bytes | np.ndarray] = field(default_factory=list)
    add_meta: list[bytes] = field(default_factory=list)  # metadata of the added documents
    gone: list[int] = field(default_factory=list)  # labels that became tombstones
    # Metadata of the documents written or deleted that were live before (their payload
    # index entries go): by label, read with the old records the write looked up anyway.
    old_meta: dict[int, bytes] = field(default_factory=dict)
    count_delta: int = 0
    digest_delta: dict[int, int] = field(default_factory=dict)  # bucket → XOR to apply
    last_seq: int = 0
    applied: int = 0  # documents that changed (a stale version changes nothing)
    deleted: int = 0  # live documents turned into tombstones

    def vectors(self, dim: int, metric: str) -> np.ndarray:
        if not self.add_vectors:
            return np.zeros((0, dim), np.float32)
        joined = b"".join(self.add_vectors)  # type: ignore[arg-type]  # ndarrays are buffers
        rows = np.frombuffer(joined, dtype="<f4").reshape(-1, dim)
        return prepare(rows, metric)


class ShardMeta:
    """The live documents' metadata of a shard, read as a mapping from label (what the
    payload index and ad-hoc filters read): labels from the live bitmap, metadata from the
    store (a scan: for building a payload index or evaluating an ad-hoc filter, not for
    searches)."""

    def __init__(self, shard: Shard) -> None:
        self._shard = shard

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard.live_labels().tolist())

    def __len__(self) -> int:
        return self._shard.count

    def items(self) -> Iterator[tuple[int, bytes]]:
        return self._shard.store.iter_live_metadata(self._shard.shard)

    def values(self) -> Iterator[bytes]:
        return (m for _, m in self.items())


class Shard:
    def __init__(self, spec: CollectionSpec, shard: int, store: Store,
                 filter_cache: int = DEFAULT_CAPACITY) -> None:
        self.spec = spec
        self.shard = shard
        self.store = store
        # One bit per label given, set while its document is live (packed, little-endian
        # bit order as `matches` lays bitmaps out).
        self.live = np.zeros(0, np.uint8)
        # Anti-entropy digests of the records, kept current write by write (no scans), and
        # stored with every batch that changes them (in numpy: `digest_table`).
        self.digests = DigestTable(BUCKETS)
        # Metadata keys filters have used, indexed (built on first use, kept current).
        self.payload = PayloadIndex()
        # The match sets of recent filters (bitmaps over labels, kept current by writes).
        self.filters = ShardFilters(filter_cache)
        self.next_seq = 1
        self.next_label = 1
        self.count = 0
        self.applied_seq = 0
        self._forgotten: dict[int, int] = {}  # purged digests' change, once durable
        # Labels of purged tombstones, given again before new ones are minted.
        self.free = FreeLabels()
        self._freed = np.zeros(0, np.int64)  # the labels a staged purge frees, once durable
        # The change-log position up to which tombstones' labels are released (see `release`).
        self.released_seq = 0


    @property
    def meta(self) -> ShardMeta:
        """The live documents' metadata by label, read from the store (made on demand: kept,
        it would hold the shard in a reference cycle, and a dropped shard, its bitmap and
        payload columns with it, would wait for the collector's next full pass)."""
        return ShardMeta(self)
    def load(self) -> None:
        """Counters and digests from the store (no scan of the records); the live bitmap
        follows from the index once it is loaded (`set_live`)."""
        self.next_seq, self.next_label, self.count = self.store.counters(self.shard)
        self.digests = DigestTable(self.store.digests(self.shard, BUCKETS))
        self.free = FreeLabels(self.store.free_labels(self.shard))
        self.released_seq = self.store.released(self.shard)
        self.live = np.zeros(0, np.uint8)
        self.payload = PayloadIndex()
        self.filters.clear()
        self.applied_seq = self.next_seq - 1

    @staticmethod
    def upgrade(store: Store, shard: int, chunk: int = 50_000) -> None:
        """Write what layout 1 did not store (label → id keys, per-bucket digests) from one
        scan of the shard's records: once, at the first start after an upgrade."""
        digests = [0] * BUCKETS
        batch = store.batch()
        for doc_id, rec in store.iter_docs(shard, vectors=False):
            batch.put_label(shard, rec.label, doc_id.encode())
            digests[bucket_of(doc_id)] ^= record_hash(doc_id, rec.version, rec.writer)
            batch.count += 1
            if batch.count >= chunk:
                store.write(batch)
                batch = store.batch()
        for b, value in enumerate(digests):
            if value:
                batch.put_digest(shard, b, value)
        store.write(batch)

    # -- the live bitmap ------------------------------------------------------------------
    def set_live(self, labels: np.ndarray) -> None:
        """The live labels, all at once (after the index is loaded or rebuilt)."""
        self.live = np.zeros(0, np.uint8)
        self._mark(np.asarray(labels, dtype=np.int64), True)

    def _mark(self, labels: np.ndarray, on: bool) -> None:
        if not len(labels):
            return
        need = (int(labels.max()) >> 3) + 1
        if need > len(self.live):
            self.live = widened(self.live, capacity(need, len(self.live)), 0)
        bit = np.uint8(1) << (labels & 7).astype(np.uint8)
        if on:
            np.bitwise_or.at(self.live, labels >> 3, bit)
        else:
            np.bitwise_and.at(self.live, labels >> 3, ~bit)

    def live_labels(self) -> np.ndarray:
        return bits_labels(self.live)

    def matches(self, flt: Filter, key: str | None = None) -> tuple[MatchSet, bool]:
        """The live documents `flt` admits, as a match set over labels, and whether it came
        from the cache: the one evaluation that searches, counts and scrolls share. `key`:
        `canonical(flt)` when the caller has it. Call under the collection's read lock."""
        return self.filters.get(
            flt, canonical(flt) if key is None else key,
            lambda: self.payload.mask(flt, self.meta, self.next_label),
        )

    def keys(self) -> np.ndarray:
        """Global keys of the shard's live documents (all it has in the index)."""
        return global_keys(self.shard, self.live_labels())

    def live_chunks(self, max_seq: int | None, chunk: int = 65_536
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The live documents' prepared vectors and global keys, with seq ≤ max_seq if
        given, a chunk at a time (the chunk's buffer is reused: consume it before the next)."""
        for rows, labels in self.store.iter_live_vectors(self.shard, max_seq, chunk,
                                                         self.spec.dim):
            yield prepare(rows, self.spec.metric), global_keys(self.shard, labels)

    def changes_after(self, after_seq: int) -> IndexOps:
        """The index changes of every change logged after `after_seq` (replay)."""
        ops = IndexOps()
        for part in self.replay(after_seq):
            ops.remove += part.remove
            ops.add_keys += part.add_keys
            ops.add_vectors += part.add_vectors
        return ops

    def replay(self, after_seq: int, chunk: int = REPLAY_CHUNK) -> Iterator[IndexOps]:
        """`changes_after`, `chunk` changes at a time: the tail a training of millions of
        vectors leaves behind (the writes made meanwhile) is never in memory at once. Each
        document is in the change log once (its latest change), so the chunks apply in any
        grouping."""
        changes = self.store.iter_changes(self.shard, after_seq)
        while part := list(itertools.islice(changes, chunk)):
            ops = self._ops_of([doc_id for _, doc_id in part])
            ops.last_seq = part[-1][0]  # where a replay stopped here would go on from
            yield ops

    def _ops_of(self, ids: list[str]) -> IndexOps:
        ops = IndexOps()
        recs = self.store.get_records(self.shard, ids, cache=False)
        for rec in recs:
            if rec is None or rec.label == NO_LABEL:  # a tombstone whose label was released
                continue
            key = global_key(self.shard, rec.label)
            ops.remove.append(key)
            if not rec.tombstone:
                ops.add_keys.append(key)
                ops.add_vectors.append(rec.vector)
        return ops

    def prepare_writes(self, docs: list[Incoming], batch: WriteBatch) -> IndexOps:
        """Stage `docs` (upserts and deletes) into `batch`; last writer wins per document.

        Counters advance here and are written in the same batch: `rollback` undoes them when
        the write fails, and a crash leaves none of it."""
        ids = [d.id for d in docs]
        olds = self.store.get_records(self.shard, ids, vectors=False)
        if len(set(ids)) == len(ids):
            return self._prepare_distinct(docs, olds, batch)
        return self._prepare_general(docs, olds, batch)

    def _prepare_distinct(
        self, docs: list[Incoming], olds: list[Record | None], batch: WriteBatch
    ) -> IndexOps:
        """`prepare_writes` when no id comes twice (the usual batch): the same records,
        keys and index changes as `_prepare_general`, in one lean pass with no Record
        objects (ingest spends its time here)."""
        ops = IndexOps()
        shard, dim = self.shard, self.spec.dim
        doc_prefix, change_prefix = doc_key(shard, ""), change_key(shard, 0)[:3]
        key_base = shard << LABEL_BITS
        row_bytes = 4 * dim
        pack_head = _HEADER.pack
        blake2b = hashlib.blake2b
        bucket_hash = _BUCKET_HASH.copy
        put, delete = batch.raw_put, batch.raw_delete
        tomb_put, tomb_delete = batch.tomb_put, batch.tomb_delete
        vec_put, vec_delete = batch.vec_put, batch.vec_delete
        change_put, change_delete = batch.change_put, batch.change_delete
        pack_seq = _U64.pack
        label_prefix = label_key(shard, 0)[:3]
        vec_prefix = vec_key(shard, 0)[:3]
        free_prefix = free_key(shard, 0)[:3]
        free = self.free
        old_meta = ops.old_meta
        writers: dict[str, bytes] = {}
        digest_delta = ops.digest_delta
        remove, add_keys, add_vectors, add_meta = (
            ops.remove, ops.add_keys, ops.add_vectors, ops.add_meta)
        seq, next_label = self.next_seq, self.next_label
        count_delta = applied = deleted = 0
        for doc, old in zip(docs, olds, strict=True):
            version, writer = doc.version, doc.writer
            was_live = was_tomb = False
            label = NO_LABEL
            if old is not None:
                if (version, writer) <= (old.version, old.writer):
                    continue
                label = old.label
                was_live = not old.tombstone
                was_tomb = old.tombstone
                if was_live:
                    old_meta[label] = old.metadata
            vec = doc.vector
            idb = doc.id.encode()
            # A new document, or one revived from a tombstone whose label was released,
            # takes a label; a delete of an unknown id needs none (no vector held anywhere).
            if label == NO_LABEL and vec is not None:
                if free:
                    label = free.take()
                    delete(free_prefix + pack_seq(label))
                else:
                    label = next_label
                    next_label += 1
                put(label_prefix + pack_seq(label), idb)
            wb = writers.get(writer)
            if wb is None:
                wb = writers[writer] = writer.encode()
            # The record as `WriteBatch.put_doc` lays it out (its vector under V), and the
            # digests as `digests.record_hash` and `digests.bucket_of` compute them, inline:
            # this loop is where a bulk import spends its time.
            # A tombstone's record in the column family of tombstones (see store), the other
            # kind's record of the id removed.
            if vec is None:
                tomb_put(doc_prefix + idb, pack_head(version, label, seq, 1, 0, len(wb)) + wb)
                if was_live:
                    delete(doc_prefix + idb)
                    vec_delete(vec_prefix + pack_seq(label))
            else:
                vb = (vec if vec.dtype == _F4 else vec.astype(_F4)).tobytes()
                if len(vb) != row_bytes:
                    raise ValueError(f"vector of {doc.id!r} has the wrong dimension")
                put(doc_prefix + idb, b"".join((pack_head(version, label, seq, 0, 0, len(wb)),
                                               wb, doc.metadata)))
                if was_tomb:
                    tomb_delete(doc_prefix + idb)
                vec_put(vec_prefix + pack_seq(label), pack_seq(seq) + vb)
            if old is not None:
                change_delete(change_prefix + pack_seq(old.seq))
            change_put(change_prefix + pack_seq(seq), idb)
            seq += 1
            change = int.from_bytes(
                blake2b(b"%b\x00%d\x00%b" % (idb, version, wb), digest_size=16).digest(), "big")
            if old is not None:
                change ^= record_hash(doc.id, old.version, old.writer)
            h = bucket_hash()
            h.update(idb)
            b = int.from_bytes(h.digest(), "big") % BUCKETS
            digest_delta[b] = digest_delta.get(b, 0) ^ change
            key = key_base | label
            if was_live:
                remove.append(key)
            if vec is not None:
                add_keys.append(key)
                add_vectors.append(vec if vec.dtype == _F4 and vec.flags.c_contiguous else vb)
                add_meta.append(doc.metadata)
                count_delta += 0 if was_live else 1
                applied += 1
            elif was_live:
                ops.gone.append(label)
                count_delta -= 1
                deleted += 1
                applied += 1
        ops.count_delta, ops.applied, ops.deleted = count_delta, applied, deleted
        self.next_seq, self.next_label = seq, next_label
        ops.last_seq = seq - 1
        return ops

    def _prepare_general(
        self, docs: list[Incoming], olds: list[Record | None], batch: WriteBatch
    ) -> IndexOps:
        """`prepare_writes` for a batch that names an id more than once: later writes of it
        see the earlier ones."""
        ops = IndexOps()
        staged: dict[str, Record] = {}
        # Index additions by key: a later write of the same id in this batch replaces (or,
        # for a delete, cancels) an earlier one, since removals are applied before additions.
        adds: dict[int, tuple[bytes, bytes]] = {}
        count = self.count
        for doc, old in zip(docs, olds, strict=True):
            old = staged.get(doc.id, old)
            tomb = doc.vector is None
            if old is not None and (doc.version, doc.writer) <= (old.version, old.writer):
                continue
            # A delete of an unknown id is still recorded as a tombstone: a replica may see
            # the delete before the write it deletes, which must then lose to it.
            # A delete of an unknown id needs no label (no vector held anywhere); a new
            # document, or one revived from a tombstone whose label was released, takes one.
            label = NO_LABEL if old is None else old.label
            if label == NO_LABEL and not tomb:
                if self.free:
                    label = self.free.take()
                    batch.take_free(self.shard, label)
                else:
                    label = self.next_label
                    self.next_label += 1
                batch.put_label(self.shard, label, doc.id.encode())
            if old is not None and doc.id not in staged and not old.tombstone:  # live before
                ops.old_meta[label] = old.metadata
            rec = Record(
                version=doc.version,
                label=label,
                seq=self.next_seq,
                tombstone=tomb,
                writer=doc.writer,
                vector=b"" if doc.vector is None else doc.vector.astype(_F4).tobytes(),
                metadata=b"" if tomb else doc.metadata,
            )
            self.next_seq += 1
            batch.put_doc(self.shard, doc.id, rec, old)
            b = bucket_of(doc.id)
            change = record_hash(doc.id, rec.version, rec.writer)
            if old is not None:
                change ^= record_hash(doc.id, old.version, old.writer)
            ops.digest_delta[b] = ops.digest_delta.get(b, 0) ^ change
            staged[doc.id] = rec
            key = global_key(self.shard, label)
            was_live = old is not None and not old.tombstone
            if was_live:
                ops.remove.append(key)
            if not tomb:
                adds[key] = (rec.vector, rec.metadata)
            elif was_live:
                adds.pop(key, None)
                ops.gone.append(label)
            delta = (0 if tomb else 1) - (1 if was_live else 0)
            ops.count_delta += delta
            count += delta
            ops.deleted += int(tomb and was_live)
            ops.applied += int(not tomb or was_live)
        ops.add_keys = list(adds)
        ops.add_vectors = [v for v, _ in adds.values()]
        ops.add_meta = [m for _, m in adds.values()]
        ops.last_seq = self.next_seq - 1
        return ops

    def stage_totals(self, batch: WriteBatch, ops: list[IndexOps]) -> None:
        """The counters and the changed buckets' digests after `ops` (every write of this
        shard in `batch`), into the batch: once per shard and batch, so that several writes
        of one shard in a group commit add up."""
        delta: dict[int, int] = {}
        for o in ops:
            for b, x in o.digest_delta.items():
                delta[b] = delta.get(b, 0) ^ x
        self._stage_digests(batch, delta)
        batch.put_counters(self.shard, self.next_seq, self.next_label,
                           self.count + sum(o.count_delta for o in ops))

    def _stage_digests(self, batch: WriteBatch, delta: dict[int, int]) -> None:
        """The buckets of `delta` (bucket -> XOR) as they will be, into `batch`; the table
        itself moves once the batch is durable."""
        put = batch.raw_put
        for b, raw in self.digests.xored(delta):
            put(digest_key(self.shard, b), raw)

    def durable(self, ops: IndexOps) -> None:
        """Record that `ops`' write reached the store (the index follows shortly)."""
        self.count += ops.count_delta
        self.digests.xor_many(ops.digest_delta)

    def forget(self, gone: list[tuple[str, Record]], batch: WriteBatch) -> None:
        """Purged tombstones leave the store (their record, change and label keys) and the
        digests: staged into `batch`; `self.digests` moves when `forgotten` is called after
        the batch is durable."""
        delta: dict[int, int] = {}
        for doc_id, rec in gone:
            batch.forget(self.shard, doc_id, rec)
            b = bucket_of(doc_id)
            delta[b] = delta.get(b, 0) ^ record_hash(doc_id, rec.version, rec.writer)
        self._stage_digests(batch, delta)
        self._forgotten = delta
        self._freed = np.fromiter((rec.label for _, rec in gone if rec.label != NO_LABEL),
                                  np.int64)

    def release(self, gone: list[tuple[str, Record]], upto: int, batch: WriteBatch
                ) -> np.ndarray:
        """The labels of these tombstones (each holding one, its delete covered by the
        snapshot and by any training in progress) released, and the position up to which the
        change log is done: staged into `batch`. Returns the labels, to `free.put` once the
        batch is durable (and `released_seq` to move). No index a restart loads or a training builds can hold
        their old vectors then, and the index that serves removed them when their deletes
        were applied: a search, which resolves labels under the read lock, never meets
        them. Their counters, digests and change-log keys are unchanged."""
        for doc_id, rec in gone:
            batch.release(self.shard, doc_id, rec)
        batch.put_released(self.shard, upto)
        return np.fromiter((rec.label for _, rec in gone), np.int64, len(gone))

    def forgotten(self) -> None:
        """The purge's batch is durable: its digests move, its labels are free to give."""
        self.digests.xor_many(self._forgotten)
        self._forgotten = {}
        self.free.put(self._freed)
        self._freed = np.zeros(0, np.int64)

    def mark(self) -> tuple[int, int, int]:
        """What `rollback` returns to: the counters and the free labels before a write."""
        return self.next_seq, self.next_label, self.free.mark()

    def rollback(self, mark: tuple[int, int, int]) -> None:
        self.next_seq, self.next_label, free = mark
        self.free.restore(free)

    def applied(self, ops: IndexOps) -> None:
        """Record that `ops` reached the index (the count moved when it was made durable)."""
        old = ops.old_meta
        labels = np.asarray(ops.add_keys, dtype=np.int64) & ((1 << LABEL_BITS) - 1)
        added: list[int] = labels.tolist()
        if self.payload.keys:  # no key indexed: nothing to update per document
            for label in ops.gone:
                self.payload.update(label, old.get(label), None)
            for label, meta in zip(added, ops.add_meta, strict=True):
                self.payload.update(label, old.get(label), meta)
        self._mark(np.asarray(ops.gone, dtype=np.int64), False)
        self._mark(labels, True)
        self.filters.written(
            ops.gone, added, lambda: [orjson.loads(m) if m else {} for m in ops.add_meta]
        )
        self.applied_seq = max(self.applied_seq, ops.last_seq)
