"""The RocksDB (rocksdict) store of one collection on this node: the source of truth.

One database per collection (deleting a collection removes its directory). Key layout, every
key of a shard behind a 2-byte big-endian shard number so a shard is one contiguous range:

    b"M"                          -> collection spec (JSON)
    b"C" shard                    -> counters: next seq, next label, live documents (3 × u64)
    b"D" shard id                 -> document record (see `Record`; its vector under V, not
                                     here): a live document's in the default column family,
                                     a tombstone's in the column family "tombstones", which
                                     has no bloom filters (a write's look-up of an id reads
                                     the default one first, then this one; a record is in
                                     one of them, moved in the batch that changes its kind):
                                     filter bits of every tombstone kept for its grace period
                                     grew the cache with the deletes (10 bits each, read
                                     whole into the cache with each new table file), while a
                                     new id's look-up there is one index and data block read
    b"V" shard label(u64 BE)      -> seq(u64 BE) + the vector's float32 bytes (little-endian),
                                     for each live document, in the column family "vectors"
                                     (uncompressed, see `Store.open`): put, overwritten and
                                     deleted in the batch of its record (one batch is atomic
                                     across column families), so a search re-ranks and returns
                                     vectors by label (no id, no record) and a training scans
                                     only vectors
    b"Q" shard seq(u64 BE)        -> id: the change log, one entry per document (its latest
                                     change), so replay after a snapshot reads only what came
                                     after; in the column family "changes", which has no
                                     bloom filters (the log is only scanned, never looked up
                                     by key: its keys' filter bits, ten a document, deleted
                                     ones' too until their purge, were cache nobody read)
    b"L" shard label(u64 BE)      -> id: every label given and not purged (tombstones' too)
    b"G" shard bucket(u16 BE)     -> the anti-entropy digest of the bucket (16 bytes), written
                                     in the batch of every change to the bucket
    b"R" shard label(u64 BE)      -> empty: a label free to give again (its tombstone purged),
                                     written in the purge's batch, deleted in the batch of the
                                     write that takes it
    b"P" shard                    -> u64: the change-log position up to which the labels of
                                     tombstones have been released (absent: 0; see below)
    b"F"                          -> the layout's version (absent: 1, before L and G existed;
                                     2 before R: the labels purged then are never given again;
                                     3 before a tombstone's label was released, label 0;
                                     4 before V: records held their vectors, split once at
                                     the first open, see `split_vectors`; 5 before the
                                     column family of changes: Q keys moved once, see
                                     `move_changes`; 6 before the column family of
                                     tombstones: moved once, see `move_tombstones`)

A document's label is a stable int64 within its shard, kept for its whole life (tombstone
included), so updates and deletes remove exactly the old vector from the index. A purged
tombstone's label is given again to a later new document: labels in use (live documents and
tombstones) stay below the peak of their number, and so do the arrays over labels in memory.
A tombstone's label is released (the record rewritten with label 0, "no label", its L key
deleted and its R key put, in one batch) as soon as the snapshot on disk and any training in
progress cover its delete (`Collection.release_labels`, from the change log past P): no index
a restart loads or a training builds can hold its old vector then, so a deleted document holds
no label once its delete is durable and snapshotted, whatever the grace period before its
purge. A delete of an unknown id is stored with label 0 at once (no vector was ever held under
it); a write that revives a tombstone of label 0 takes a free label (or a new one). Nothing per
document is held in memory: a search reads its hits' ids (L) and records (D) here, through
the block cache, and a start reads the counters and digests of each shard, not its records.
Records without their vectors are small (header, writer, metadata: ~60 bytes, not 1.5 KB at
dim 384), so a block holds dozens and the cache many more of them; a re-ranking reads only
its candidates' V keys, and its k best's records.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import operator
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import rocksdict

log = logging.getLogger(__name__)
T = TypeVar("T")

FLAG_TOMBSTONE = 1
# The node's RocksDB memory (block cache and memtables together), by default and its bounds.
# What the cache serves is a search's hits' records and a write's look-ups' filter and index
# partitions; under churn it also filled with blocks of table files compacted away since (now
# erased: UNCACHE_AGGRESSIVENESS below), full within a minute at 64 MiB, where at 256 MiB RSS
# grew with it for 5 minutes.
DEFAULT_MEMORY_BYTES = 64 << 20
MIN_MEMORY_BYTES = 32 << 20
MAX_MEMORY_BYTES = 1 << 40
# The part of it memtables may take, over every store of the node, before the store being
# written flushes; and one store's memtable at most (flushed when full). An eighth: their
# swing between flushes is what RSS swings by under steady writes (3.6-13.6 MiB with a
# quarter, 4-7 with an eighth under `bench_memory.py --churn 600`), and a bulk load was no
# slower with it (1M x 96: 32,869 docs/s against 29,702 in the same run).
_MEMTABLE_SHARE = 8
# The part of it that the row cache takes (see RocksMemory).
_ROW_SHARE = 8
_WRITE_BUFFER_BYTES = 32 << 20
# RocksDB's memory of one store, by where it goes (the block cache's is the node's: below).
_MEMORY_PROPERTIES = {
    "memtables": "rocksdb.cur-size-all-mem-tables",
    "table_readers": "rocksdb.estimate-table-readers-mem",
}
# The roles of blocks in the node's cache that /metrics shows (RocksDB's names in its entry
# stats, e.g. "DataBlock(1915,7.45 MB,93.1%)"), and the units of their sizes.
_CACHE_ROLES = {"DataBlock": "cache_data", "FilterBlock": "cache_filter",
                "IndexBlock": "cache_index"}
_CACHE_ROLE = re.compile(r"(\w+)\((\d+),([\d.]+) (B|KB|MB|GB|TB),")
_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def cache_entry_bytes(stats: str) -> dict[str, int]:
    """Bytes of the cache by role (`_CACHE_ROLES`' kinds; 0 for a role not listed) from
    RocksDB's `rocksdb.block-cache-entry-stats` text. RocksDB prints three significant figures
    and collects the stats at most every 10 s: a gauge's precision, not an account's."""
    out = dict.fromkeys(_CACHE_ROLES.values(), 0)
    _, _, roles = stats.partition("Block cache entry stats")
    for role, _count, size, unit in _CACHE_ROLE.findall(roles):
        if role in _CACHE_ROLES:
            out[_CACHE_ROLES[role]] = int(float(size) * _UNITS[unit])
    return out


# Level 0 is compacted into the level below when it holds this many files (RocksDB's default):
# not at every flush (each rewrites the base level it overlaps).
L0_TRIGGER = 4
# How hard RocksDB tries to erase from the block cache the blocks of a table file a flush or
# a compaction has made obsolete (its `uncache_aggressiveness`: 0, its default, never; 1,000
# "until fewer than 1 in 23,000 attempts would find one"; 300 is what RocksDB means to make
# its default). Left there, they stay until the LRU reaches them, so the cache fills to its
# capacity with blocks nobody can read: every new file's filter and index partitions are
# read into it when the file is opened, and under churn each compaction rewrites the files
# of tombstones. Their memory is the budget's, bounded, but the cache then grew for minutes
# with the deletes (4 to 28 MiB over the first 340,000 under `bench_memory.py --churn`). In
# process (60 rounds of 20,000 new keys written, looked up and overwritten, 4 MiB
# memtables, partitions as here): the cache at 40-42 MiB after them with 0, 32 with 100 or
# 300 (a file's data blocks are cached sparsely, so the erasing stops early), 2.8-3.6 with
# 1,000 or 10,000, for the same CPU.
UNCACHE_AGGRESSIVENESS = 1000
# Seconds a close waits at most for the calls in flight on other threads (see Store.close).
_CLOSE_WAIT_S = 60.0
# version, label, seq, flags, dim, writer length
_HEADER = struct.Struct(">QqQBIH")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_COUNTERS = struct.Struct(">QQQ")
# Keys removed a batch when a shard is dropped (`Store.drop_shard`): rocksdict holds the GIL
# through a write (not its fsync), a few ms for these.
_DROP_CHUNK = 5_000
# The tags of the keys that belong to one shard.
_SHARD_TAGS = (b"C", b"D", b"L", b"G", b"R", b"P")  # the default column family's
VECTORS_CF = "vectors"  # V keys
CHANGES_CF = "changes"  # Q keys
TOMBSTONES_CF = "tombstones"  # D keys of tombstones
# A table file's data blocks, in bytes before compression (RocksDB's own default).
BLOCK = 4 << 10
# The tombstones' table files' blocks, in bytes before compression (the other families':
# BLOCK). Under churn their index partitions (one entry a block) enter the block cache with
# each table file opened and grew with the tombstones kept: 0.3 -> 2.2-2.4 MiB over 5M
# deletes at 4 KiB, 0.4 -> 1.1-1.3 at 16 KiB (`bench_memory.py --churn 800 --churn-deletes
# 5500000 --churn-sample 20 --env-b`, one run each: RSS 1.54 -> 1.06 MiB a million deletes
# after the first minute, deletes as fast). A look-up that reaches them (a new id, after
# the live records' filter said no) reads and decompresses a larger block.
TOMBSTONE_BLOCK = 16 << 10
LAYOUT = 7
# Bytes before a V value's vector: its record's seq.
VEC_PREFIX = _U64.size
# V keys read at a time by a scan of the vectors (`Store.iter_live_vectors`): their values
# are joined into one buffer (6 MiB at dim 384) to be read as arrays.
_VEC_BATCH = 4096
# Records read at a time by the readers that join them to their vectors.
_VEC_CHUNK = 1024
NO_LABEL = 0  # a tombstone's label once released (labels given start at 1)


@dataclass(frozen=True, slots=True)
class Record:
    """One document (or its tombstone) as the store's readers give it: the record under D
    and, for a live document read with its vector, the vector under V."""

    version: int
    label: int
    seq: int
    tombstone: bool
    writer: str
    # float32, little-endian, dim × 4 bytes; empty for a tombstone, and for a document read
    # without its vector (`vectors=False`)
    vector: bytes
    metadata: bytes  # JSON object; empty for a tombstone

    def encode(self) -> bytes:
        """The record under D: without its vector (which goes under V)."""
        return encode_record(self.version, self.label, self.seq, self.tombstone,
                             self.writer.encode(), b"", self.metadata)

    @staticmethod
    def decode(raw: bytes, vector: bytes | None = None) -> Record:
        """A stored record; `vector` (from V) in place of the record's own (empty since
        layout 5) when given."""
        version, label, seq, flags, dim, wlen = _HEADER.unpack_from(raw)
        off = _HEADER.size
        writer = raw[off : off + wlen].decode()
        off += wlen
        own = raw[off : off + dim * 4]
        metadata = raw[off + dim * 4 :]
        return Record(version, label, seq, bool(flags & FLAG_TOMBSTONE), writer,
                      own if vector is None else vector, metadata)

    def vector_array(self) -> np.ndarray:
        return np.frombuffer(self.vector, dtype="<f4")


def encode_record(version: int, label: int, seq: int, tombstone: bool, writer: bytes,
                  vector: bytes, metadata: bytes) -> bytes:
    """A record's stored form (see `Record`), from its parts: the writer already encoded."""
    head = _HEADER.pack(version, label, seq, FLAG_TOMBSTONE if tombstone else 0,
                        len(vector) // 4, len(writer))
    return b"".join((head, writer, vector, metadata))


def table_options(cache: rocksdict.Cache, filters: bool = True,
                  block_size: int = BLOCK) -> rocksdict.BlockBasedOptions:
    """A column family's table options, its blocks in `cache` and of `block_size` bytes
    before compression; without bloom filters unless `filters`."""
    table = rocksdict.BlockBasedOptions()
    table.set_block_size(block_size)
    # Bloom filters: every upsert first looks its id up, and new ids miss; without a filter
    # each miss reads a block of every level.
    if filters:
        table.set_bloom_filter(10, False)
    # The node's one cache, memtables charged to it (see RocksMemory); indexes and filters
    # are blocks in it too, not held beside it by the table readers.
    table.set_block_cache(cache)
    table.set_cache_index_and_filter_blocks(True)
    # Partitioned filters and a two-level index: a table file's filter and index are cut in
    # blocks of 4 KiB, cached one by one, with only their small top level pinned. Whole, they
    # grow with the file (tombstones included: ~5 MiB of filter for 4M keys after 1.5M
    # deletes) past the block cache's shard (128 MiB / 64 shards), where they cannot stay:
    # every point look-up read the whole filter (and decompressed the index) again, ~0.5 ms
    # a key, and the buffers fragmented the heap.
    table.set_index_type(rocksdict.BlockBasedIndexType.two_level_index_search())
    table.set_partition_filters(True)
    table.set_metadata_block_size(4096)
    table.set_pin_top_level_index_and_filter(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    return table


def _opened(handle: T | None) -> T:
    """A handle of an open store (its database, a column family or its handle)."""
    if handle is None:
        raise RuntimeError("store is not open")
    return handle


def _shard_key(tag: bytes, shard: int) -> bytes:
    return tag + _U16.pack(shard)


def doc_key(shard: int, doc_id: str) -> bytes:
    return _shard_key(b"D", shard) + doc_id.encode()


def change_key(shard: int, seq: int) -> bytes:
    return _shard_key(b"Q", shard) + _U64.pack(seq)


def label_key(shard: int, label: int) -> bytes:
    return _shard_key(b"L", shard) + _U64.pack(label)


def vec_key(shard: int, label: int) -> bytes:
    return _shard_key(b"V", shard) + _U64.pack(label)


def free_key(shard: int, label: int) -> bytes:
    return _shard_key(b"R", shard) + _U64.pack(label)


def digest_key(shard: int, bucket: int) -> bytes:
    return _shard_key(b"G", shard) + _U16.pack(bucket)


def record_meta(raw: bytes) -> tuple[int, bool, bytes]:
    """(label, tombstone, metadata) of a stored record, without decoding the rest."""
    _, label, _, flags, dim, wlen = _HEADER.unpack_from(raw)
    return label, bool(flags & FLAG_TOMBSTONE), raw[_HEADER.size + wlen + dim * 4:]


# Where a record's seq sits in its header (after its version and label): a V value starts
# with the same 8 bytes.
_SEQ_AT = struct.calcsize(">Qq")


def same_change(raw: bytes, v: bytes | None) -> bool:
    """Whether a V value (read after its record, `raw`) is of the change the record is: not
    when a write of the document landed between the two reads (deleted or written again
    since), nor when there is none."""
    return v is not None and v[:VEC_PREFIX] == raw[_SEQ_AT:_SEQ_AT + VEC_PREFIX]


class NotSynced(Exception):
    """`Store.write`'s batch is written (in the WAL and the memtable: reads see it, a restart
    finds it unless the machine fails first), but the WAL's fsync failed: what the process
    holds in memory must follow the batch (as for a write that succeeded), while its writers
    hear that it may not be durable."""


class WriteBatch:
    """Changes to several shards of one collection, made durable together by `Store.write`
    (made by `Store.batch`: its V keys go to the store's column family of vectors)."""

    def __init__(self, store: Store) -> None:
        self._wb = rocksdict.WriteBatch(raw_mode=True)
        # The store, not its column family's handle: a handle keeps the database open, and
        # a batch may outlive the store's close.
        self._store = store
        self.count = 0

    @property
    def vec_put(self) -> Callable[[bytes, bytes], None]:
        """A put of a V key (`vec_key`) and value (seq + vector)."""
        return functools.partial(self._wb.put, column_family=self._store.vectors_cf)

    @property
    def vec_delete(self) -> Callable[[bytes], None]:
        return functools.partial(self._wb.delete, column_family=self._store.vectors_cf)

    @property
    def tomb_put(self) -> Callable[[bytes, bytes], None]:
        """A put of a tombstone's record (`doc_key`), in the column family of tombstones."""
        return functools.partial(self._wb.put, column_family=self._store.tombstones_cf)

    @property
    def tomb_delete(self) -> Callable[[bytes], None]:
        return functools.partial(self._wb.delete, column_family=self._store.tombstones_cf)

    @property
    def change_put(self) -> Callable[[bytes, bytes], None]:
        """A put of a Q key (`change_key`) and value (the id)."""
        return functools.partial(self._wb.put, column_family=self._store.changes_cf)

    @property
    def change_delete(self) -> Callable[[bytes], None]:
        return functools.partial(self._wb.delete, column_family=self._store.changes_cf)

    def put_doc(self, shard: int, doc_id: str, rec: Record, old: Record | None) -> None:
        """The record (a tombstone's in its column family, the other kind's record of the id
        removed), its vector under V (a live one's; a tombstone's label has none)."""
        key = doc_key(shard, doc_id)
        if rec.tombstone:
            self.tomb_put(key, rec.encode())
            if old is not None and not old.tombstone:
                self._wb.delete(key)
        else:
            self._wb.put(key, rec.encode())
            if old is not None and old.tombstone:
                self.tomb_delete(key)
        if rec.label != NO_LABEL:
            if rec.tombstone:
                self.vec_delete(vec_key(shard, rec.label))
            else:
                self.vec_put(vec_key(shard, rec.label), _U64.pack(rec.seq) + rec.vector)
        if old is not None:
            self.change_delete(change_key(shard, old.seq))
        self.change_put(change_key(shard, rec.seq), doc_id.encode())
        self.count += 1

    @property
    def raw_put(self) -> Callable[[bytes, bytes], None]:
        """The batch's own put, for callers that build keys and values themselves."""
        put: Callable[[bytes, bytes], None] = self._wb.put
        return put

    @property
    def raw_delete(self) -> Callable[[bytes], None]:
        delete: Callable[[bytes], None] = self._wb.delete
        return delete

    def forget(self, shard: int, doc_id: str, rec: Record) -> None:
        """Remove every trace of a document (a tombstone past its grace period); its label
        becomes free to give again."""
        self.tomb_delete(doc_key(shard, doc_id))
        self.change_delete(change_key(shard, rec.seq))
        if rec.label != NO_LABEL:  # released before: nothing of it left to free
            self._wb.delete(label_key(shard, rec.label))
            self.vec_delete(vec_key(shard, rec.label))  # none (a tombstone's): made sure
            self._wb.put(free_key(shard, rec.label), b"")
        self.count += 1

    def release(self, shard: int, doc_id: str, rec: Record) -> None:
        """A tombstone's label released: the record rewritten with no label (its change-log
        key unchanged), the label free to give again."""
        self.tomb_put(doc_key(shard, doc_id), encode_record(
            rec.version, NO_LABEL, rec.seq, True, rec.writer.encode(), b"", b""))
        self._wb.delete(label_key(shard, rec.label))
        self.vec_delete(vec_key(shard, rec.label))  # none (a tombstone's): made sure
        self._wb.put(free_key(shard, rec.label), b"")
        self.count += 1

    def put_released(self, shard: int, seq: int) -> None:
        self._wb.put(_shard_key(b"P", shard), _U64.pack(seq))

    def take_free(self, shard: int, label: int) -> None:
        """A free label given to a new document (its label key is put apart)."""
        self._wb.delete(free_key(shard, label))

    def put_label(self, shard: int, label: int, doc_id: bytes) -> None:
        self._wb.put(label_key(shard, label), doc_id)

    def put_digest(self, shard: int, bucket: int, value: int) -> None:
        self._wb.put(digest_key(shard, bucket), value.to_bytes(16, "big"))

    def put_counters(self, shard: int, next_seq: int, next_label: int, live: int) -> None:
        self._wb.put(_shard_key(b"C", shard), _COUNTERS.pack(next_seq, next_label, live))


class RocksMemory:
    """The RocksDB memory of a node, one budget for all its stores: one LRU block cache
    (data, index and filter blocks) to which a write buffer manager charges every store's
    memtables, and one LRU row cache (`rows`, a `_ROW_SHARE` of the budget), so that blocks,
    memtables and rows together stay within `capacity`. A memtable growing evicts blocks;
    past an eighth of the capacity in memtables, the store being written flushes its
    largest.

    Rows: RocksDB's row cache holds the values that point reads found in table files, each
    found again by one hash look-up, where a block cache hit still walks the file's index
    and filter partitions and searches the data block (each a cache look-up of its own). A
    search reads two values a hit (its id by label, then its record): 10 of them 18-28 µs
    through the blocks, 7 through the rows (`scripts/bench_rest.py` at 1M: 0.48x of FAISS
    in process against 0.41 without, same run). A cache of its own, not rows among the
    blocks: RocksDB fills it with every point read, those that go around the block cache
    too (a replay's, a write's look-ups of existing ids), which may then evict only rows.
    RocksDB refuses range deletes beside a row cache: a shard is dropped key by key.

    The cap is not strict (RocksDB's strict_capacity_limit, which rocksdict does not expose
    anyway, fails a read when the cache is full of pinned blocks, and a write's charge would
    not be refused): the pinned top levels of indexes and filters and a memtable being
    written may take it over for a while. Writes never stall on it either (allow_stall off):
    rocksdict holds the GIL through a write, and a stalled write would stop the whole node
    until a flush ended."""

    def __init__(self, capacity: int = DEFAULT_MEMORY_BYTES) -> None:
        if not MIN_MEMORY_BYTES <= capacity <= MAX_MEMORY_BYTES:
            raise ValueError(f"RocksDB memory must be {MIN_MEMORY_BYTES >> 20} MiB to "
                             f"{MAX_MEMORY_BYTES >> 20} MiB, not {capacity} bytes")
        self.capacity = capacity
        self.row_capacity = capacity // _ROW_SHARE
        self.block_capacity = capacity - self.row_capacity
        self.cache = rocksdict.Cache(self.block_capacity)
        self.rows = rocksdict.Cache(self.row_capacity)
        self.write_buffers = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            capacity // _MEMTABLE_SHARE, False, self.cache)
        # One store's memtable: the whole memtable share in a small budget.
        self.write_buffer_bytes = min(_WRITE_BUFFER_BYTES, capacity // _MEMTABLE_SHARE)

    def used(self) -> int:
        """Bytes the budget holds: blocks and rows of every store, and the memtables."""
        return self.blocks_used() + self.rows_used()

    def blocks_used(self) -> int:
        """Bytes the block cache holds: blocks of every store and the memtables charged to
        it."""
        return int(self.cache.get_usage())

    def rows_used(self) -> int:
        return int(self.rows.get_usage())

    def memtables(self) -> int:
        """Bytes of memtables of every store (what the write buffer manager charges)."""
        return int(self.write_buffers.get_usage())


class Store:
    def __init__(self, path: Path, *, fsync: bool = True, memory: RocksMemory | None = None,
                 read_only: bool = False) -> None:
        """`memory`: the node's budget shared by its stores; a budget of its own if None.
        `read_only`: opened beside the process that owns it, without its lock (for
        benchmarks' readers; nothing is written)."""
        self.path = path
        self._fsync = fsync
        self._read_only = read_only
        self.memory = memory if memory is not None else RocksMemory()
        self._db: rocksdict.Rdict | None = None
        self._vdb: rocksdict.Rdict | None = None  # the column family of vectors
        self._vcf: rocksdict.ColumnFamily | None = None  # its handle, for batches
        self._cdb: rocksdict.Rdict | None = None  # the column family of changes
        self._ccf: rocksdict.ColumnFamily | None = None
        self._tdb: rocksdict.Rdict | None = None  # the column family of tombstones
        self._tcf: rocksdict.ColumnFamily | None = None

    def open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        opts = self._options()
        opts.set_row_cache(self.memory.rows)  # the database's, every column family's
        # Compressed table files: LZ4 (cheap) where data is new, zstd in the last level, where
        # most of it settles. Ids, keys, headers and metadata shrink a lot. Reads at a start
        # are counters and digests: restarts do not see it.
        opts.set_compression_type(rocksdict.DBCompressionType.lz4())
        opts.set_bottommost_compression_type(rocksdict.DBCompressionType.zstd())
        # The vectors (V keys) in a column family of their own, not compressed: a search's
        # re-ranking reads 40-100 of them a query, mostly outside the block cache, and the
        # zstd block's decompression was most of such a read. `scripts/bench_vector_reads.py`
        # (100,000 WordNet vectors, dim 384, multi-gets of 100 random keys, in process):
        # 10-12 µs a key never read before with the records' options, 3.0-3.5 µs here (4.3
        # with LZ4, which saves nothing on them), 1.4 µs either way once cached; table files
        # 152 MiB against 99 (zstd finds the zero bits of vectors that came from float16).
        vopts = self._options()
        vopts.set_compression_type(rocksdict.DBCompressionType.none())
        vopts.set_bottommost_compression_type(rocksdict.DBCompressionType.none())
        copts = self._options(filters=False)  # the change log: compressed as the records
        copts.set_compression_type(rocksdict.DBCompressionType.lz4())
        copts.set_bottommost_compression_type(rocksdict.DBCompressionType.zstd())
        access = (rocksdict.AccessType.read_only() if self._read_only
                  else rocksdict.AccessType.read_write())
        # Tombstones: compressed as the records, no filters (see the module's docstring; nor
        # a memtable's, 2% of the write buffer taken at each memtable's start: a look-up of a
        # new id searches a memtable of recent deletes only, empty in a bulk load). Blocks
        # of TOMBSTONE_BLOCK: fewer entries in the index partitions that come into the cache
        # with each table file opened, which grew with the tombstones kept.
        topts = self._options(filters=False, block_size=TOMBSTONE_BLOCK)
        topts.set_compression_type(rocksdict.DBCompressionType.lz4())
        topts.set_bottommost_compression_type(rocksdict.DBCompressionType.zstd())
        families = {"default": opts, VECTORS_CF: vopts, CHANGES_CF: copts,
                    TOMBSTONES_CF: topts}
        if self._read_only:  # a reader cannot create one (a store of an earlier layout)
            have = set(rocksdict.Rdict.list_cf(str(self.path), opts))
            families = {name: o for name, o in families.items() if name in have}
        self._db = rocksdict.Rdict(str(self.path), opts, column_families=families,
                                   access_type=access)
        self._vdb = self._db.get_column_family(VECTORS_CF)
        self._vcf = self._db.get_column_family_handle(VECTORS_CF)
        if CHANGES_CF in families:
            self._cdb = self._db.get_column_family(CHANGES_CF)
            self._ccf = self._db.get_column_family_handle(CHANGES_CF)
        if TOMBSTONES_CF in families:
            self._tdb = self._db.get_column_family(TOMBSTONES_CF)
            self._tcf = self._db.get_column_family_handle(TOMBSTONES_CF)
        if not self._read_only:  # (not settable in `Options`: a mutable option only)
            for cf in self._families():
                try:
                    cf.set_options({"uncache_aggressiveness": str(UNCACHE_AGGRESSIVENESS)})
                except Exception as exc:  # an older RocksDB (rocksdict 0.3.23's 9.0)
                    log.warning("%s: the block cache keeps obsolete files' blocks: %s",
                                self.path, exc)
                    break
        wo = rocksdict.WriteOptions()
        wo.sync = self._fsync
        self._write_opts = wo
        self._batch_opts = rocksdict.WriteOptions()  # not synced: `write` syncs apart
        # Scans (training, rebuilds, transfers, purges) read every block once: they go
        # around the block cache, which keeps what searches read (their hits' records).
        self._scan_opts = rocksdict.ReadOptions()
        self._scan_opts.fill_cache(False)  # type: ignore[call-arg]
        self._scan_opts.set_readahead_size(2 << 20)
        self._lookup_opts = rocksdict.ReadOptions()  # point reads that do not come back
        self._lookup_opts.fill_cache(False)  # type: ignore[call-arg]

    def _options(self, filters: bool = True, block_size: int = BLOCK) -> rocksdict.Options:
        """A column family's options but its compression; without bloom filters (table
        files' and memtables') unless `filters`; its table files' blocks of `block_size`."""
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        opts.set_max_background_jobs(2)
        # The column families flushed together: the write buffer manager's flush (the
        # node's memtable share reached) otherwise picks one column family, the one of the
        # oldest memtable, which may be the other's, small or empty, and the full one stayed
        # (tests/test_rocks_memory.py: 20 s over the budget instead of 0.4).
        opts.set_atomic_flush(True)
        opts.set_block_based_table_factory(table_options(self.memory.cache, filters, block_size))
        # Bloom filters for the memtables too (2% of their size, ~1.3 MiB each): a new id
        # otherwise costs a skiplist search of every memtable, which made the lookup the
        # largest part of a bulk import (~8 µs of ~30 a document; ~1 µs with it).
        if filters:
            opts.set_memtable_whole_key_filtering(True)
            opts.set_memtable_prefix_bloom_ratio(0.02)
        opts.set_write_buffer_manager(self.memory.write_buffers)
        opts.set_write_buffer_size(self.memory.write_buffer_bytes)
        opts.set_level_zero_file_num_compaction_trigger(L0_TRIGGER)
        # The column families' options are passed to `Rdict` (see `open`): without them
        # rocksdict opens an existing database with those of its OPTIONS file, whose table
        # options have a block cache of their own (8 MiB, outside the node's budget): after
        # a restart a search's records no longer stayed in the cache (3.5 µs a record read
        # became 11.6, WordNet 50k).
        return opts

    @property
    def db(self) -> rocksdict.Rdict:
        return _opened(self._db)

    @property
    def vdb(self) -> rocksdict.Rdict:
        """The column family of vectors (V keys)."""
        return _opened(self._vdb)

    @property
    def vectors_cf(self) -> rocksdict.ColumnFamily:
        """The handle of the column family of vectors (for batches)."""
        return _opened(self._vcf)

    @property
    def cdb(self) -> rocksdict.Rdict:
        """The column family of changes (Q keys)."""
        return _opened(self._cdb)

    @property
    def changes_cf(self) -> rocksdict.ColumnFamily:
        return _opened(self._ccf)

    @property
    def tdb(self) -> rocksdict.Rdict:
        """The column family of tombstones (D keys of deleted documents)."""
        return _opened(self._tdb)

    @property
    def tombstones_cf(self) -> rocksdict.ColumnFamily:
        return _opened(self._tcf)

    def _families(self) -> list[rocksdict.Rdict]:
        """The open column families: default, vectors, changes, tombstones."""
        return [f for f in (self._db, self._vdb, self._cdb, self._tdb) if f is not None]

    def _tombstones_family(self) -> rocksdict.Rdict:
        """Where the tombstones' records are: their column family, or the default one in a
        store opened read-only from before layout 7 (it has none)."""
        return self.db if self._tdb is None else self.tdb

    def busy(self, properties: tuple[str, ...]) -> bool:
        """Whether any of these integer properties is non-zero in any column family (RocksDB
        flushing or compacting, or either pending)."""
        return any(f.property_int_value(p) for f in self._families() for p in properties)

    def batch(self) -> WriteBatch:
        return WriteBatch(self)

    def memory_bytes(self) -> dict[str, int]:
        """RocksDB's own figures of the memory it holds (for /metrics); empty when closed.
        `memtables` and `table_readers` are this store's; the others the node's, shared by
        its stores (see RocksMemory): `block_cache` the blocks in the cache, `row_cache`
        the rows in the row cache, `budget_used` all the budget holds (blocks, rows and every
        store's memtables), `budget` its capacity, and `cache_data`, `cache_filter`,
        `cache_index` the block cache's blocks by role (RocksDB's entry stats: at most 10 s
        old, three significant figures)."""
        db, families = self._db, self._families()
        if db is None or len(families) < 2:
            return {}
        out = {}
        try:  # every column family's
            for kind, prop in _MEMORY_PROPERTIES.items():
                out[kind] = sum(int(f.property_int_value(prop) or 0) for f in families)
            # The cache's blocks by role: the node's, like block_cache.
            stats = db.property_value("rocksdb.block-cache-entry-stats") or ""
        except Exception:  # closed by another thread meanwhile: nothing to report
            return {}
        blocks, rows = self.memory.blocks_used(), self.memory.rows_used()
        out["block_cache"] = max(0, blocks - self.memory.memtables())
        out["row_cache"] = rows
        out["budget_used"] = blocks + rows
        out["budget"] = self.memory.capacity
        out.update(cache_entry_bytes(stats))
        return out

    def flush_memtables(self) -> None:
        """Start writing the memtables out to table files (returns at once), which frees
        them."""
        for family in self._families():
            family.flush(False)

    def level0_files(self) -> int:
        return int(self.db.property_int_value("rocksdb.num-files-at-level0") or 0)

    def close(self) -> None:
        """Close the database; calls made from now on find the store closed. rocksdict lets
        the GIL go inside a multi-get, a WAL fsync or a flush, and refuses to close a database
        another thread is in meanwhile ("Already borrowed"); reads by id, scrolls, transfers
        and anti-entropy scans take no collection lock: the close waits for those in flight
        (each one call, short) instead of leaving the store open."""
        db, self._db = self._db, None
        vdb, self._vdb = self._vdb, None
        cdb, self._cdb = self._cdb, None
        tdb, self._tdb = self._tdb, None
        # A handle keeps the database open (so does a batch).
        self._vcf = self._ccf = self._tcf = None
        if db is None:
            return
        deadline = time.monotonic() + _CLOSE_WAIT_S
        for one in (vdb, cdb, tdb, db):  # column families first: they too keep the database open
            while one is not None:
                try:
                    one.close()
                    break
                except RuntimeError as exc:
                    if "borrowed" not in str(exc) or time.monotonic() > deadline:
                        raise
                time.sleep(0.001)  # on a write thread, never the event loop

    # -- metadata -------------------------------------------------------------------------
    def get_meta(self) -> bytes | None:
        v = self.db.get(b"M")
        return bytes(v) if v is not None else None

    def put_meta(self, raw: bytes) -> None:
        self.db.put(b"M", raw, self._write_opts)

    # -- documents ------------------------------------------------------------------------
    def get_records(self, shard: int, ids: list[str], *, cache: bool = True,
                    vectors: bool = True) -> list[Record | None]:
        """The records of these ids (None where absent), live ones with their vectors unless
        `vectors` is False (a write's look-up, a purge: their vectors are not needed);
        `cache=False` for reads that do not come back (a replay, a write's look-up): they go
        around the block cache."""
        if not ids:
            return []
        keys = [doc_key(shard, i) for i in ids]
        return self._joined(keys, self.raw_docs(keys, cache), vectors, cache)

    def get_records_multi(self, keys: list[tuple[int, str]], *, vectors: bool = True
                          ) -> list[Record | None]:
        if not keys:
            return []
        dkeys = [doc_key(s, i) for s, i in keys]
        return self._joined(dkeys, self.raw_docs(dkeys, True), vectors)

    def raw_docs(self, keys: list[bytes], cache: bool = True) -> list[bytes | None]:
        """The stored records of these doc keys, live or tombstones (None where neither): the
        live ones' column family read first, then that of tombstones for the keys it has
        not (a store opened read-only from before it has none: its tombstones are with the
        live ones). A write moving a key from one to the other between the two reads is
        missed (None), as if it came just before the read; nothing is read twice."""
        raws = self._get_many(self.db, keys, cache)
        missing = [i for i, r in enumerate(raws) if r is None]
        if missing and self._tdb is not None:
            got = self._get_many(self.tdb, [keys[i] for i in missing], cache)
            for i, raw in zip(missing, got, strict=True):
                raws[i] = raw
        return raws

    def _joined(self, keys: list[bytes], raws: list[bytes | None], vectors: bool,
                cache: bool = True) -> list[Record | None]:
        """Stored records (read from their doc `keys`) decoded, the live ones' vectors read
        from V (one multi-get, or one get each around the block cache when not `cache`) when
        `vectors`. A write may land between the two reads (they take no lock): a vector
        missing or of another seq than its record is read again with its record, as they
        are now (None if the record is gone since)."""
        out = [Record.decode(r) if r is not None else None for r in raws]
        if not vectors:
            return out
        want = [(i, vec_key(_U16.unpack_from(keys[i], 1)[0], rec.label))
                for i, rec in enumerate(out)
                if rec is not None and not rec.tombstone and not rec.vector]
        if not want:
            return out
        got = self._get_many(self.vdb, [k for _, k in want], cache)
        for (i, _), v in zip(want, got, strict=True):
            rec = out[i]
            raw = raws[i]
            assert rec is not None and raw is not None
            if same_change(raw, v):
                assert v is not None
                out[i] = Record.decode(raw, v[VEC_PREFIX:])
            else:
                out[i] = self.read_again(keys[i])
        return out

    def _get_many(self, db: rocksdict.Rdict, keys: list[bytes], cache: bool
                  ) -> list[bytes | None]:
        """These keys' values (None where absent): one multi-get through the block cache, or
        one get each around it when not `cache` (rocksdict's multi-get ignores the read
        options' fill_cache: a replay after a training filled the whole cache with records
        read once)."""
        if cache:
            got: list[bytes | None] = db.get(keys)  # type: ignore[assignment,arg-type]
            return got
        get, opts = db.get, self._lookup_opts
        return [get(k, read_opt=opts) for k in keys]

    def read_again(self, key: bytes, tries: int = 1000, *, damaged_ok: bool = False
                   ) -> Record | None:
        """The record of this doc key with its vector, read until both reads agree (each
        retry means a write of it landed between them); None when the record is gone. When
        they never agree within `tries` (a live document's vector missing: a damaged store),
        None if `damaged_ok`, else RuntimeError."""
        shard = _U16.unpack_from(key, 1)[0]
        for _ in range(tries):
            raw = self.raw_docs([key], True)[0]
            if raw is None:
                return None
            rec = Record.decode(raw)
            if rec.tombstone or rec.vector:
                return rec
            v = self.vdb.get(vec_key(shard, rec.label))
            if same_change(raw, v):
                assert v is not None
                return Record.decode(raw, v[VEC_PREFIX:])
        if damaged_ok:
            return None
        raise RuntimeError(f"the vector of a live document is missing ({key!r})")

    def vectors(self, keys: list[bytes]) -> list[bytes | None]:
        """V values (seq + vector, `vec_key`) of these keys, None where absent: one
        multi-get, through the block cache (a search's re-ranking)."""
        return self._get_many(self.vdb, keys, True) if keys else []

    def split_vectors(self, shard: int, chunk: int = 20_000) -> int:
        """Layout 4 to 5: the shard's records that still hold their vectors rewritten without
        them, each live one's vector put under V, `chunk` records a batch; the number
        rewritten. A record already split holds none (vector length 0): run again after a
        crash midway, it rewrites only what is left."""
        pack, unpack = _HEADER.pack, _HEADER.unpack_from

        def split(batch: WriteBatch, key: bytes, raw: bytes) -> bool:
            version, label, seq, flags, dim, wlen = unpack(raw)
            if dim == 0:
                return False
            off = _HEADER.size + wlen
            end = off + dim * 4
            batch.raw_put(key, b"".join((pack(version, label, seq, flags, 0, wlen),
                                         raw[_HEADER.size:off], raw[end:])))
            if not flags & FLAG_TOMBSTONE and label != NO_LABEL:
                batch.vec_put(vec_key(shard, label), _U64.pack(seq) + raw[off:end])
            return True

        return self._in_batches(self._scan(_shard_key(b"D", shard)), split, chunk)

    def move_changes(self, chunk: int = 50_000) -> int:
        """Layout 5 to 6: the change log's keys (every shard's) copied from the default column
        family to that of changes, `chunk` a batch, each removed from the default one in the
        batch that copies it; the number moved. Run again after a crash midway, it moves
        what is still there."""
        def move(batch: WriteBatch, key: bytes, value: bytes) -> bool:
            batch.change_put(key, value)
            batch.raw_delete(key)  # key by key: no range delete beside a row cache
            return True

        return self._in_batches(self._scan(b"Q"), move, chunk)

    def move_tombstones(self, chunk: int = 50_000) -> int:
        """Layout 6 to 7: the tombstones' records (every shard's) moved from the default column
        family to that of tombstones, `chunk` a batch (each batch puts and deletes its
        records together); the number moved. Run again after a crash midway, it moves what
        is still there."""
        def move(batch: WriteBatch, key: bytes, raw: bytes) -> bool:
            if not _HEADER.unpack_from(raw)[3] & FLAG_TOMBSTONE:
                return False
            batch.tomb_put(key, raw)
            batch.raw_delete(key)
            return True

        return self._in_batches(self._scan(b"D"), move, chunk)

    def _in_batches(self, items: Iterator[tuple[bytes, bytes]],
                    stage: Callable[[WriteBatch, bytes, bytes], bool], chunk: int,
                    finish: Callable[[WriteBatch], None] | None = None) -> int:
        """A layout's upgrade: `stage` each scanned (key, value) into a batch (False: nothing
        to do for it), a batch written every `chunk` staged; `finish` into the last one,
        written then even if it staged nothing. The number staged."""
        batch = self.batch()
        done = 0
        for key, value in items:
            if not stage(batch, key, value):
                continue
            batch.count += 1
            done += 1
            if batch.count >= chunk:
                self.write(batch)
                batch = self.batch()
        if finish is not None:
            finish(batch)
        if batch.count or finish is not None:
            self.write(batch)
        return done

    def write(self, batch: WriteBatch) -> None:
        """Durable (through the WAL, fsynced when configured) once this returns.

        The batch is written to the WAL and the memtable first, then the WAL is fsynced by a
        call of its own: rocksdict holds the GIL for the whole of a write, a synced one's
        fsync included, which would stop every other thread of the node (the event loop
        too) for each batch's fsync; its flush_wal lets the GIL go. The durability is the
        same (RocksDB's FlushWAL(sync) is SyncWAL: every WAL file up to the current one is
        fsynced before it returns); the records may be read in the meantime, before they
        are acknowledged."""
        self.db.write(batch._wb, self._batch_opts)
        if self._fsync:
            try:
                self.db.flush_wal(True)
            except Exception as exc:
                raise NotSynced(f"the write-ahead log's fsync failed: {exc}") from exc

    def layout(self) -> int:
        raw = self.db.get(b"F")
        return 1 if raw is None else int(_U16.unpack(raw)[0])

    def put_layout(self, version: int = LAYOUT) -> None:
        self.db.put(b"F", _U16.pack(version), self._write_opts)

    def digests(self, shard: int, buckets: int) -> list[int]:
        """The shard's stored digests, one per bucket (0 for a bucket never written)."""
        out = [0] * buckets
        prefix = _shard_key(b"G", shard)
        for key, raw in self._scan(prefix):
            b = _U16.unpack_from(key, 3)[0]
            if b < buckets:
                out[b] = int.from_bytes(raw, "big")
        return out

    def ids_of_labels(self, shard: int, labels: list[int]) -> list[bytes | None]:
        if not labels:
            return []
        got: list[bytes | None] = self.db.get([label_key(shard, lab) for lab in labels])  # type: ignore[assignment]
        return got

    def raw_records(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        got: list[bytes | None] = self.db.get([k for k in keys])  # type: ignore[assignment]
        return got

    def iter_live_vectors(self, shard: int, max_seq: int | None, chunk: int, dim: int,
                          batch: int = _VEC_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(float32 rows, labels) of the shard's live documents with seq ≤ max_seq (every one
        if None), `chunk` rows at a time, each chunk filled in place (its buffer reused:
        consume it before the next): no copy of the whole. A scan of the V keys only, in
        label order, read `batch` keys at a time as arrays (~1 µs a row, against ~3.5 a row
        made one by one in Python)."""
        rows = np.empty((chunk, dim), np.float32)
        labels = np.empty(chunk, np.int64)
        n = 0
        for got_rows, got_labels in self._vector_batches(shard, max_seq, min(chunk, batch),
                                                         dim):
            at, size = 0, len(got_labels)
            while at < size:
                take = min(chunk - n, size - at)
                rows[n:n + take] = got_rows[at:at + take]
                labels[n:n + take] = got_labels[at:at + take]
                n += take
                at += take
                if n == chunk:
                    yield rows, labels
                    n = 0
        if n:
            yield rows[:n], labels[:n]

    def _vector_batches(self, shard: int, max_seq: int | None, batch: int, dim: int
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`iter_live_vectors`' reads: `batch` V keys and values at a time, joined, then read
        as arrays (`_vector_chunk`); each batch's arrays are its own."""
        prefix = _shard_key(b"V", shard)
        opts = rocksdict.ReadOptions()
        opts.fill_cache(False)  # type: ignore[call-arg]
        opts.set_readahead_size(2 << 20)
        opts.set_iterate_upper_bound(_shard_key(b"V", shard + 1) if shard < 0xFFFF else b"W")
        keys: list[bytes] = []
        values: list[bytes] = []
        put_key, put_value = keys.append, values.append
        for key, value in self.vdb.items(from_key=prefix, read_opt=opts):
            put_key(key)  # type: ignore[arg-type]  # bytes: the store is raw
            put_value(value)  # type: ignore[arg-type]
            if len(keys) == batch:
                yield _vector_chunk(shard, keys, values, max_seq, dim)
                keys.clear()
                values.clear()
        if keys:
            yield _vector_chunk(shard, keys, values, max_seq, dim)

    def old_tombstones(self, shard: int, before: int, *, stop: Callable[[], bool] | None = None
                       ) -> Callable[[], tuple[list[str], float]]:
        """A scan of the shard's records as they are now (its iterator made here, read when
        called, once): the ids of its tombstones whose version is below `before`, and the
        least version of the others (inf if none; -inf when `stop` said to stop before the
        end). From the records' headers, no object per record (a shard under churn holds
        millions of tombstones). The iterator holds the database open, a closed one too (its
        folder locked for this process): it is let go when the scan ends."""
        prefix = _shard_key(b"D", shard)
        it = self._tombstones_family().iter(self._scan_opts)
        it.seek(prefix)
        held = [it]
        del it

        def scan() -> tuple[list[str], float]:
            it = held.pop()
            n = len(prefix)
            unpack = _HEADER.unpack_from
            ids: list[str] = []
            least = float("inf")
            read = 0
            while it.valid():
                key = it.key()
                if not key.startswith(prefix):
                    break
                version, _, _, flags, _, _ = unpack(it.value())
                if flags & FLAG_TOMBSTONE:
                    if version < before:
                        ids.append(key[n:].decode())
                    elif version < least:
                        least = version
                read += 1
                if stop is not None and not read & 4095 and stop():
                    return ids, -math.inf
                it.next()
            return ids, least

        return scan

    def iter_live_metadata(self, shard: int) -> Iterator[tuple[int, bytes]]:
        """(label, metadata) of every live document of the shard, in id order: the records'
        headers and metadata only (building a payload index, evaluating an ad-hoc filter)."""
        for _, raw in self._scan(_shard_key(b"D", shard)):
            label, tomb, meta = record_meta(raw)
            if not tomb:
                yield label, meta

    def free_labels(self, shard: int) -> np.ndarray:
        """The shard's labels free to give again (int64, ascending): its R keys, one read
        each (a start reads these, not the records)."""
        prefix = _shard_key(b"R", shard)
        n = len(prefix)
        return np.fromiter((_U64.unpack_from(key, n)[0] for key, _ in self._scan(prefix)),
                           np.int64)

    def released(self, shard: int) -> int:
        """The change-log position up to which the shard's tombstones' labels are released."""
        raw = self.db.get(_shard_key(b"P", shard))
        return 0 if raw is None else int(_U64.unpack(raw)[0])

    def labelled_tombstones(self, shard: int, after: int, upto: int, limit: int,
                            stop: Callable[[], bool] | None = None) -> tuple[list[str], int]:
        """The ids of the shard's tombstones that still hold a label and whose change is in
        (after, upto], `limit` at most, and the position read up to (`upto` once all are
        found): from the change log, one read of each change's record header (around the
        block cache), not a scan of every record; `limit` × 8 changes read at most a call
        (it runs on the write thread: a bulk load's interval is hundreds of thousands of
        upserts). ([], after) when `stop` says to stop."""
        ids: list[str] = []
        get, opts = self._tombstones_family().get, self._lookup_opts
        unpack = _HEADER.unpack_from
        for n, (seq, doc_id) in enumerate(self.iter_changes(shard, after), 1):
            if seq > upto:
                break
            if stop is not None and not n & 4095 and stop():
                return [], after
            if n > limit * 8:
                return ids, seq - 1
            raw = get(doc_key(shard, doc_id), read_opt=opts)
            if raw is None:
                continue
            _, label, rseq, flags, _, _ = unpack(raw)
            if flags & FLAG_TOMBSTONE and label != NO_LABEL and rseq == seq:
                ids.append(doc_id)
                if len(ids) >= limit:
                    return ids, seq
        return ids, upto

    def counters(self, shard: int) -> tuple[int, int, int]:
        """(next seq, next label, live documents) of a shard."""
        raw = self.db.get(_shard_key(b"C", shard))
        if raw is None:
            return 1, 1, 0
        seq, label, live = _COUNTERS.unpack(raw)
        return int(seq), int(label), int(live)

    def _scan(self, prefix: bytes, start: bytes | None = None, *,
              family: rocksdict.Rdict | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Keys and values under `prefix`, from `start` if given; of `family` (a column
        family: `vdb`, `cdb`) if given, else of the default one."""
        it = (family or self.db).iter(self._scan_opts)
        it.seek(start or prefix)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            yield key, it.value()
            it.next()

    def iter_docs(self, shard: int, after: str | None = None, *, vectors: bool = True,
                  live_only: bool = False) -> Iterator[tuple[str, Record]]:
        """Every record of the shard (tombstones too unless `live_only`) in id order, after
        `after` if given; live ones with their vectors (read from V a chunk of records at a
        time) unless `vectors` is False."""
        prefix = _shard_key(b"D", shard)
        n = len(prefix)
        start = prefix if after is None else doc_key(shard, after) + b"\x00"
        scan = self._doc_scan(prefix, start, live_only)
        if not vectors:
            for key, raw in scan:
                yield key[n:].decode(), Record.decode(raw)
            return
        keys: list[bytes] = []
        raws: list[bytes | None] = []
        chunk = 32  # growing: a page of a few documents reads few vectors ahead
        for key, raw in scan:
            keys.append(key)
            raws.append(raw)
            if len(raws) >= chunk:
                yield from self._docs(n, keys, raws)
                keys, raws = [], []
                chunk = min(chunk * 2, _VEC_CHUNK)
        yield from self._docs(n, keys, raws)

    def _doc_scan(self, prefix: bytes, start: bytes, live_only: bool
                  ) -> Iterator[tuple[bytes, bytes]]:
        """The records under `prefix` from `start` in key order: the live ones' column
        family's, merged with that of tombstones unless `live_only`. The two iterators are
        made one after the other: a write that moved a key between them shows it in both
        (the later change kept) or in neither (as if it came just before the scan)."""
        live = self._scan(prefix, start)
        if live_only or self._tdb is None:
            yield from live
            return
        merged = heapq.merge(live, self._scan(prefix, start, family=self.tdb),
                             key=operator.itemgetter(0))
        held: tuple[bytes, bytes] | None = None
        for item in merged:
            if held is not None:
                if item[0] == held[0]:  # in both: the later change (its seq the higher)
                    if _HEADER.unpack_from(item[1])[2] > _HEADER.unpack_from(held[1])[2]:
                        held = item
                    continue
                yield held
            held = item
        if held is not None:
            yield held

    def _docs(self, n: int, keys: list[bytes], raws: list[bytes | None]
              ) -> Iterator[tuple[str, Record]]:
        """A scan's records (as its iterator saw them) with their vectors; one deleted and
        purged since the iterator was made is left out (`_joined`)."""
        for key, rec in zip(keys, self._joined(keys, raws, True), strict=True):
            if rec is not None:
                yield key[n:].decode(), rec

    def iter_changes(self, shard: int, after_seq: int) -> Iterator[tuple[int, str]]:
        """(seq, id) of every document whose latest change is after `after_seq`, in order."""
        # Read once (a replay): around the block cache, as every scan.
        for key, raw in self._scan(_shard_key(b"Q", shard), change_key(shard, after_seq + 1),
                                   family=self.cdb):
            yield _U64.unpack(key[3:])[0], raw.decode()

    def drop_shard(self, shard: int, chunk: int = _DROP_CHUNK) -> int:
        """Remove every key of one shard (after it moved to another node), key by key, a
        batch every `chunk` keys (RocksDB refuses a range delete in a database with a row
        cache, see `RocksMemory`); the number of keys removed. Not atomic: a crash midway
        leaves keys of a shard that is no longer held, which nothing reads and the next
        open removes (`Collection.open`)."""
        deletes: list[tuple[rocksdict.Rdict | None, bytes,
                            Callable[[WriteBatch], Callable[[bytes], None]]]]
        deletes = [(None, tag, lambda b: b.raw_delete) for tag in _SHARD_TAGS]
        deletes += [(self.vdb, b"V", lambda b: b.vec_delete),
                    (self.cdb, b"Q", lambda b: b.change_delete)]
        if self._tdb is not None:
            deletes.append((self.tdb, b"D", lambda b: b.tomb_delete))
        done = 0
        for family, tag, delete in deletes:
            def stage(batch: WriteBatch, key: bytes, _: bytes,
                      delete: Callable[[WriteBatch], Callable[[bytes], None]] = delete
                      ) -> bool:
                delete(batch)(key)
                return True

            done += self._in_batches(self._scan(_shard_key(tag, shard), family=family),
                                     stage, chunk)
        return done

    def has_shard(self, shard: int) -> bool:
        """Whether any key of the shard is stored."""
        for db, tag in self._shard_tags():
            it = db.iter()
            it.seek(_shard_key(tag, shard))
            if it.valid() and it.key().startswith(_shard_key(tag, shard)):
                return True
        return False

    def _shard_tags(self) -> list[tuple[rocksdict.Rdict, bytes]]:
        """(column family, tag) of the keys that tell a shard is held (its records, live or
        tombstones, and its bookkeeping)."""
        out = [(self.db, tag) for tag in _SHARD_TAGS]
        if self._tdb is not None:
            out.append((self.tdb, b"D"))
        return out

    def shards_present(self) -> set[int]:
        """Every shard with a key stored: one seek per shard found, not a scan of its keys."""
        found: set[int] = set()
        for db, tag in self._shard_tags():
            it = db.iter()
            it.seek(tag)
            while it.valid():
                key = it.key()
                if not key.startswith(tag) or len(key) < 3:
                    break
                shard = _U16.unpack_from(key, 1)[0]
                found.add(shard)
                if shard + 1 >= 65536:
                    break
                it.seek(_shard_key(tag, shard + 1))
        return found


def _vector_chunk(shard: int, keys: list[bytes], values: list[bytes], max_seq: int | None,
                  dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 rows, labels) of V keys and values, those with seq ≤ max_seq if given."""
    size, at = VEC_PREFIX + dim * 4, len(_shard_key(b"V", shard))
    raw = np.frombuffer(b"".join(values), np.uint8)
    names = np.frombuffer(b"".join(keys), np.uint8)
    if len(raw) != len(values) * size or len(names) != len(keys) * (at + _U64.size):
        raise ValueError(f"a vector of shard {shard} is not of dimension {dim}")
    raw = raw.reshape(len(values), size)
    labels = names.reshape(len(keys), -1)[:, at:].copy().view(">u8")[:, 0].astype(np.int64)
    rows = raw[:, VEC_PREFIX:].copy().view(np.float32)
    if max_seq is not None:
        keep = raw[:, :VEC_PREFIX].copy().view(">u8")[:, 0] <= max_seq
        if not keep.all():
            return rows[keep], labels[keep]
    return rows, labels
