"""A collection's local part on this node: its store, its local shards' bookkeeping, the one
FAISS index over all of them, and the background work (training, snapshots) that keeps it
fast. Searching lives in `node.storage.search`.

Concurrency: writes are made durable in groups (group commit, one driver task), serialised by
`write_mutex`; each group then queues on `apply_lock` (FIFO, taken before `write_mutex` is let
go, so index updates keep the order of the writes)
to update the index under `rw.write()`, while the next write is already being prepared.
Searches and snapshots take `rw.read()`; changes of the shard set and index swaps take all
three (`_exclusive`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

from aquila.cluster.clock import track
from aquila.cluster.model.digests import BUCKETS, bucket_of, digests, format_digests
from aquila.cluster.model.documents import Found, Hit, Incoming, StaleFound
from aquila.cluster.model.errors import Unavailable
from aquila.cluster.model.filters import Filter
from aquila.cluster.model.recall import share_top
from aquila.cluster.model.spec import CollectionSpec
from aquila.node.blocking import Blocking
from aquila.node.files import TMP_SUFFIX, remove_stale_temps, write_atomic
from aquila.node.storage.batcher import SearchBatcher, weakly
from aquila.node.storage.filtered import FilterQuery, GroupCache, search_planned
from aquila.node.storage.heap import shed_blocks, trim
from aquila.node.storage.index import (
    LABEL_BITS,
    VectorIndex,
    choose_nlist,
    global_keys,
    prepare,
)
from aquila.node.storage.locks import RWLock
from aquila.node.storage.matches import DEFAULT_CAPACITY
from aquila.node.storage.paging import count_shards, scroll_shard
from aquila.node.storage.search import (
    FoundRow,
    candidates,
    find_batch,
    found_rows,
    read_keys,
    run_batch,
)
from aquila.node.storage.shard import IndexOps, Shard
from aquila.node.storage.store import (
    DEFAULT_MEMORY_BYTES,
    LAYOUT,
    NO_LABEL,
    NotSynced,
    Record,
    RocksMemory,
    Store,
)
from aquila.node.storage.trained_checkpoint import MAX_OWNER, Checkpoint
from aquila.node.storage.training import compacted, train_streamed

log = logging.getLogger(__name__)
T = TypeVar("T")

SPEC_FILE = "spec.json"


# Tombstones whose labels are released in one batch (under the write mutex) at most.
RELEASE_CHUNK = 8192


def meta_bytes(spec: CollectionSpec, uid: str, shards: list[int]) -> bytes:
    """The content of a collection's spec.json: its spec, its incarnation and the shards this
    node holds of it (the record its store's keys are read by: see `Collection.open`)."""
    return orjson.dumps({"spec": spec.to_json(), "shards": shards, "uid": uid})


# A shard's tombstones are scanned for purging at least this often (seconds), even when the
# last scan found none old enough (see Collection._purge).
PURGE_RESCAN_S = 3600.0
# A purge's candidates read again this many at a time, a cancellation looked at in between.
PURGE_READ_CHUNK = 4096
# Documents one group commit takes at most (one RocksDB batch, one fsync).
GROUP_MAX_DOCS = 20_000
# Vectors read from the store at a time while training.
TRAIN_CHUNK = 65_536
# Stored vectors read at a time into an ivf_flat index loaded without them (`_refilled`):
# their bytes are held twice meanwhile (the values read, then the rows), 13 MB at dim 96.
REFILL_CHUNK = 16_384
# A trained index catches up with the writes made during its training in rounds (each
# replays what came during the one before) until a round saw at most CATCH_UP_TAIL writes
# come, or no fewer than the round before (writes faster than the replay), or
# CATCH_UP_ROUNDS were made; then its lists are compacted.
CATCH_UP_ROUNDS = 4
CATCH_UP_TAIL = 16_384
# A training's catch-up replays on its own thread (`Blocking.catch_up`), CATCH_UP_SLICE_S at a
# time (the writes go on beside the slices), not on the background thread: at nice 10 on busy
# cores that one replayed slower than a bulk load wrote, and a 10M load's first training
# (6,000 vectors) had not been swapped in 3.7M documents later, the index flat all along.
# When its rounds do not converge either, the rest is replayed with the writes held, a slice
# at a time (the writes queued meanwhile let through between two), and at once when those
# brought as many changes as a slice replayed: the load slows to what the replay keeps up with.
CATCH_UP_SLICE_S = 1.0
# Changes a catch-up reads and applies at a time (the replays at a start and at a swap read
# shard.REPLAY_CHUNK): each is a few small Python objects until its chunk is applied (its
# record, its vector's bytes twice, its id), made beside a bulk load's own, and the load's
# peak of small objects makes Python arenas that its long-lived objects then keep (2,048
# changes: 1.8 MB of the peak at 200k `ivf_sq8`, `bench_arenas.py --peaks`).
CATCH_UP_CHUNK = 512
# A compaction's copy is dropped, not swapped in, when more changes than this were applied
# after it was made: writes resumed (a bulk load's), and the rest would be replayed under every
# lock; it is tried again at their next pause.
COMPACT_TAIL = CATCH_UP_TAIL
# RocksDB's work on its own threads that allocates and frees C heap (a flush builds a table
# file's blocks, filters and index; a compaction reads and writes them): a swap's heap trim
# waits for it to end, at most GIVE_BACK_WAIT_S (see `_give_back`).
ROCKSDB_BUSY = ("rocksdb.num-running-flushes", "rocksdb.mem-table-flush-pending",
                "rocksdb.num-running-compactions", "rocksdb.compaction-pending")
GIVE_BACK_WAIT_S = 30.0
GIVE_BACK_LOOK_S = 0.05


class _Unsynced(Exception):
    """A group's batch is in the store but its fsync failed (`NotSynced`): its index changes
    are still to apply, then its writers hear `cause`."""

    def __init__(self, ops: list[dict[int, IndexOps]], cause: NotSynced) -> None:
        super().__init__(str(cause))
        self.ops, self.cause = ops, cause


class TrainingStopped(Exception):
    """The collection closed while its index trained (the training starts again at the next
    start, from the store)."""


@dataclass(eq=False)
class _Queued:
    """A write waiting for the group commit, and its writer's future."""

    by_shard: dict[int, list[Incoming]]
    done: asyncio.Future[dict[int, tuple[int, int]]]
    docs: int

    def settle(self, outcome: dict[int, tuple[int, int]] | BaseException) -> None:
        if self.done.done():  # the writer gave up (cancelled): nobody to tell
            return
        if isinstance(outcome, BaseException):
            self.done.set_exception(outcome)
        else:
            self.done.set_result(outcome)


class IndexState:
    BUFFERING = "buffering"
    """Exact flat search: too few vectors to train IVF yet."""
    TRAINING = "training"
    """An IVF index is being trained in the background; the current index keeps serving."""
    TRAINED = "trained"
    """Serving from a trained IVF index (or a collection of type flat, which never trains)."""


# Query rows a search thread takes at least when a batch is split over several.
SPLIT_ROWS = 32
# An inline search (see `Collection.search`) at most: query rows, vector components scanned
# over all of them (centroids, lists probed, vectors read; about 1 ms), and hits whose
# records are read (two reads each through the block cache). A search that re-ranks is not
# inline (see `_inline_ok`).
INLINE_ROWS = 8
INLINE_WORK = 4_000_000
INLINE_CANDIDATES = 256
# A `Found`'s documents read on the calling thread at most (a coordinator keeps about k/3 of
# its own hits per query): more go to a search thread.
INLINE_READS = 64


@dataclass(frozen=True)
class Tuning:
    train_min: int = 4096
    retrain_growth: float = 2.0
    # A retraining waits while writes stream in (a bulk load) until they pause this long, for
    # at most retrain_max_wait_s: training and the write path would share the same cores, and
    # the vectors that keep coming would be added to both indexes. The index being replaced
    # keeps serving meanwhile (its lists grow longer; recall at a given nprobe holds).
    retrain_quiet_s: float = 1.0
    retrain_max_wait_s: float = 30.0
    # A trained index whose lists had at least compact_growth × its vectors, and compact_min,
    # added since they were allocated to their size (`VectorIndex.added`) is compacted once
    # writes pause for compact_quiet_s (`Collection._compact`): the adds grew every list by
    # doubling (a bulk load that ends long after its last training: 1.6× the raw vectors
    # against 1.4× for the same node restarted). Longer than a retraining's wait: a slow
    # bulk load leaves gaps of a second between writes, and nothing is lost by waiting.
    # compact_growth 0: never.
    compact_growth: float = 0.25
    compact_min: int = 50_000
    compact_quiet_s: float = 5.0
    search_batch_rows: int = 512
    search_parallel: int = 4
    # RocksDB's memory of the node (see store.RocksMemory): every collection's, as one.
    rocksdb_memory_bytes: int = DEFAULT_MEMORY_BYTES
    # Filters whose match sets each shard keeps (0: none, every search evaluates its filter).
    filter_cache: int = DEFAULT_CAPACITY
    # Bytes of selectors and gathered vectors kept per collection for recent filters.
    filter_group_bytes: int = 128 << 20
    # One planner path for every filtered search ("exact", "selector", "postfilter"): for
    # tests and benchmarks; None lets the planner choose per shard.
    filter_path: str | None = None

    def compaction_due(self, added: int, vectors: int) -> bool:
        """Whether an index of `vectors` with `added` of them added since its lists were
        allocated to their size calls for a compaction (compact_growth, compact_min)."""
        return (self.compact_growth > 0
                and added >= max(self.compact_min, self.compact_growth * vectors))


class Collection:
    def __init__(
        self, spec: CollectionSpec, root: Path, blocking: Blocking, tuning: Tuning, fsync: bool,
        plan_counts: dict[str, int] | None = None, memory: RocksMemory | None = None,
    ) -> None:
        self.spec = spec
        self.root = root
        self.store = Store(root / "db", fsync=fsync, memory=memory)
        self.snap_path = root / "index.faiss"
        self.blocking = blocking
        self.tuning = tuning
        self.shards: dict[int, Shard] = {}
        self.index = VectorIndex.flat(spec.dim, spec.metric, spec.shards)
        self.snapshot_seqs: dict[int, int] = {}
        # The trained index the snapshot file holds (None: not a trained one). A training's
        # swap changes no change-log position: without this, a snapshot taken after the last
        # write and before the swap left the new index unsaved (a restart trained again).
        self._saved: VectorIndex | None = None
        self.training = False
        self.rw = RWLock()
        self.write_mutex = asyncio.Lock()
        self.apply_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: collections.deque[_Queued] = collections.deque()  # writes to make durable
        self._driver: asyncio.Task[None] | None = None
        self._batches_running = 0  # unfiltered batches searching or waiting for the lock
        # Rows of hits, or of (scores, keys) for `search_found`.
        self._batcher: SearchBatcher[Any] = SearchBatcher(
            weakly(self._run_batch), max_rows=tuning.search_batch_rows, parallel=tuning.search_parallel
        )
        # Filtered searches batch by filter too: one plan and one FAISS call per group of
        # shards for every concurrent search with the same filter.
        self._filtered: SearchBatcher[tuple[list[Hit], list[dict[str, Any]]]] = SearchBatcher(
            weakly(self._run_filtered), max_rows=tuning.search_batch_rows,
            parallel=tuning.search_parallel,
        )
        self.groups = GroupCache(max_bytes=tuning.filter_group_bytes)
        # Per planner path, shards searched that way (one per query and shard): /metrics.
        self.plan_counts = {} if plan_counts is None else plan_counts
        self.closed = False
        self._last_write = -math.inf  # time.monotonic() of the last write taken
        self._recheck: asyncio.TimerHandle | None = None  # a deferred retraining's next look
        self._wanted_since: float | None = None  # when a deferred retraining was first wanted
        self._saving = asyncio.Lock()  # one snapshot written at a time; `close` waits for it
        self._purging = asyncio.Lock()  # one purge at a time; `close` waits for its scan
        # Incarnation of the collection in the cluster state (see CollectionEntry.uid).
        self.uid = ""
        self._kept: Checkpoint | None = None  # see `_checkpoint`
        # Called with the seconds each training took (the node's metrics).
        self.on_trained: Callable[[float], None] | None = None
        # Per shard, from the last purge: a version below which no tombstone is stored, and
        # when to scan again anyway. A purge that could find nothing old enough makes no scan
        # of every record (millions under churn, at every anti-entropy pass). Deletes lower
        # it, and those written while a scan runs are noted for it.
        self._tombstone_floor: dict[int, tuple[float, float]] = {}
        self._deletes_since_scan: dict[int, float] = {}
        # Per shard, the change-log position a running training's index was built up to: its
        # catch-up replays the changes after it from the change log, which a purge must not
        # take away (see `_purge_sync`). A compaction's copy's too (see `_compact`).
        self._training_upto: dict[int, int] | None = None
        self.compacting = False  # a compaction of the index's lists runs (`_compact`)
        self.compactions = 0  # compactions swapped in (/metrics)
        # Bumped whenever a label may come to name another document than before (labels
        # released, a shard dropped or taken on): a search's `Found` keys taken before are
        # not read after (`read_found`).
        self.relabelled = 0

    @property
    def idle(self) -> bool:
        """No background work runs (a training's task goes on after its `training` flag is
        down: its snapshot and the removal of its quantizer; a compaction), nor is due."""
        return not self._tasks and not self.training and not self.compacting

    @property
    def larger_is_better(self) -> bool:
        return self.spec.metric != "l2"

    @property
    def state(self) -> str:
        if self.training:
            return IndexState.TRAINING
        if self.index.trained or self.spec.index.type == "flat":
            return IndexState.TRAINED
        return IndexState.BUFFERING

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self, local_shards: Iterable[int]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        await self.blocking.write(self._open_sync, sorted(set(local_shards)))
        self._maybe_train()

    def _open_sync(self, shards: list[int]) -> None:
        """Shards' bookkeeping from the store; the index from its snapshot plus the changes
        it does not cover, or rebuilt from the store when missing, damaged or stale."""
        remove_stale_temps(self.root)
        self.store.open()
        if self.store.get_meta() is None:
            self.store.put_meta(orjson.dumps(self.spec.to_json()))
            self.store.put_layout()
        elif (layout := self.store.layout()) > LAYOUT:
            # Written by newer code (this node downgraded): refused, not read or written as
            # if it were this code's layout (nor rebuilt here: it holds the only copy).
            self.store.close()
            raise RuntimeError(
                f"{self.spec.name}: the store's layout is {layout}, newer than this code's "
                f"{LAYOUT}: run the newer code, or remove {self.root} to rebuild it from "
                "its replicas")
        elif layout < LAYOUT:
            if layout < 2:  # 2 → 3 adds the free labels' keys: none to write (see store)
                for s in sorted(self.store.shards_present() & set(shards)):
                    log.info("%s: upgrading shard %d's keys (once)", self.spec.name, s)
                    Shard.upgrade(self.store, s)
            if layout < 5:  # 4 → 5: the vectors out of the records, under V (see store)
                t0, split = time.monotonic(), 0
                for s in sorted(self.store.shards_present() & set(shards)):
                    split += self.store.split_vectors(s)
                log.info("%s: moved %d documents' vectors to their own keys (once) in %.1f s",
                         self.spec.name, split, time.monotonic() - t0)
            if layout < 6:  # 5 → 6: the change log to its own column family (see store)
                t0 = time.monotonic()
                moved = self.store.move_changes()
                log.info("%s: moved %d change-log keys to their column family (once) in "
                         "%.1f s", self.spec.name, moved, time.monotonic() - t0)
            if layout < 7:  # 6 → 7: tombstones to their own column family (see store)
                t0 = time.monotonic()
                moved = self.store.move_tombstones()
                log.info("%s: moved %d tombstones to their column family (once) in %.1f s",
                         self.spec.name, moved, time.monotonic() - t0)
            self.store.put_layout()
        # The keys of a shard not recorded as held are what a crash in the middle of a drop
        # left (see `drop_shard`): garbage, never read.
        for s in sorted(self.store.shards_present() - set(shards)):
            log.info("%s: removing the rest of dropped shard %d", self.spec.name, s)
            self.store.drop_shard(s)
        for s in shards:
            shard = Shard(self.spec, s, self.store, self.tuning.filter_cache)
            shard.load()
            self.shards[s] = shard
        loaded = VectorIndex.load(self.snap_path, self.spec.shards)
        if loaded is not None and not (set(loaded[1]) <= set(shards)
                                       and self._refilled(*loaded)):
            loaded = None
        if loaded is not None:
            self.index, covered = loaded
            for s, shard in self.shards.items():
                for ops in shard.replay(covered.get(s, 0)):
                    self._apply_sync(ops)
            self.snapshot_seqs = covered
            self._saved = self.index
            if self.index.trained:
                # The label → list map (`remove` finds a label's list there): built here, at
                # the start, not by the first write, under the lock every search waits for
                # (one pass over the ids: 73 ms at 1M).
                self.index.lists_of(0)
        else:
            if self.snap_path.exists():
                log.warning("%s: snapshot damaged or stale; rebuilding from the store",
                            self.spec.name)
            self.index = VectorIndex.flat(self.spec.dim, self.spec.metric, self.spec.shards)
            for shard in self.shards.values():
                for vectors, keys in shard.live_chunks(None):
                    self.index.add(vectors, keys)
        self._set_live(self.index.all_keys())

    def _refilled(self, index: VectorIndex, covered: dict[int, int]) -> bool:
        """An index loaded without its vectors (ivf_flat, see `VectorIndex.stage`): each
        shard's stored vectors of documents unchanged since the snapshot (seq ≤ covered)
        put back into the lists it recorded; those changed after it the replay brings. False
        when the store holds such a vector the snapshot did not place (not the state it
        covered): the caller rebuilds from the store."""
        if index.pending is None:
            return True
        t0 = time.monotonic()
        strays = index.refill(
            (prepare(rows, self.spec.metric), global_keys(s, labels))
            for s, q in sorted(covered.items())
            for rows, labels in self.store.iter_live_vectors(s, q, REFILL_CHUNK, self.spec.dim))
        if strays:
            log.warning("%s: %d stored vectors the snapshot does not place", self.spec.name,
                        strays)
            return False
        log.info("%s: %d vectors from the store into the snapshot's lists in %.2f s",
                 self.spec.name, index.ntotal, time.monotonic() - t0)
        return True

    def _set_live(self, keys: np.ndarray) -> None:
        """Each shard's live bitmap from the keys its index holds (which are exactly its
        live documents, once the change log is replayed)."""
        shard_of = keys >> LABEL_BITS
        for s, shard in self.shards.items():
            shard.set_live(keys[shard_of == s] & ((1 << LABEL_BITS) - 1))

    def _apply_sync(self, ops: IndexOps, index: VectorIndex | None = None) -> None:
        index = self.index if index is None else index
        index.remove(np.asarray(ops.remove, dtype=np.int64))
        if ops.add_keys:
            index.add(ops.vectors(self.spec.dim, self.spec.metric),
                      np.asarray(ops.add_keys, dtype=np.int64))

    def _record_sync(self, shards: list[int]) -> None:
        """Durably record the shards held here. The engine serialises the calls that change
        the shard set (`add_shards`, `drop_shard`), so each record is the latest."""
        write_atomic(self.root / SPEC_FILE, meta_bytes(self.spec, self.uid, shards))

    async def add_shards(self, ss: Iterable[int]) -> None:
        """Take shards on (a move's target): its documents join the index as they arrive.
        Recorded as held before any write can reach them, so that a crash never leaves
        written documents of a shard the record does not list."""
        new = sorted(set(ss) - set(self.shards))
        if not new:
            return
        # Whatever an interrupted drop left of them is not theirs.
        await self.blocking.write(self._clear_sync, new)
        await self.blocking.write(self._record_sync, sorted({*self.shards, *new}))
        for s in new:
            shard = Shard(self.spec, s, self.store, self.tuning.filter_cache)
            await self.blocking.write(shard.load)
            async with self._exclusive():
                # To its end when cancelled, as a drop (see `drop_shard`): its vectors in the
                # index and the shard not held would outlive it.
                await _to_the_end(self._take_locked(shard))

    async def _take_locked(self, shard: Shard) -> None:
        ops = shard.changes_after(0)
        await self.blocking.write(self._apply_sync, ops)
        shard.set_live(np.asarray(ops.add_keys, dtype=np.int64) & ((1 << LABEL_BITS) - 1))
        self.shards[shard.shard] = shard
        self.relabelled += 1

    def _clear_sync(self, shards: list[int]) -> None:
        for s in shards:
            if self.store.has_shard(s):
                self.store.drop_shard(s)

    async def drop_shard(self, s: int) -> None:
        """Let a shard go (it moved away). The record of the shards held is rewritten first:
        that is the commit point. Its keys then go, a batch at a time; a crash meanwhile
        leaves keys of a shard not held, which nothing reads and `open` removes. Searches
        and writes of the other shards wait only for the first part (the shard out of the
        record, the memory and the index), not for its keys' removal (a key at a time, see
        `Store.drop_shard`); a snapshot waits for both (the engine serialises the calls that
        change the shard set: taking the shard back waits too)."""
        async with self._saving:  # no snapshot being written meanwhile
            async with self._exclusive():
                if self.closed or s not in self.shards:
                    return
                # Cancelled (a stop during a move), the drop goes on to its end under the
                # locks: its threads cannot be stopped, and the close's snapshot would write
                # the index while one of them removed the shard's vectors from it.
                await _to_the_end(self._drop_locked(s))
            await _to_the_end(self.blocking.write(self.store.drop_shard, s))

    async def _drop_locked(self, s: int) -> None:
        # The snapshot holds the shard's vectors by label: were it taken again (labels
        # given afresh) and the node killed before the next snapshot, a restart would
        # load them under labels of other documents. Gone first (a crash before the
        # record leaves the shard held, rebuilt from the store); the next is due.
        await self.blocking.write(self.snap_path.unlink, True)
        self.snapshot_seqs, self._saved = {}, None
        await self.blocking.write(self._record_sync, sorted(set(self.shards) - {s}))
        shard = self.shards.pop(s)
        self.relabelled += 1
        self._tombstone_floor.pop(s, None)
        await self.blocking.write(self.index.remove, shard.keys())

    async def close(self, *, snapshot: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self._recheck is not None:
            self._recheck.cancel()
        driver = self._driver
        for t in [*self._tasks, *([driver] if driver else [])]:
            t.cancel()
        await asyncio.gather(*self._tasks, *([driver] if driver else []),
                             return_exceptions=True)
        self._closing(self._queue)
        self._queue.clear()
        # A snapshot being written finishes first: written later, it could land in the
        # folder of the next incarnation of this name.
        async with self._saving:
            pass
        # A purge's scan, outside the locks below, holds the database open (an iterator):
        # it stops at the close, and is waited for.
        async with self._purging:
            pass
        async with self._exclusive():
            try:
                if snapshot and self._dirty():
                    await self.blocking.write(self._snapshot_sync)
            except Exception:  # it spares the next start a replay: the close goes on
                log.exception("%s: no snapshot at the close (the next start replays the "
                              "change log)", self.spec.name)
            finally:
                await self.blocking.write(self.store.close)
                # The index's memory goes back now, whatever still refers to this object: a
                # reference cycle through it among the objects of the node's start, which
                # the node keeps out of the garbage collector's sight once ready
                # (`node.collector`), would never be collected, index and all.
                self.index = VectorIndex.flat(self.spec.dim, self.spec.metric, self.spec.shards)
                self._saved = None

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """No write being prepared, none waiting to reach the index, no search running."""
        async with self.write_mutex, self.apply_lock, self.rw.write():
            yield

    # -- writes ---------------------------------------------------------------------------
    async def write(self, by_shard: dict[int, list[Incoming]]) -> dict[int, tuple[int, int]]:
        """Upserts and deletes, durable on return; per shard (documents changed, live
        documents deleted).

        Writes that arrive together are made durable together (group commit): one driver
        takes the queued writes, stages them into one RocksDB batch, makes it durable with
        one fsync, and hands the index updates on, while the next group is staged."""
        self._have(by_shard)
        self._last_write = time.monotonic()
        for s, docs in by_shard.items():  # a delete lowers the shard's tombstone floor
            low = _least_delete(docs)
            if low < self._deletes_since_scan.get(s, -math.inf):
                self._deletes_since_scan[s] = low
            floor = self._tombstone_floor.get(s)
            if floor is not None and low < floor[0]:
                self._tombstone_floor[s] = (low, floor[1])
        loop = asyncio.get_running_loop()
        queued = _Queued(by_shard, loop.create_future(), sum(map(len, by_shard.values())))
        self._queue.append(queued)
        if self._driver is None:
            self._driver = loop.create_task(self._drive())
        return await queued.done

    async def _drive(self) -> None:
        try:
            while self._queue and not self.closed:
                async with self.write_mutex:
                    group = self._take_group()
                    if not group:
                        continue
                    failed: NotSynced | None = None
                    try:
                        # Cancelled (a close), the thread goes on: waited for, so that the
                        # close does not close the store under it (rocksdict refuses a close
                        # during the WAL's fsync: "Already borrowed", the store left open).
                        ops = await _to_the_end(self.blocking.write(
                            self._write_sync, [q.by_shard for q in group]))
                    except _Unsynced as exc:  # in the store: the index follows it too
                        ops, failed = exc.ops, exc.cause
                    except Exception as exc:
                        for q in group:
                            q.settle(exc)
                        continue
                    except BaseException:
                        self._closing(group)
                        raise
                    try:
                        await self.apply_lock.acquire()
                    except BaseException:
                        self._closing(group)
                        raise
                self._spawn(self._apply(group, ops, failed))
        finally:
            self._driver = None
            if self.closed:
                self._closing(self._queue)
                self._queue.clear()

    def _closing(self, writes: Iterable[_Queued]) -> None:
        for q in writes:
            q.settle(Unavailable(f"collection {self.spec.name!r} is closing"))

    def _take_group(self) -> list[_Queued]:
        """The longest prefix of the queue whose writes name no document twice (a later
        write of an id must see the earlier one as stored), within GROUP_MAX_DOCS."""
        group: list[_Queued] = []
        seen: set[tuple[int, str]] = set()
        docs = 0
        while self._queue:
            q = self._queue[0]
            if q.done.done():  # its writer gave up before it was taken
                self._queue.popleft()
                continue
            if group and docs + q.docs > GROUP_MAX_DOCS:
                break
            absent = [s for s in q.by_shard if s not in self.shards]
            if absent:  # dropped since it was queued
                self._queue.popleft()
                q.settle(Unavailable(f"shard(s) {absent} of {self.spec.name!r} are not on "
                                     "this node"))
                continue
            if len(self._queue) > 1 or group:
                keys = {(s, d.id) for s, ds in q.by_shard.items() for d in ds}
                if group and not seen.isdisjoint(keys):
                    break
                seen |= keys
            group.append(self._queue.popleft())
            docs += q.docs
        return group

    async def _apply(self, group: list[_Queued], ops: list[dict[int, IndexOps]],
                     failed: NotSynced | None = None) -> None:
        """The group's index updates (apply_lock is held, taken by the driver); `failed`:
        what its writers hear once they are applied (the batch's fsync failed)."""
        try:
            async with self.rw.write():  # a close waits for the index to be left whole
                await _to_the_end(self.blocking.write(self._apply_all_sync, ops))
        except Exception as exc:
            log.exception("%s: a durable write did not reach the index", self.spec.name)
            for q in group:  # durable, but the index did not follow: the writers hear of it
                q.settle(exc)
            return
        except BaseException:
            self._closing(group)
            raise
        finally:
            self.apply_lock.release()
        for q, o in zip(group, ops, strict=True):
            q.settle(failed if failed is not None else
                     {s: (x.applied, x.deleted) for s, x in o.items()})
        self._maybe_train()

    def _write_sync(self, group: list[dict[int, list[Incoming]]]) -> list[dict[int, IndexOps]]:
        batch = self.store.batch()
        touched = {s for by_shard in group for s in by_shard}
        before = {s: self.shards[s].mark() for s in touched}
        try:
            ops = [{s: self.shards[s].prepare_writes(docs, batch) for s, docs in by_shard.items()}
                   for by_shard in group]
            for s in touched:
                self.shards[s].stage_totals(batch, [o[s] for o in ops if s in o])
            self.store.write(batch)
        except NotSynced as exc:
            # The batch is in the store: counters and digests follow it (rolled back, the
            # next write would take its labels and change-log positions again), and so does
            # the index (`_drive`); its writers hear of the failure.
            self._durable(ops)
            raise _Unsynced(ops, exc) from exc
        except BaseException:
            for s, mark in before.items():
                self.shards[s].rollback(mark)
            raise
        self._durable(ops)
        return ops

    def _durable(self, ops: list[dict[int, IndexOps]]) -> None:
        for o in ops:
            for s, x in o.items():
                self.shards[s].durable(x)

    def _apply_all_sync(self, ops: list[dict[int, IndexOps]]) -> None:
        merged = IndexOps()
        for o in (x for by_shard in ops for x in by_shard.values()):
            merged.remove += o.remove
            merged.add_keys += o.add_keys
            merged.add_vectors += o.add_vectors
        self._apply_sync(merged)
        for by_shard in ops:
            for s, o in by_shard.items():
                self.shards[s].applied(o)

    # -- reads ----------------------------------------------------------------------------
    async def get(self, shard: int, doc_id: str) -> Record | None:
        recs = await self.blocking.search(self.store.get_records, shard, [doc_id])
        rec = recs[0]
        return None if rec is None or rec.tombstone else rec

    async def stream_shard(
        self, shard: int, after: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        """A page of the shard's records, tombstones included, in id order (for transfers);
        the id to continue after, None at the end."""
        return await self.blocking.search(self._stream_sync, shard, after, limit)

    def _stream_sync(
        self, shard: int, after: str | None, limit: int
    ) -> tuple[list[Incoming], str | None]:
        out: list[Incoming] = []
        for doc_id, rec in self.store.iter_docs(shard, after):
            out.append(_incoming(doc_id, rec))
            if len(out) >= limit:
                return out, doc_id
        return out, None

    async def digests(self, shard: int, buckets: int) -> list[str]:
        """Per bucket of ids, the digest of the shard's records: kept current in memory for
        the usual bucket count, computed by a scan for any other."""
        if buckets == BUCKETS and shard in self.shards:
            async with self.write_mutex:  # no write half-counted
                return format_digests(self.shards[shard].digests.tolist())
        return await self.blocking.search(self._digests_sync, shard, buckets)

    def _digests_sync(self, shard: int, buckets: int) -> list[str]:
        return digests(
            ((doc_id, rec.version, rec.writer)
             for doc_id, rec in self.store.iter_docs(shard, vectors=False)),
            buckets,
        )

    async def bucket_records(self, shard: int, wanted: list[int], buckets: int) -> list[Incoming]:
        return await self.blocking.search(self._bucket_sync, shard, set(wanted), buckets)

    def _bucket_sync(self, shard: int, wanted: set[int], buckets: int) -> list[Incoming]:
        return [
            _incoming(doc_id, rec)
            for doc_id, rec in self.store.iter_docs(shard)
            if bucket_of(doc_id, buckets) in wanted
        ]

    async def purge_tombstones(self, shard: int, before: int) -> int:
        purged, waiting = await self._purge(shard, before)
        if waiting:
            # A purge takes a tombstone's change key with it, so a restart would not replay
            # its delete: the snapshot it starts from must cover the delete first.
            await self.snapshot()
            purged += (await self._purge(shard, before))[0]
        return purged

    async def _purge(self, shard: int, before: int) -> tuple[int, int]:
        async with self._purging:
            if self.closed:
                return 0, 0
            return await self._purge_locked(shard, before)

    async def _purge_locked(self, shard: int, before: int) -> tuple[int, int]:
        if shard not in self.shards:
            return 0, 0
        floor = self._tombstone_floor.get(shard)
        if floor is not None and before <= floor[0] and time.monotonic() < floor[1]:
            return 0, 0
        # The scan reads every record's header outside the locks (under them it held writes
        # for seconds under churn); what it finds is read again under them. It starts under
        # the write mutex, where no write is between staged and durable: it sees every write
        # made before, and the deletes queued or written after are noted for the floor.
        due = time.monotonic() + PURGE_RESCAN_S
        # Cancelled (the healer's task at a stop, before any close), its threads are told to
        # stop as a close tells them: they are waited for, and would scan and read every
        # record (seconds for millions of tombstones) under the stop.
        cancelled = threading.Event()

        def stop() -> bool:
            return self.closed or cancelled.is_set()

        async with self.write_mutex:
            self._deletes_since_scan[shard] = min(
                [_least_delete(q.by_shard.get(shard, [])) for q in self._queue], default=math.inf)
            scan = await self.blocking.write(self.store.old_tombstones, shard, before,
                                             stop=stop)
        try:
            # Its thread waited for to its end: the close waits for this purge, and a store
            # closed under the iterator stays open (and its folder locked) until it is let go.
            ids, least = await _to_the_end(self.blocking.write(scan),
                                           cancelled.set)
            purged = waiting = 0
            if ids and shard in self.shards and not self.closed:
                async with self.write_mutex, self.apply_lock:
                    # Cancelled, the locks are kept until its thread ends: a write let in
                    # meanwhile (of a purged id, its label taken again) was removed by the
                    # purge's batch, read before it.
                    purged, waiting = await _to_the_end(
                        self.blocking.write(self._purge_sync, shard, before, ids, stop),
                        cancelled.set)
        finally:
            noted = self._deletes_since_scan.pop(shard, -math.inf)
        if shard in self.shards and not waiting:  # those waiting: scanned for again
            self._tombstone_floor[shard] = (min(least, noted), due)
        return purged, waiting

    def _purge_sync(self, shard: int, before: int, ids: list[str],
                    stop: Callable[[], bool] | None = None) -> tuple[int, int]:
        """(tombstones purged, tombstones left until a snapshot covers their delete), of the
        candidates `ids` that are still tombstones older than `before`. When `stop` says so
        between reads, nothing is written (all of `ids` counted as left)."""
        recs: list[Record | None] = []
        for i in range(0, len(ids), PURGE_READ_CHUNK):
            if stop is not None and stop():
                return 0, len(ids)
            recs += self.store.get_records(shard, ids[i:i + PURGE_READ_CHUNK], cache=False,
                                           vectors=False)
        batch = self.store.batch()
        covered = self._covered(shard)
        old = [(doc_id, rec) for doc_id, rec in zip(ids, recs, strict=True)
               if rec is not None and rec.tombstone and rec.version < before]
        gone = [(doc_id, rec) for doc_id, rec in old if rec.seq <= covered]
        if gone:
            if any(rec.label != NO_LABEL for _, rec in gone):
                self.relabelled += 1  # their labels are given again next, as a release's
            self.shards[shard].forget(gone, batch)
            try:
                self.store.write(batch)
            except NotSynced:  # in the store all the same: the digests follow it
                self.shards[shard].forgotten()
                raise
            self.shards[shard].forgotten()
        return len(gone), len(old) - len(gone)

    def _covered(self, shard: int) -> int:
        """The change-log position of the shard that the snapshot on disk covers, and the
        index a training (or a compaction's copy) in progress is built from too: a delete at
        or below it is in every index that may be loaded or trained. (One a training has
        still to replay into its new index, its change after the index's start, is not:
        purged, its change key went with it and the deleted vector stayed in the new index;
        its label given again, the new index took that vector for the new document's.)"""
        covered = self.snapshot_seqs.get(shard, 0)
        if self._training_upto is not None:
            covered = min(covered, self._training_upto.get(shard, covered))
        return covered

    async def release_labels(self) -> int:
        """Release the labels of the tombstones whose delete `_covered` now covers (see
        `Shard.release`), found from the change log past each shard's released position:
        the labels given follow the live documents, not a grace period's tombstones. After
        every snapshot; returns the labels released."""
        async with self._purging:  # one purge or release at a time; a close waits for it
            released = 0
            for s in sorted(self.shards):
                if self.closed:
                    break
                released += await self._release_shard(s)
            return released

    async def _release_shard(self, s: int) -> int:
        """`release_labels` of one shard: RELEASE_CHUNK tombstones a batch, the locks let go
        between batches (a snapshot interval's deletes under churn are hundreds of
        thousands)."""
        shard = self.shards.get(s)
        if shard is None:
            return 0
        cancelled = threading.Event()

        def stop() -> bool:
            return self.closed or cancelled.is_set()

        released = 0
        while (upto := self._covered(s)) > shard.released_seq:
            # The change log read outside the locks (the records read again under them).
            ids, reached = await _to_the_end(self.blocking.write(
                self.store.labelled_tombstones, s, shard.released_seq, upto, RELEASE_CHUNK,
                stop), cancelled.set)
            if stop() or self.shards.get(s) is not shard:
                break
            if not ids:  # nothing to write: the position moves in memory only
                shard.released_seq = reached
                continue
            async with self.write_mutex, self.apply_lock:
                if self.shards.get(s) is not shard or self.closed:
                    break
                released += await _to_the_end(
                    self.blocking.write(self._release_sync, shard, ids, reached),
                    cancelled.set)
        return released

    def _release_sync(self, shard: Shard, ids: list[str], upto: int) -> int:
        """Under the write mutex: the candidates `ids` read again, those still tombstones
        holding a label with their change at or below the position covered now released."""
        covered = min(upto, self._covered(shard.shard))
        if covered <= shard.released_seq:  # the snapshot dropped meanwhile (a shard's drop)
            return 0
        recs = self.store.get_records(shard.shard, ids, cache=False, vectors=False)
        gone = [(doc_id, rec) for doc_id, rec in zip(ids, recs, strict=True)
                if rec is not None and rec.tombstone and rec.label != NO_LABEL
                and rec.seq <= covered]
        batch = self.store.batch()
        labels = shard.release(gone, covered, batch)
        self.relabelled += 1  # before any of them can be given again
        try:
            self.store.write(batch)
        except NotSynced:  # in the store all the same: the labels are free
            shard.free.put(labels)
            shard.released_seq = covered
            raise
        shard.free.put(labels)
        shard.released_seq = covered
        return len(gone)

    def count(self) -> int:
        return sum(s.count for s in self.shards.values())

    def figures(self) -> dict[str, Any]:
        """What /metrics shows of this collection on this node (cheap: no I/O)."""
        return {"documents": self.count(), "vectors": self.index.ntotal,
                "index_state": self.state, "faiss_bytes": self.index.memory_bytes(),
                "rocksdb_bytes": self.store.memory_bytes(), "labels": self.label_figures(),
                "compactions": self.compactions,
                "added_since_compaction": self.index.added if self.index.trained else 0}

    def label_figures(self) -> dict[str, int]:
        """Over the local shards, the labels given (what the arrays over labels are sized
        by: the live bitmap, the IVF label-to-list map, the filter columns), those of them
        free to give again, and the bytes of the live bitmaps."""
        shards = list(self.shards.values())
        return {"given": sum(sh.next_label - 1 for sh in shards),
                "free": sum(len(sh.free) for sh in shards),
                "bitmap_bytes": sum(len(sh.live) for sh in shards)}

    def index_info(self) -> dict[str, Any]:
        """The index's shape and its recall curve (what a search by `recall` chooses from):
        its nlist beside the nlist its size calls for now (the lists grow longer, and a
        search at one nprobe scans more, until the retrain at `retrain_at` vectors)."""
        index = self.index
        n = self.count()
        ivf = self.spec.index.type != "flat" and n >= self.tuning.train_min
        retrain = (self.tuning.train_min if not index.trained
                   else math.ceil(self.tuning.retrain_growth * max(1, index.trained_at)))
        return {"nlist": index.nlist, "vectors": index.ntotal, "trained_at": index.trained_at,
                "nlist_target": choose_nlist(n, self.spec.index.nlist) if ivf else 1,
                "retrain_at": retrain if self.spec.index.type != "flat" else 0,
                "recall_curve": [[n, r] for n, r in index.curve]}

    def shard_states(self) -> dict[int, dict[str, Any]]:
        state = self.state
        info = self.index_info()
        return {
            n: {"shard": n, "count": s.count, "index_state": state, "index": info}
            for n, s in sorted(self.shards.items())
        }

    async def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None,
        predicate: Callable[[Any], bool] | None = None,
        shards: Iterable[int] | None = None,
        with_vectors: bool = False,
        plans: dict[int, dict[str, Any]] | None = None,
        recall: float | None = None,
        *,
        inline: bool = False,
    ) -> list[list[Hit]]:
        """The best `k` hits per query over the given local shards (all when None); their
        stored vectors too when asked. `plans`, when given, receives how each shard was
        searched (see `node.storage.planner`), with the nprobe used. `recall`: in place of
        `nprobe`, the fewest probes that reached it when the index was calibrated.
        `inline`: a small unfiltered search may run on the calling (event-loop) thread when
        the search threads are idle, where the hop to one and back costs more than the
        search (a peer's sub-search: its coordinator batches them under load)."""
        q = prepare(queries, self.spec.metric)
        index = self.index  # the one searched: a swap may come while the search waits
        probe, wanted = self._probe_and_shards(index, k, nprobe, recall, shards)
        if predicate is None:
            if inline and self._inline_ok(len(q), k, probe, wanted, with_vectors):
                rows = run_batch(self, q, k, probe, wanted, with_vectors)
            else:
                rows = await self._batcher.submit((probe, wanted, with_vectors), q, k)
            self._plan_unfiltered(plans, index, probe, wanted)
            return [row[:k] for row in rows]
        how = FilterQuery.of(predicate) if isinstance(predicate, Filter) else predicate
        # A filtered batch's plans (matches, the probes its queries took) are all of its
        # queries': a search that asks for plans (explain, a target recall's nprobe) shares
        # its batch with no other, under the batcher's limit all the same.
        alone = () if plans is None else (object(),)
        answers = await self._filtered.submit((probe, wanted, with_vectors, how, *alone), q, k)
        if plans is not None and answers:
            probed = _probed(index, probe)
            plans.update({p["shard"]: {**probed, **p} for p in answers[0][1]})
        return [row[:k] for row, _ in answers]

    def _probe_and_shards(self, index: VectorIndex, k: int, nprobe: int | None,
                          recall: float | None, shards: Iterable[int] | None
                          ) -> tuple[int, tuple[int, ...]]:
        if recall is not None:
            # Holding part of the collection, this node holds part of its k best: it
            # meets the target on its share of them (see `model.recall.share_top`).
            probe = index.nprobe_for(
                recall, share_top(k, len(self.shards), self.spec.shards))
        else:
            probe = nprobe or self.spec.index.nprobe
        wanted = tuple(sorted(self.shards if shards is None else shards))
        self._have(wanted)
        return probe, wanted

    def _plan_unfiltered(self, plans: dict[int, dict[str, Any]] | None, index: VectorIndex,
                         probe: int, wanted: tuple[int, ...]) -> None:
        """Into `plans` (when asked), how an unfiltered search went over these shards."""
        if plans is not None:
            probed = _probed(index, probe)
            plans.update({s: {"shard": s, "path": "unfiltered", **probed,
                              "documents": self.shards[s].count} for s in wanted})

    async def search_found(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None,
        shards: Iterable[int] | None = None,
        plans: dict[int, dict[str, Any]] | None = None,
        recall: float | None = None,
        *,
        inline: bool = False,
    ) -> Found:
        """`search` without a filter, its hits' documents not read yet: per query, the
        scores and keys of at least the k best (a batch's largest k), for `read_found` to
        read those a coordinator keeps after merging with its peers' hits."""
        q = prepare(queries, self.spec.metric)
        index = self.index
        probe, wanted = self._probe_and_shards(index, k, nprobe, recall, shards)
        token = (self, self.relabelled)  # before the search: a release during it shows
        rows: list[FoundRow]
        if inline and self._inline_ok(len(q), k, probe, wanted, False):
            rows = _found_rows(self, q, k, probe, wanted)
        else:
            rows = await self._batcher.submit((probe, wanted, None), q, k)
        self._plan_unfiltered(plans, index, probe, wanted)
        return Found([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], token)

    async def read_found(self, found: Found, keys: list[int], with_vectors: bool
                         ) -> list[Hit | None]:
        """The documents of these keys of `found` (see `ShardBackend.read_found`): a few on
        the calling thread (two reads of the store each, through its block cache), more, or
        with their vectors (1.5 KiB each at 384 dimensions, the likeliest to be past the
        cache), on a search thread."""
        token = found.token
        if (not isinstance(token, tuple) or token[0] is not self
                or token[1] != self.relabelled):
            raise StaleFound(f"labels of {self.spec.name!r} were given again since the search")
        try:
            if len(keys) <= INLINE_READS and not with_vectors:
                docs = read_keys(self.store, keys, with_vectors)
            else:
                docs = await self.blocking.search(read_keys, self.store, keys, with_vectors)
        except Exception:
            # Closed (dropped, or created again under its name) since the search, or while
            # a search thread read (no lock held, a writer not waited for): "store is not
            # open", searched again rather than a failed search.
            if self.closed:
                raise StaleFound(f"{self.spec.name!r} was closed since the search") from None
            raise
        if self.relabelled != token[1]:  # released while a search thread read them
            raise StaleFound(f"labels of {self.spec.name!r} were given again since the search")
        return [None if d is None else Hit(d[0], 0.0, d[1], d[2], key >> LABEL_BITS)
                for key, d in zip(keys, docs, strict=True)]

    def _inline_ok(self, nq: int, k: int, probe: int, wanted: tuple[int, ...],
                   with_vectors: bool) -> bool:
        """A search small enough to run on the event loop, now: no writer in or waiting on
        the index (nothing is awaited until it returns, so none can enter), no batch on the
        search threads, and the selector of part of the local shards already made (its
        bitmap costs in proportion to the labels given: a search thread makes it)."""
        want = candidates(self, k)
        # A compressed index's search re-ranks 4-10 candidates a hit, each a read of its
        # vector by label (3-6 µs where the vectors exceed the block cache): up to half a
        # millisecond or more, for the hop's 10 µs saved. Not on the loop.
        if (want > k or nq > INLINE_ROWS or nq * want > INLINE_CANDIDATES
                or not self.rw.readable_now() or not self._batcher.idle):
            return False
        index = self.index
        if wanted and len(wanted) < len(self.shards) and not index.has_shards_selector(
                wanted, max(self.shards[s].next_label for s in wanted)):
            return False
        if index.trained:
            lists = index.nlist
            probed = min(probe, lists)
            # The centroids compared, then the vectors of the lists probed (of the size a
            # query like the data meets: uneven lists are longer where most vectors are).
            scanned = lists + index.imbalance() * index.ntotal * probed / lists
        else:
            scanned = index.ntotal
        if with_vectors:  # the hits' vectors read
            scanned += want
        return nq * scanned * self.spec.dim <= INLINE_WORK

    async def count_matching(
        self, shards: list[int], predicate: Callable[[Any], bool] | None
    ) -> dict[int, int]:
        """Per local shard, its live documents that `predicate` admits."""
        self._have(shards)
        if predicate is None:
            return count_shards(self, shards, None)
        async with self.rw.read():
            # Cancelled (a hedge that lost, a deadline), the read lock is kept until the
            # thread ends: a write let in meanwhile reached the cached match sets before the
            # thread cached the one it had evaluated without the write.
            return await _to_the_end(
                self.blocking.search(count_shards, self, shards, predicate))

    async def scroll(
        self, shard: int, after: str | None, limit: int,
        predicate: Callable[[Any], bool] | None, with_vectors: bool,
    ) -> tuple[list[Hit], str | None]:
        """A page of the shard's live documents in id order (see `paging.scroll_shard`)."""
        self._have([shard])
        async with self.rw.read():  # to the thread's end, as a count's
            return await _to_the_end(self.blocking.search(
                scroll_shard, self, shard, after, limit, predicate, with_vectors))

    def _have(self, shards: Iterable[int]) -> None:
        self._open_now()
        absent = [s for s in shards if s not in self.shards]
        if absent:
            raise Unavailable(f"shard(s) {absent} of {self.spec.name!r} are not on this node")

    def _open_now(self) -> None:
        """Unavailable once closed: a search that began before the close (waiting for its
        batch, or a caller still holding this object) fails as a shard that did not answer,
        so it is asked elsewhere or reported missing; it is not answered from the empty index
        a close leaves."""
        if self.closed:
            raise Unavailable(f"collection {self.spec.name!r} is closed on this node")

    async def _run_batch(self, key: Any, q: np.ndarray, k: int) -> list[Any]:
        """Per query row, its hits; with `with_vectors` None (`search_found`), its (scores,
        keys) before any document is read."""
        probe, wanted, with_vectors = key
        if with_vectors is None:
            return await self._run_parts(_found_rows, q, k, probe, wanted)
        return await self._run_parts(run_batch, q, k, probe, wanted, with_vectors)

    async def _run_parts(self, fn: Callable[..., list[Any]], q: np.ndarray, k: int,
                         *args: Any) -> list[Any]:
        # A large batch (one request of many vectors, or many requests batched) is split
        # over the search threads that the collection's other batches leave free: FAISS
        # runs single-threaded on each, and one request alone would otherwise leave the
        # other cores idle. With every thread taken, a split gains nothing and costs CPU:
        # each part is a FAISS call, two multi-gets and a wake-up of the loop more, and
        # the parts scan memory at once.
        free = self.blocking.search_threads - self._batches_running
        parts = max(1, min(free, len(q) // SPLIT_ROWS))
        self._batches_running += 1
        try:
            async with self.rw.read():
                self._open_now()
                if parts == 1:
                    return await self.blocking.search(fn, self, q, k, *args)
                # Every part ends before the read lock is left, a failed one too: the lock
                # is what keeps index updates and swaps away from the parts still in FAISS.
                got = await asyncio.gather(*(
                    self.blocking.search(fn, self, part, k, *args)
                    for part in np.array_split(q, parts)), return_exceptions=True)
        finally:
            self._batches_running -= 1
        for rows in got:
            if isinstance(rows, BaseException):
                raise rows
        return [row for rows in got if not isinstance(rows, BaseException) for row in rows]

    async def _run_filtered(
        self, key: Any, q: np.ndarray, k: int
    ) -> list[tuple[list[Hit], list[dict[str, Any]]]]:
        probe, wanted, with_vectors, how = key[:4]
        async with self.rw.read():
            self._open_now()
            rows, plans = await self.blocking.search(
                search_planned, self, q, k, probe, how, wanted, with_vectors,
                self.tuning.filter_path,
            )
        for p in plans:
            self.plan_counts[p["path"]] = self.plan_counts.get(p["path"], 0) + len(q)
        return [(row, plans) for row in rows]

    # -- background -----------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        track(asyncio.get_running_loop().create_task(coro), self._tasks, log)

    def wants_training(self) -> bool:
        n = self.count()
        if (self.training or self.compacting or self.spec.index.type == "flat"
                or n < self.tuning.train_min):
            return False
        if not self.index.trained:
            return True
        return n >= self.tuning.retrain_growth * max(1, self.index.trained_at)

    def _retrain_deferred(self) -> float:
        """Seconds a wanted retraining still waits for writes to pause (0: not deferred)."""
        if not self.index.trained:
            return 0.0  # the first training: until it, searches are exact scans
        now = time.monotonic()
        if self._wanted_since is None:
            self._wanted_since = now
        quiet = self._last_write + self.tuning.retrain_quiet_s - now
        waited = self._wanted_since + self.tuning.retrain_max_wait_s - now
        return max(0.0, min(quiet, waited))

    def _maybe_train(self) -> None:
        if self.closed or not self.wants_training():
            self._wanted_since = None
            self._maybe_compact()
            return
        wait = self._retrain_deferred()
        if wait > 0:
            if self._recheck is None:
                self._recheck = asyncio.get_running_loop().call_later(wait, self._look_again)
            return
        self.training = True
        self._wanted_since = None
        self._spawn(self._train())

    def _look_again(self) -> None:
        self._recheck = None
        self._maybe_train()

    def _compaction_due(self) -> bool:
        """Whether the adds since the index's lists were allocated to their size call for a
        compaction (`Tuning.compact_growth`, `compact_min`)."""
        index = self.index
        return index.trained and self.tuning.compaction_due(index.added, index.ntotal)

    def _maybe_compact(self) -> None:
        """Start a compaction when one is due and writes have paused for compact_quiet_s (as a
        deferred retraining waits for them to); else look again when they may have. Never
        beside a training (which compacts its own index) or another compaction."""
        if self.closed or self.training or self.compacting or not self._compaction_due():
            return
        wait = self._last_write + self.tuning.compact_quiet_s - time.monotonic()
        if wait > 0:
            if self._recheck is None:
                self._recheck = asyncio.get_running_loop().call_later(wait, self._look_again)
            return
        self.compacting = True
        self._spawn(self._compact())

    def _training_set(self, upto: dict[int, int]) -> VectorIndex:
        """A new IVF index over the shards' documents up to `upto`, streamed from the store
        (`node.storage.training`): no copy of every vector beside the new index."""
        spec = self.spec

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for s, q in upto.items():
                if s in self.shards:
                    for chunk in self.shards[s].live_chunks(q, TRAIN_CHUNK):
                        if self.closed:  # a stop does not wait for the rest of a training
                            raise TrainingStopped(self.spec.name)
                        yield chunk

        serving = self.index
        index = train_streamed(spec, self.count(), chunks, checkpoint=self._checkpoint(),
                               trained_at=serving.trained_at if serving.trained else 0)
        if index is None:
            raise RuntimeError("no vectors to train on")
        return index

    def _checkpoint(self) -> Checkpoint:
        """Where this incarnation's trainings keep their trained quantizer until a snapshot
        holds the index (`trained_checkpoint`); one per incarnation (its lock orders a
        training's save and the removal after the swap of the one before)."""
        if self._kept is None or self._kept.owner != self.uid.encode()[:MAX_OWNER]:
            # Through a weak reference: the collection holds the checkpoint, which would hold
            # the collection in turn, a cycle that kept a dropped one (and its index) until
            # the collector's next full pass.
            me = weakref.ref(self)

            def live() -> bool:
                coll = me()
                return coll is not None and not coll.closed

            self._kept = Checkpoint(self.root, self.uid, live)
        return self._kept

    def _compacted_sync(self, index: VectorIndex) -> VectorIndex:
        """The new index's lists allocated to their size (`training.compacted`), once it has
        caught up: the writes of a long training, added after a compaction, grew every list
        by doubling again (a training at 2.46M vectors caught up to 3M: 350 MiB of RSS above
        the same node restarted)."""
        if self.closed:  # past its last read: no index written out for nobody, maybe into
            raise TrainingStopped(self.spec.name)  # the folder of the name's next incarnation
        trim()
        return compacted(index, self.root / f".compact{TMP_SUFFIX}")

    async def _train(self) -> None:
        """Train in the background while the current index serves; swap it in under the
        write mutex after replaying the writes that came meanwhile."""
        swapped: VectorIndex | None = None
        try:
            upto = self._applied()
            self._training_upto = upto
            # The shards themselves: one dropped and taken again meanwhile has the same
            # number but labels given afresh, which the new index would mistake for its own.
            held = dict(self.shards)
            log.info("%s: training on %d vectors", self.spec.name, self.count())
            t0 = time.perf_counter()
            new = await self.blocking.background(self._training_set, upto)
            if self.on_trained is not None:
                self.on_trained(time.perf_counter() - t0)
            # Catch up with the writes made while training, without any lock (the new index
            # is nobody else's yet), in rounds while writes keep coming; then compact its
            # lists (what the catch-up added grew them by doubling) and catch up with the
            # few writes made meanwhile, so that the swap below only replays the last few.
            since = await self._catch_up(new, upto)
            new = await self.blocking.background(self._compacted_sync, new)
            mark = await self._catch_up(new, since)
            async with self._exclusive():
                if self.shards != held or set(mark) != set(upto):
                    log.info("%s: shards changed while training; training again", self.spec.name)
                else:
                    # Not left half done by a close: it would snapshot the new index with
                    # positions saying it holds the writes the swap had still to replay.
                    await _to_the_end(self.blocking.write(self._swap_sync, new, mark))
                    swapped = new
                    log.info("%s: trained (nlist=%d)", self.spec.name, new.index.nlist)
            del new
            await self._give_back()
        except TrainingStopped:
            log.info("%s: training stopped by the close", self.spec.name)
        except Exception:
            log.exception("%s: training failed", self.spec.name)
        finally:
            self.training = False
            self._training_upto = None
        await self.snapshot()
        if swapped is not None and swapped is self.index and self._saved is swapped:
            # The index this training swapped in is in a snapshot: its quantizer need not be
            # kept. Not after a training that failed or swapped nothing: the next one takes it;
            # nor one trained on more: a retraining started since (this one's `training`
            # flag is down) has kept it.
            await self.blocking.write(self._checkpoint().remove, swapped.trained_at)
        del swapped
        self._maybe_train()

    async def _give_back(self) -> None:
        """After a swap: the old index's memory, freed by it, back to the system (outside
        locks); the memtables flushed: a swap follows a pause in the writes, and what a bulk
        load left in them would stay there until the next writes fill them. The trim waits
        for that flush (and the compactions it starts) to end: they run on RocksDB's threads
        and free what they allocated after a trim made at once, which nothing followed after
        a compaction (no snapshot is due then): 12.6 MiB that a trim gave back after 1M
        `ivf_sq8` with a compaction."""
        if not self.closed:  # a flush waits for the memtable switch: off the loop
            await self.blocking.write(self.store.flush_memtables)
            # Not while writes go on (a training's swap in a bulk load): RocksDB is busy for
            # as long, and the next snapshot trims.
            last = self._last_write
            for _ in range(int(GIVE_BACK_WAIT_S / GIVE_BACK_LOOK_S)):
                if self.closed or self._last_write != last or not self._rocksdb_busy():
                    break
                await asyncio.sleep(GIVE_BACK_LOOK_S)  # RocksDB tells nobody when it is done
        await self.blocking.background(shed_blocks, self.store.memory)  # the load's blocks
        await self.blocking.background(trim)

    def _rocksdb_busy(self) -> bool:
        """Whether RocksDB flushes or compacts this store now, or has either pending (a few
        property reads: microseconds)."""
        try:
            return self.store.busy(ROCKSDB_BUSY)
        except Exception:  # closed meanwhile: nothing to wait for
            return False

    async def _catch_up(self, new: VectorIndex, since: dict[int, int]) -> dict[int, int]:
        """Replay into `new` (nobody's but the caller's: no lock) the changes logged after
        `since`, in rounds while writes keep coming (see CATCH_UP_ROUNDS), then, if more
        than CATCH_UP_TAIL came during the last, the rest with the writes held (see
        CATCH_UP_SLICE_S); returns the positions it has replayed up to (what a swap replays
        after: at most CATCH_UP_TAIL changes, and those written since)."""
        before = math.inf
        for _ in range(CATCH_UP_ROUNDS):
            mark = self._applied()
            at: dict[int, int] | None = since
            while at is not None:  # up to `mark`, a slice at a time, beside the writes
                at = await self.blocking.catch_up(self._catch_up_sync, new, at,
                                                  CATCH_UP_SLICE_S, mark)
            since = mark
            now = self._applied()
            came = sum(now.get(s, q) - q for s, q in mark.items())
            if came <= CATCH_UP_TAIL:  # few left
                return since
            if came >= before:  # not converging
                break
            before = came
        log.info("%s: writes outpace the catch-up; replaying the rest with writes held, "
                 "%.1f s at a time", self.spec.name, CATCH_UP_SLICE_S)
        before = math.inf
        while True:
            # On a write thread, not the catch-up thread: holding this collection's writes,
            # it must not wait for another collection's slice there.
            async with self.write_mutex, self.apply_lock:  # nothing written nor applied
                mark = self._applied()
                left = sum(mark.get(s, q) - q for s, q in since.items())
                # The writes let through since the last slice (a group of up to
                # GROUP_MAX_DOCS) brought as many changes as it replayed, or more: slices
                # would never end; the rest is replayed at once, the writes held.
                seconds = CATCH_UP_SLICE_S if left < before else None
                reached = await _to_the_end(self.blocking.write(
                    self._catch_up_sync, new, since, seconds))
            if reached is None:
                return mark
            since, before = reached, left  # the writes queued meanwhile go, then the next

    async def _compact(self) -> None:
        """The index with its lists allocated to their size, swapped in as a training's is:
        a copy made under the read lock (searches go on; index updates wait, a fraction of a
        second at 1M), caught up with the writes made since outside any lock, then swapped
        in under every lock with the rest replayed; the old index freed on the write thread
        and its memory given back. Memory: the index once more for that while (a scratch
        file as a training's `compacted` uses saves nothing here: the old index serves until
        the swap). The changes after the copy's position stay in the change log meanwhile
        (`_covered`), as for a training. Writes that resumed meanwhile (more than
        COMPACT_TAIL changes) drop the copy: its catch-up would race them, its lists grow by
        doubling again, and the swap replay the rest under every lock (16 s at 1M during a
        bulk load, old index and copy both in memory)."""
        done = False
        try:
            held = dict(self.shards)
            added, t0 = self.index.added, time.perf_counter()
            async with self.rw.read():  # no index update in between: the copy is at `mark`
                mark = self._applied()
                self._training_upto = mark
                new = await _to_the_end(self.blocking.write(self._copy_sync))
            upto = self._applied()  # the writes made since (usually none), outside any lock
            await self.blocking.background(self._catch_up_sync, new, mark)
            came = sum(q - mark.get(s, q) for s, q in self._applied().items())
            if came > COMPACT_TAIL:
                log.info("%s: writes resumed while compacting (%d changes); not swapped",
                         self.spec.name, came)
            else:
                async with self._exclusive():
                    if self.shards != held:
                        log.info("%s: shards changed while compacting; not swapped",
                                 self.spec.name)
                    else:
                        await _to_the_end(self.blocking.write(self._swap_sync, new, upto, True))
                        done = True
                        self.compactions += 1
            del new
            if done:
                log.info("%s: index lists compacted (%d vectors, %d added since the last "
                         "time) in %.2f s", self.spec.name, self.index.ntotal, added,
                         time.perf_counter() - t0)
                await self._give_back()
            else:  # the copy's memory back to the system
                await self.blocking.background(trim)
        except TrainingStopped:
            pass
        except Exception:
            log.exception("%s: compaction failed", self.spec.name)
            if not done:  # not tried again before as many vectors more are added
                self.index.added = 0
        finally:
            self.compacting = False
            self._training_upto = None
        self._maybe_train()

    def _copy_sync(self) -> VectorIndex:
        if self.closed:
            raise TrainingStopped(self.spec.name)
        return self.index.compact_copy()

    def _applied(self) -> dict[int, int]:
        """Per shard held, the change-log position its index has applied up to."""
        return {s: sh.applied_seq for s, sh in self.shards.items()}

    def _catch_up_sync(self, new: VectorIndex, upto: dict[int, int],
                       seconds: float | None = None, until: dict[int, int] | None = None
                       ) -> dict[int, int] | None:
        """Replay into `new` the changes logged after `upto` (a shard's up to `until`'s
        position when given, or a little past it: a chunk's end). With `seconds`: stop after
        the chunk that ends past them, and return every shard's position reached then (None
        once everything is replayed)."""
        end = None if seconds is None else time.perf_counter() + seconds
        reached = dict(upto)
        for s, q in upto.items():
            shard = self.shards.get(s)
            if shard is None or (until is not None and q >= until.get(s, q)):
                continue
            for ops in shard.replay(q, CATCH_UP_CHUNK):
                if self.closed:  # the store closes next: not read past a chunk
                    raise TrainingStopped(self.spec.name)
                self._apply_sync(ops, new)
                reached[s] = ops.last_seq
                if until is not None and ops.last_seq >= until.get(s, ops.last_seq):
                    break
                if end is not None and time.perf_counter() > end:
                    return reached
        return None

    def _swap_sync(self, new: VectorIndex, upto: dict[int, int], same: bool = False) -> None:
        """`new` in place of the index, the changes after `upto` replayed into it. `same`:
        it holds what the index did (a compaction's copy), so the snapshot of the one is the
        other's (see `_saved`)."""
        old, self.index = self.index, new
        try:
            for s, shard in self.shards.items():
                for ops in shard.replay(upto[s]):
                    self._apply_sync(ops)
        except BaseException:
            self.index = old
            raise
        # The old index goes now, on this thread: as the last one saved it lived on until the
        # next snapshot ended (past the heap trim that follows the swap), and was freed on the
        # event loop then (millions of FAISS's hash entries). The new one is unsaved anyway.
        if self._saved is old:
            self._saved = new if same else None
        del old

    def _dirty(self) -> bool:
        if self.index.trained and self.index is not self._saved:
            return True
        return any(sh.applied_seq > self.snapshot_seqs.get(s, 0) for s, sh in self.shards.items())

    def _snapshot_sync(self) -> None:
        covered = self._applied()
        self.index.save(self.snap_path, covered)
        self.snapshot_seqs = covered
        self._saved = self.index

    async def snapshot(self) -> None:
        """A snapshot if anything changed since the last, then the labels of the tombstones
        it covers released (`release_labels`)."""
        await self._save()
        if not self.closed:
            await self.release_labels()

    async def _save(self) -> None:
        """Write the file under the locks (into the page cache), make it durable outside
        them. Also while a training runs (of the index that serves, the one a restart needs):
        skipped then, the change log a restart replays grew for as long as the training
        took (1.16M changes, 160 s to ready at 6M vectors). Both halves run on the write
        threads (one fsyncs while another applies writes), the background one being
        the training's."""
        if self.closed or not self._dirty():
            return
        async with self._saving:
            if self.closed or not self._dirty():  # the one waited for covered it all
                return
            async with self.rw.read():
                covered = self._applied()
                index = self.index
                stage = asyncio.ensure_future(
                    self.blocking.write(index.stage, self.snap_path, covered))
                try:
                    staged = await _to_the_end(stage)
                except asyncio.CancelledError:
                    if not stage.cancelled() and stage.exception() is None:
                        stage.result().unlink(missing_ok=True)
                    raise
            try:
                await _to_the_end(
                    self.blocking.write(index.save, self.snap_path, covered, staged))
            except BaseException:  # the commit failed (it cleans up after itself) or a close
                staged.unlink(missing_ok=True)
                raise
            self.snapshot_seqs = covered
            if index is self.index:  # not an index a training's swap replaced meanwhile
                self._saved = index
            # What writes left in the C heap, back to the system.
            await self.blocking.write(trim)


async def _to_the_end(work: Awaitable[T], on_cancel: Callable[[], None] | None = None
                      ) -> T:
    """`work` (a thread's, or a coroutine awaiting one) awaited; cancelled (a close), still
    waited for to its end before the cancellation goes on (and the locks held are left): the
    thread cannot be stopped, and what it does after the close returned clashed with the
    close's snapshot (an index changing while it is written) or came after it (a snapshot
    written into the folder of the collection's next incarnation). `on_cancel` tells the
    thread to cut short."""
    job = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        await asyncio.wait([job])
        if not job.cancelled():
            job.exception()  # retrieved: the cancellation is what the caller hears
        raise


def _least_delete(docs: list[Incoming]) -> float:
    """The least version of the deletes among `docs` (inf if none)."""
    return min([d.version for d in docs if d.vector is None], default=math.inf)


def _incoming(doc_id: str, rec: Record) -> Incoming:
    vec = None if rec.tombstone else rec.vector_array()
    return Incoming(doc_id, vec, rec.metadata, rec.version, rec.writer)


def _found_rows(coll: Collection, q: np.ndarray, k: int, probe: int, wanted: tuple[int, ...]
                ) -> list[FoundRow]:
    return found_rows(coll, *find_batch(coll, q, k, probe, wanted))


def _probed(index: VectorIndex, probe: int) -> dict[str, int]:
    """The probes a plan names (an exact index probes no lists: a search by recall then
    reports 1, the whole index), of the index a search started on. Only when plans are asked
    for: the index's nlist is a SWIG attribute, read at a cost."""
    return {"nprobe": max(1, min(probe, index.nlist))} if index.trained else {}
