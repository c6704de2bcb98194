"""The FAISS index of a collection's local shards on this node, over numpy arrays: exact
(flat) while small, IVF once trained.

One index serves every local shard of the collection, so a search costs one FAISS call and
one coarse quantisation instead of one per shard. Callers name documents by global keys
`shard << 40 | label` (the document's stable label within its shard), so a shard's vectors can
be removed when it moves away and a search can be restricted to some shards. Inside FAISS the
same document has the id `label << b | shard`, `b` the bits of the collection's shard count:
ids stay dense, so a set of documents (some shards', a filter's matches) is a bitmap of about
one bit per document of the collection, which FAISS tests in a nanosecond
(`IDSelectorBitmap`). This module translates both ways; nothing else sees FAISS ids.
Cosine collections store unit vectors and search by inner product; callers normalise
(see `prepare`).
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import faiss as _faiss
import numpy as np
import orjson

from aquila.cluster.model.recall import (
    Curve,
    RankCurve,
    checked_curve,
    checked_rank_curve,
    curve_at,
    ladder,
    monotone,
    nprobe_for,
)
from aquila.cluster.model.spec import CollectionSpec, pq_m
from aquila.node.files import commit_file, stage_file
from aquila.node.storage.label_arrays import capacity, widened
from aquila.node.storage.packed_lists import PackedLists, is_packed, repair

# FAISS's bundled stubs lag its API (SearchParametersIVF keywords, DirectMap, ...).
faiss: Any = _faiss

# 3: FAISS ids interleave the shard below the label (2 had global keys; it is rebuilt).
_SNAP_MAGIC = b"AQIX3\n"
# 4: the same, of a fast-scan index (ivf_pq): code before it would take the file and add to
# its block-packed lists with FAISS's add_core (codes written unpacked: heap corruption); it
# refuses this magic and rebuilds from the store. Other indexes are written as 3 still.
_SNAP_MAGIC_PACKED = b"AQIX4\n"
# 5: an ivf_flat index without its vectors (see `stage`): its trained quantizer and, per
# shard, the list of each label; the lists are refilled from the store's V keys at the start
# (`refill`). Code before it refuses the magic and rebuilds from the store.
_SNAP_MAGIC_LISTS = b"AQIX5\n"
_SNAP_MAGICS = (_SNAP_MAGIC, _SNAP_MAGIC_PACKED, _SNAP_MAGIC_LISTS)
_MAP_TYPES = ("<i2", "<i4")  # the label → list maps' types in an AQIX5 snapshot
# trained-at count, kind (0 flat, 1 ivf), shard bits, crc32 of meta + payload, meta length,
# payload length
_SNAP_HEADER = struct.Struct(">QBBIQQ")
_READ_CHUNK = 8 << 20
LABEL_BITS = 40
_MASK = (1 << LABEL_BITS) - 1
# Every VectorIndex object gets its own generation: what is derived from one (list numbers,
# gathered vectors) is never taken for another's after a training swap or a reload.
_GENERATIONS = itertools.count(1)
# Calibration (search by target recall): stored documents used as queries, and the k their
# recall is measured at.
CALIBRATION_QUERIES = 300
CALIBRATION_K = 10


def without_interrupt_checks() -> None:
    """Remove the interrupt callback faiss's Python module installs (for the process).

    With it, a search of many lists stops every few lists to take the GIL and ask Python
    whether a signal came (`PyErr_CheckSignals`): inside a node, whose event loop and JSON
    work hold the GIL most of the time, each such stop waits for it: in process, an IVF
    search (100k x 96, nprobe 64, one thread) beside a thread encoding JSON took 6.9-7.3 ms
    of wall time with it, 5.7 without (the rest is waiting for the GIL at the call's end).
    A node's searches are bounded by the requests' limits and its signals are the event
    loop's, so nothing needs to interrupt FAISS."""
    faiss.InterruptCallback.clear_instance()


def interrupt_checks_installed() -> bool:
    """Whether FAISS checks for interrupts during long searches (its period hint is 2^30,
    never, when no callback is installed)."""
    return bool(faiss.InterruptCallback.get_period_hint(10**9) < 1 << 30)


def global_key(shard: int, label: int) -> int:
    return (shard << LABEL_BITS) | label


def global_keys(shard: int, labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64) + np.int64(shard << LABEL_BITS)


def shard_bits(shards: int) -> int:
    """Bits of a FAISS id that name the shard, for a collection of this many shards."""
    return max(1, (shards - 1).bit_length())


def faiss_metric(metric: str) -> int:
    return int(faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)


def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, unit length for cosine."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric != "cosine":
        return x
    # What np.linalg.norm(x, axis=1) computes (the same products and sum: the same bits),
    # without its checks and dispatch: every search prepares its queries on the loop.
    norms = np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True))
    if not norms.all():
        norms[norms == 0] = 1.0
    out: np.ndarray = x / norms  # a new C-contiguous array
    return out


def fast_scan_m(dim: int) -> int:
    """Sub-quantizers of ivf_pq's 4-bit codes: the divisor of `dim` whose sub-vectors are
    nearest 4 dimensions (dim/4 when 4 divides it; of two as near, the finer), so a code is
    about dim/8 bytes (48 at 384 dimensions, as the 8-bit codes before it)."""
    return min((m for m in range(1, dim + 1) if dim % m == 0),
               key=lambda m: (abs(dim / m - 4), -m))


def choose_nlist(n: int, configured: int | None) -> int:
    """About 4·√n lists, never more than n/8 (each list needs points to train on)."""
    if configured is not None:
        return max(1, min(configured, n))
    return max(1, min(int(round(4 * math.sqrt(n))), n // 8))


@dataclass
class VectorIndex:
    index: Any  # faiss.Index
    trained: bool  # an IVF index (False: exact flat)
    trained_at: int  # vectors it was trained on (0 for flat)
    bits: int  # `shard_bits` of the collection: FAISS id = label << bits | shard
    generation: int = field(default_factory=lambda: next(_GENERATIONS))
    # IVF: recall@CALIBRATION_K by nprobe, measured when trained (see `calibrate`); kept in
    # the snapshot with the index.
    curve: Curve = field(default_factory=list)
    # The same calibration by rank (see `model.recall.RankCurve`): what recall@m costs for m
    # below CALIBRATION_K, for a node holding part of a collection. Empty in a snapshot of an
    # older version: recall@CALIBRATION_K serves for every m then.
    by_rank: RankCurve = field(default_factory=list)
    _at: dict[int, Curve] = field(default_factory=dict, repr=False)
    # IVF only, built on first use, then kept current by add and remove: per shard, the
    # inverted list holding each label (-1: none), so a filter's matches per list are counted
    # with one bincount (see `lists_of`), and `remove` and `vectors_of` find a label's list
    # (the index keeps no FAISS direct map).
    _lists: dict[int, np.ndarray] | None = field(default=None, repr=False)
    _sizes: np.ndarray | None = field(default=None, repr=False)
    # Per set of shards, a bitmap selector of their ids and the labels it covers.
    _shard_sels: dict[tuple[int, ...], tuple[int, Any]] = field(default_factory=dict, repr=False)
    # Search parameters without a selector, per nprobe (see `search`).
    _params: dict[int, Any] = field(default_factory=dict, repr=False)
    # IVF: the lists' imbalance factor and the vectors held when it was computed (`imbalance`).
    _imbalance: tuple[float, int] | None = field(default=None, repr=False)
    # IVF: vectors added since the inverted lists were last allocated to their size (by
    # FAISS reading the index: a load, a training's `compacted`, `compact_copy`). Each add
    # grows a full list by doubling, and a bulk load's adds leave up to as much again unused
    # (`Collection._maybe_compact` looks at this).
    added: int = field(default=0, repr=False)
    # Loaded from an AQIX5 snapshot (ivf_flat): per shard, the list the snapshot recorded for
    # each label (-1: none), until `refill` puts the stored vectors back into the (empty) lists.
    pending: dict[int, np.ndarray] | None = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int:
        return int(self.index.nlist) if self.trained else 1

    def nprobe_for(self, recall: float, top: int = CALIBRATION_K) -> int:
        """The fewest probes that reached `recall` when the index was calibrated (1 for an
        exact index, which every search scans whole): recall@CALIBRATION_K, or recall@`top`
        when fewer (the share of a search's best that a node's part holds, `share_top`)."""
        if not self.trained:
            return 1
        if top >= CALIBRATION_K or not self.by_rank:
            return nprobe_for(self.curve, recall)
        curve = self._at.get(top)
        if curve is None:
            curve = self._at[top] = curve_at(self.by_rank, top)
        return nprobe_for(curve, recall)

    def calibrate(self, vectors: np.ndarray, keys: np.ndarray, metric: str,
                  queries: int = CALIBRATION_QUERIES, seed: int = 0) -> Curve:
        """Measure recall@CALIBRATION_K against exact search for a ladder of nprobe values
        and keep the curve. The queries are stored documents (`vectors`, under `keys`, what
        the index was built from), each left out of its own answer and its own ground truth,
        so that they are held out as a client's query would be. Slow (an exact search of
        `queries` over `vectors`): call from a background thread."""
        n = len(vectors)
        if not self.trained or n < 2:
            self.curve = []
            return self.curve
        k = min(CALIBRATION_K, n - 1)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, min(queries, n), replace=False))
        q = np.ascontiguousarray(vectors[rows])
        _, truth = faiss.knn(q, vectors, k + 1, metric=faiss_metric(metric))
        return self.calibrate_against(q, keys[rows], keys[truth])

    def calibrate_against(self, q: np.ndarray, own: np.ndarray, truth: np.ndarray) -> Curve:
        """`calibrate` with the exact answers known: `q` stored vectors (keys `own`), `truth`
        the keys of their CALIBRATION_K + 1 nearest stored vectors, best first (themselves
        among them; left out of both sides)."""
        self._at = {}
        if not self.trained or not len(q):
            self.curve, self.by_rank = [], []
            return self.curve
        k = min(CALIBRATION_K, truth.shape[1] - 1)
        ranked = [t[(t != o) & (t >= 0)][:k].tolist() for t, o in zip(truth, own, strict=True)]
        total = sum(len(w) for w in ranked)
        # Queries that have an r-th neighbour at all, per rank r.
        have = np.bincount([r for w in ranked for r in range(len(w))], minlength=k)
        points: list[tuple[int, float]] = []
        by_rank: RankCurve = []
        for nprobe in ladder(self.nlist):
            _, found = self.search(q, k + 1, nprobe)
            per_rank = np.zeros(k)
            for w, f, o in zip(ranked, found, own, strict=True):
                got = set(f[f != o][:k].tolist())
                for r, key in enumerate(w):
                    per_rank[r] += key in got
            points.append((nprobe, float(per_rank.sum()) / max(1, total)))
            by_rank.append((nprobe, [round(float(x), 4)
                                     for x in per_rank / np.maximum(have, 1)]))
            if points[-1][1] >= 0.9999:  # every larger nprobe finds them all too
                break
            # A compressed index's codes stop finding more well below 1 (ivf_sq8: 0.977 from
            # nprobe 8 of 5,657 lists on 2M blobs): once two steps found none, the rest of the
            # ladder, up to every list, is not measured (about three exact scans of the index
            # per query: half of that retraining's time).
            if len(points) >= 3 and points[-1][1] <= points[-3][1]:
                break
        self.curve = monotone(points)
        self.by_rank = by_rank if k == CALIBRATION_K else []
        return self.curve

    @staticmethod
    def flat(dim: int, metric: str, shards: int) -> VectorIndex:
        base = faiss.IndexFlat(dim, faiss_metric(metric))
        return VectorIndex(faiss.IndexIDMap2(base), False, 0, shard_bits(shards))

    # -- global keys and FAISS ids ----------------------------------------------------------
    def ids(self, keys: np.ndarray) -> np.ndarray:
        """FAISS ids of global keys."""
        keys = np.asarray(keys, dtype=np.int64)
        return np.ascontiguousarray(((keys & _MASK) << self.bits) | (keys >> LABEL_BITS))

    def keys(self, ids: np.ndarray) -> np.ndarray:
        """Global keys of FAISS ids (-1 stays -1: no result)."""
        ids = np.asarray(ids, dtype=np.int64)
        keys = ((ids & ((1 << self.bits) - 1)) << LABEL_BITS) | (ids >> self.bits)
        return np.where(ids < 0, -1, keys)

    def selector(self, labels: dict[int, np.ndarray], below: int) -> Any:
        """A FAISS selector of these labels of these shards (all below `below`): a bitmap of
        `below << bits` bits, about one per document of the collection."""
        slots = np.zeros(below << self.bits, dtype=bool)
        for s, ls in labels.items():
            slots[(np.asarray(ls, dtype=np.int64) << self.bits) | s] = True
        return _bitmap(np.packbits(slots, bitorder="little"))

    def shards_selector(self, shards: tuple[int, ...], below: int) -> Any:
        """A FAISS selector of every id of these shards with a label below `below`; kept per
        set of shards and rebuilt only when labels pass twice the bound it was built for."""
        hit = self._shard_sels.get(shards)
        if hit is not None and hit[0] >= below:
            return hit[1]
        bound = max(1024, 1 << max(0, below - 1).bit_length() + 1)
        slot = np.zeros(1 << self.bits, dtype=bool)
        slot[list(shards)] = True
        sel = _bitmap(np.packbits(np.tile(slot, bound), bitorder="little"))
        self._shard_sels[shards] = (bound, sel)
        return sel

    def imbalance(self) -> float:
        """IVF: the lists' imbalance factor (n·Σ size² / total²: 1 when even), which is the
        size of the list a query drawn like the data falls in, over the mean size. One pass
        over the list sizes (in C++), made again once the vectors held moved by a tenth."""
        n = self.ntotal
        hit = self._imbalance
        if hit is None or abs(n - hit[1]) * 10 > hit[1]:
            factor = float(self.index.invlists.imbalance_factor()) if n else 1.0
            hit = self._imbalance = (factor if math.isfinite(factor) else 1.0, n)
        return hit[0]

    def has_shards_selector(self, shards: tuple[int, ...], below: int) -> bool:
        """Whether `shards_selector(shards, below)` is made already (no bitmap to build)."""
        hit = self._shard_sels.get(shards)
        return hit is not None and hit[0] >= below

    @staticmethod
    def train_ivf(spec: CollectionSpec, vectors: np.ndarray, labels: np.ndarray) -> VectorIndex:
        """Train an IVF index of the collection's type on `vectors` and add them. Slow: call
        from a background thread; FAISS releases the GIL. (A collection trains streamed
        from its store: `node.storage.training`.)"""
        n = len(vectors)
        out = VectorIndex.new_ivf(spec, choose_nlist(n, spec.index.nlist), n)
        sample = vectors
        max_train = 64 * out.nlist
        if n > max_train:
            rng = np.random.default_rng(0)
            sample = vectors[rng.choice(n, max_train, replace=False)]
        out.index.train(sample)
        out.add(vectors, labels)
        return out

    @staticmethod
    def new_ivfpq8(spec: CollectionSpec, nlist: int, n: int) -> VectorIndex:
        """An untrained `ivf_pq` index as the node made it before the fast scan: FAISS's
        `IndexIVFPQ`, 8-bit codes (fewer bits below 4,096 vectors), the divisor of dim
        nearest dim/8 sub-quantizers, plain lists. Its snapshots still load and serve until
        the next training; benchmarks and tests build one to compare with."""
        metric = faiss_metric(spec.metric)
        m = pq_m(spec.dim) or 1
        nbits = 8 if n >= 256 * 16 else max(4, int(math.log2(max(16, n // 16))))
        index = faiss.IndexIVFPQ(faiss.IndexFlat(spec.dim, metric), spec.dim, nlist, m,
                                 min(nbits, 8), metric)
        index.cp.min_points_per_centroid = 5
        index.cp.niter = 10
        index.set_direct_map_type(faiss.DirectMap.NoMap)
        return VectorIndex(index, True, n, shard_bits(spec.shards))

    @staticmethod
    def new_ivf(spec: CollectionSpec, nlist: int, n: int) -> VectorIndex:
        """An untrained IVF index of the collection's type with `nlist` lists, for about `n`
        vectors (ivf_pq's code size depends on it); train it, then `add`."""
        dim = spec.dim
        metric = faiss_metric(spec.metric)
        quantizer = faiss.IndexFlat(dim, metric)
        kind = spec.index.type
        if kind == "ivf_sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, metric
            )
        elif kind == "ivf_pq":
            # 4-bit codes scanned 32 at a time by SIMD (FAISS's fast scan, blocks of 32), the
            # candidates re-ranked with the exact vectors (`search.OVERSAMPLE`). Snapshots of
            # an 8-bit `IndexIVFPQ` still load and serve until the next training.
            index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, fast_scan_m(dim), 4,
                                             metric, 32)
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        index.cp.min_points_per_centroid = 5  # small indexes train without FAISS's warnings
        # 64 points per list and 10 k-means rounds: on the WordNet set a third of the time of
        # FAISS's defaults (256, 25) for 0.002 less recall@10, which keeps retraining a large
        # index in the background affordable.
        index.cp.niter = 10
        # No FAISS direct map (its hash table cost ~40 bytes a vector): `remove` and
        # `vectors_of` find a label's list through the node's own label → list map.
        index.set_direct_map_type(faiss.DirectMap.NoMap)
        return VectorIndex(index, True, n, shard_bits(spec.shards))

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        if not len(labels):
            return
        ids = self.ids(labels)
        if not self.trained:
            self.index.add_with_ids(vectors, ids)
            return
        # The coarse assignment add_with_ids would make, made here so the list numbers are
        # known: the same work, and `lists_of` stays current.
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        _, assign = self.index.quantizer.search(x, 1)
        assign = np.ascontiguousarray(assign[:, 0])
        if is_packed(self.index, faiss):
            # FAISS's add_core would write the codes unpacked into packed lists.
            codes = np.empty((len(x), int(self.index.code_size)), dtype=np.uint8)
            self.index.encode_vectors(len(x), faiss.swig_ptr(x), faiss.swig_ptr(assign),
                                      faiss.swig_ptr(codes), False)
            packed = PackedLists(self.index, faiss)
            for no, rows in _groups(assign):
                packed.append(no, ids[rows], codes[rows])
            self.index.ntotal = self.ntotal + len(x)
        else:
            self.index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids),
                                faiss.swig_ptr(assign))
        self.added += len(x)
        self._note_lists(np.asarray(labels, dtype=np.int64), assign)

    def compact_copy(self) -> VectorIndex:
        """IVF: a copy of the index with each inverted list allocated to its size (FAISS's
        clone copies a list's arrays at their length, where adds grew them by doubling); the
        same entries in the same order, so what is derived from the lists (the label → list
        map, copied) holds for both. Call while the index is not changed (a read lock); the
        copy is nobody else's. Memory: the index once more, until the caller drops one."""
        # (A fast-scan clone's decoder points at the original's codebooks: `repair`.)
        out = VectorIndex(repair(faiss.clone_index(self.index), faiss), self.trained,
                          self.trained_at, self.bits, curve=list(self.curve),
                          by_rank=list(self.by_rank))
        if self._lists is not None:
            out._lists = {s: a.copy() for s, a in self._lists.items()}
        # Read-only FAISS objects that depend on no entry: shared.
        out._shard_sels, out._params = dict(self._shard_sels), dict(self._params)
        return out

    def remove(self, labels: np.ndarray) -> None:
        """Remove these keys' vectors; keys not held are ignored."""
        if not len(labels):
            return
        keys = np.asarray(labels, dtype=np.int64)
        if not self.trained:
            self.index.remove_ids(self.ids(keys))
            return
        lists = self._list_numbers(keys)
        held = lists >= 0
        removed = self._remove_from_lists(self.ids(keys[held]), lists[held])
        self.index.ntotal = self.ntotal - removed
        self._note_lists(keys, np.full(len(keys), -1, dtype=np.int64))

    def _list_numbers(self, keys: np.ndarray) -> np.ndarray:
        """IVF: the list holding each key's vector, from the label → list map (-1: none)."""
        out = np.full(len(keys), -1, dtype=np.int64)
        shards = keys >> LABEL_BITS
        for s in np.unique(shards).tolist():
            pick = np.flatnonzero(shards == s)
            known = self.lists_of(s)
            labels = keys[pick] & _MASK
            inside = labels < len(known)
            out[pick[inside]] = known[labels[inside]]
        return out

    def _remove_from_lists(self, ids: np.ndarray, lists: np.ndarray) -> int:
        """Remove these FAISS ids from these lists (each id's own list) as FAISS's
        `remove_ids` does without a direct map: a list's holes, first to last, take its
        surviving entries from the end, last first; then the list is cut. Ids not in
        their list are ignored. Returns how many entries were removed."""
        if not len(ids):
            return 0
        inv = self.index.invlists
        packed = PackedLists(self.index, faiss) if is_packed(self.index, faiss) else None
        code_size = int(inv.code_size)
        removed = 0
        for no, rows in _groups(lists):
            n = int(inv.list_size(no))
            if not n:
                continue
            # Views of the list's arrays (the node's lists are FAISS's in-memory
            # ArrayInvertedLists: these pointers are their storage).
            own = faiss.rev_swig_ptr(inv.get_ids(no), n)
            gone = own == ids[rows[0]] if len(rows) == 1 else np.isin(own, ids[rows])
            k = int(np.count_nonzero(gone))
            if not k:
                continue
            m = n - k
            if packed is not None:
                packed.fill(no, n, np.flatnonzero(gone[:m]),
                            m + np.flatnonzero(~gone[m:])[::-1], m)
                removed += k
                continue
            if k == 1:  # the usual case: the last entry takes the place of the one removed
                at = int(gone.argmax())
                if at != m:
                    codes1 = faiss.rev_swig_ptr(inv.get_codes(no), n * code_size)
                    own[at] = own[m]
                    codes1[at * code_size: (at + 1) * code_size] = codes1[m * code_size:]
                inv.resize(no, m)
                removed += 1
                continue
            holes = np.flatnonzero(gone[:m])
            movers = m + np.flatnonzero(~gone[m:])[::-1]
            if len(holes):
                codes = faiss.rev_swig_ptr(inv.get_codes(no), n * code_size).reshape(
                    n, code_size)
                own[holes] = own[movers]
                codes[holes] = codes[movers]
            inv.resize(no, m)
            removed += k
        return removed

    # -- inverted lists, for filtered searches --------------------------------------------
    def _note_lists(self, keys: np.ndarray, lists: np.ndarray) -> None:
        self._sizes = None
        if self._lists is None:
            return
        shards = keys >> LABEL_BITS
        for s in np.unique(shards).tolist():
            pick = shards == s
            self._lists[s] = _put(self._lists.get(s), keys[pick] & _MASK, lists[pick],
                                  self.index.nlist)

    def all_keys(self) -> np.ndarray:
        """The global key of every vector held (one pass over the ids; at start)."""
        if not self.trained:
            ids = faiss.vector_to_array(self.index.id_map)
        else:
            inv = self.index.invlists
            parts = [(no, inv.list_size(no)) for no in range(self.index.nlist)]
            ids = np.concatenate(
                [faiss.rev_swig_ptr(inv.get_ids(no), n).copy() for no, n in parts if n]
                or [np.zeros(0, np.int64)])
        return self.keys(np.asarray(ids, dtype=np.int64))

    def lists_of(self, shard: int) -> np.ndarray:
        """IVF: per label of the shard, the inverted list holding its vector (-1: none or
        beyond the array). Built from the lists on first use (one pass over their ids)."""
        if self._lists is None:
            built: dict[int, np.ndarray] = {}
            ivf, inv = self.index, self.index.invlists
            sizes = [int(inv.list_size(no)) for no in range(ivf.nlist)]
            # The ids copied straight into one array (no copy per list: thousands of small
            # blocks freed between live ones, which the heap keeps).
            ids = np.empty(sum(sizes), dtype=np.int64)
            at = 0
            for no, n in enumerate(sizes):
                if n:
                    ids[at: at + n] = faiss.rev_swig_ptr(inv.get_ids(no), n)
                    at += n
            keys = self.keys(ids)
            del ids
            lists = np.repeat(np.arange(ivf.nlist, dtype=np.int64), sizes)
            shards = keys >> LABEL_BITS
            for s in np.unique(shards).tolist():
                pick = shards == s
                built[s] = _put(None, keys[pick] & _MASK, lists[pick], ivf.nlist)
            self._lists = built
        return self._lists.get(shard, np.zeros(0, _list_type(self.index.nlist)))

    def list_sizes(self) -> np.ndarray:
        """IVF: the number of vectors in each inverted list (cached until the next change:
        call under the index's read lock)."""
        if self._sizes is None:
            self._sizes = self._count_lists()
        return self._sizes

    def _count_lists(self) -> np.ndarray:
        inv = self.index.invlists
        return np.fromiter((inv.list_size(no) for no in range(self.index.nlist)),
                           dtype=np.int64, count=self.index.nlist)

    def coarse(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """IVF: per query, its `n` nearest lists, nearest first (distances, list numbers)."""
        d, lists = self.index.quantizer.search(queries, max(1, min(n, self.nlist)))
        return d, lists

    def search_lists(
        self, queries: np.ndarray, k: int, dist: np.ndarray, lists: np.ndarray, sel: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """IVF: search each query in its own lists (a row of `lists`, -1 for none; `dist`
        the coarse distances), only ids `sel` admits when given."""
        n = len(queries)
        x = np.ascontiguousarray(queries, dtype=np.float32)
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        dist = np.ascontiguousarray(dist, dtype=np.float32)
        k = max(1, k)
        scores = np.empty((n, k), dtype=np.float32)
        keys = np.empty((n, k), dtype=np.int64)
        params = faiss.SearchParametersIVF(nprobe=lists.shape[1], sel=sel)
        # The Python wrapper of search_preassigned refuses parameters (hence no selector);
        # the C++ call takes them.
        self.index.search_preassigned_c(
            n, faiss.swig_ptr(x), k, faiss.swig_ptr(lists), faiss.swig_ptr(dist),
            faiss.swig_ptr(scores), faiss.swig_ptr(keys), False, params,
        )
        return scores, self.keys(keys)

    def vectors_of(self, keys: np.ndarray) -> np.ndarray:
        """The stored (prepared) vectors of these keys, as the index holds them (decoded for
        quantised indexes)."""
        if not len(keys):
            return np.zeros((0, self.index.d), np.float32)
        if not self.trained:
            out: np.ndarray = self.index.reconstruct_batch(self.ids(keys))
            return out
        keys = np.asarray(keys, dtype=np.int64)
        ids, lists = self.ids(keys), self._list_numbers(keys)
        inv = self.index.invlists
        packed = PackedLists(self.index, faiss) if is_packed(self.index, faiss) else None
        code_size = int(self.index.code_size)
        coarse = int(self.index.coarse_code_size())
        # Each key's code as `sa_decode` takes it: its list number (little-endian, as
        # FAISS's encode_listno writes it), then the list's code.
        codes = np.empty((len(keys), coarse + code_size), dtype=np.uint8)
        codes[:, :coarse] = ((lists[:, None] >> (8 * np.arange(coarse))) & 0xFF).astype(
            np.uint8)
        found = np.zeros(len(keys), dtype=bool)
        for no, rows in _groups(lists):
            n = int(inv.list_size(no))
            if not n:
                continue
            own = faiss.rev_swig_ptr(inv.get_ids(no), n)
            if len(rows) == 1:
                at = np.flatnonzero(own == ids[rows[0]])[:1]
                rows = rows[: len(at)]
            else:
                sorter = np.argsort(own, kind="stable")
                at = sorter[np.minimum(np.searchsorted(own, ids[rows], sorter=sorter), n - 1)]
                hit = own[at] == ids[rows]
                rows, at = rows[hit], at[hit]
            if len(at) and packed is not None:
                codes[rows, coarse:] = packed.read(no, at)
                found[rows] = True
            elif len(at):
                listed = faiss.rev_swig_ptr(inv.get_codes(no), n * code_size).reshape(
                    n, code_size)
                codes[rows, coarse:] = listed[at]
                found[rows] = True
        if not found.all():
            missing = int(keys[np.flatnonzero(~found)[0]])
            raise RuntimeError(f"key {missing} not found")
        out = self.index.sa_decode(codes)
        return out

    def search(
        self, queries: np.ndarray, k: int, nprobe: int, selector: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global keys), each nq × k; key -1 where fewer than k were found.
        `selector`: only ids it admits (`selector`, `shards_selector`); None for all."""
        k = max(1, min(k, max(1, self.ntotal)))
        if self.trained:
            probe = max(1, min(nprobe, self.index.nlist))
            # Without a selector they are the same for every search at an nprobe: made once
            # (a SWIG object, ~10 µs to build and fill), at most nlist of them; FAISS only
            # reads them, so concurrent searches share them.
            params = None if selector is not None else self._params.get(probe)
            if params is None:
                params = faiss.SearchParametersIVF(nprobe=probe, sel=selector)
                if selector is None:
                    self._params[probe] = params
            scores, ids = self.index.search(queries, k, params=params)
        elif selector is not None:
            scores, ids = self.index.search(queries, k,
                                            params=faiss.SearchParameters(sel=selector))
        else:
            scores, ids = self.index.search(queries, k)
        return scores, self.keys(ids)

    def memory_bytes(self) -> int:
        """An estimate of the memory the index holds (for /metrics): per vector its code and
        its 64-bit id, and its entry in the id map (IVF: the label → list map, 2 bytes;
        flat: FAISS's hash entry); an IVF index's centroids too. A fast-scan index's codes
        fill whole blocks of 32 per list."""
        n, d = self.ntotal, int(self.index.d)
        if self.trained:
            code = int(faiss.extract_index_ivf(self.index).code_size)
            codes = n * code
            if is_packed(self.index, faiss):  # whole blocks of codes per list
                nvec = int(faiss.downcast_InvertedLists(self.index.invlists).n_per_block)
                # counted here, not cached: /metrics calls this under no lock, and sizes read
                # while the write thread changes the lists must not outlive the call
                codes = int((-(-self._count_lists() // nvec)).sum()) * nvec * code
            return codes + n * (8 + 2) + int(self.index.nlist) * d * 4
        return n * (d * 4 + 8 + 16)

    # -- snapshots ------------------------------------------------------------------------
    def stage(self, path: Path, covered: dict[int, int]) -> Path:
        """Write the snapshot (with the change-log position each shard's part covers) into
        a temporary file beside `path`, not yet durable (call while mutations are excluded;
        `save` makes it the snapshot). FAISS writes the index straight into the file, a
        list at a time: no copy of the index in memory (serialising one into a buffer held
        two or three, the buffer growing by doubling: gigabytes at 10M vectors).

        A trained ivf_flat index is written without its vectors (AQIX5): its lists' codes
        are the stored vectors, which the store holds under V already. The file holds the
        quantizer and, per shard, each label's list (2 bytes a label); `load` gives an index
        with empty lists and `refill` puts the store's vectors back into them."""
        info: dict[str, Any] = {"covered": {str(s): q for s, q in covered.items()},
                                "curve": self.curve, "by_rank": self.by_rank}
        maps: list[np.ndarray] = []
        quantizer = np.zeros(0, np.uint8)
        lean = self.trained and _without_vectors(self.index)
        if lean:
            quantizer = faiss.serialize_index(self.index.quantizer)
            shards = []
            for s, arr in sorted(self._list_maps().items()):
                maps.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
                shards.append([s, len(arr), maps[-1].dtype.str])
            info["lists"] = {"nlist": self.nlist, "dim": int(self.index.d),
                             "metric": int(self.index.metric_type),
                             "quantizer": len(quantizer), "shards": shards}
        meta = orjson.dumps(info)
        n0 = len(_SNAP_MAGIC) + _SNAP_HEADER.size
        magic = (_SNAP_MAGIC_LISTS if lean else _SNAP_MAGIC_PACKED
                 if is_packed(self.index, faiss) else _SNAP_MAGIC)

        def fill(f: BinaryIO) -> None:
            f.write(bytes(n0))  # the header, once the checksum is known
            f.write(meta)
            crc, size = zlib.crc32(meta), 0

            def put(chunk: bytes) -> int:
                nonlocal crc, size
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
                return f.write(chunk)

            if lean:
                put(quantizer.tobytes())
                for arr in maps:
                    put(arr.tobytes())
            else:
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(put, _READ_CHUNK))
            f.seek(0)
            f.write(magic + _SNAP_HEADER.pack(self.trained_at, int(self.trained),
                                                    self.bits, crc, len(meta), size))

        return stage_file(path, fill)

    def _list_maps(self) -> dict[int, np.ndarray]:
        """IVF: per shard, its label → list map cut after its last label held."""
        self.lists_of(0)
        assert self._lists is not None
        out = {}
        for s, arr in self._lists.items():
            held = np.flatnonzero(arr >= 0)
            out[s] = arr[: int(held[-1]) + 1 if len(held) else 0]
        return out

    def save(self, path: Path, covered: dict[int, int], staged: Path | None = None) -> None:
        """Write atomically (`staged` by `stage`, or now): a crash mid-write leaves the
        previous snapshot in place."""
        commit_file(self.stage(path, covered) if staged is None else staged, path)

    @staticmethod
    def load(path: Path, shards: int) -> tuple[VectorIndex, dict[int, int]] | None:
        """(index, covered seq per shard), or None when missing, damaged or of another
        layout (the caller rebuilds from the store). The file is read twice, a chunk at a
        time: once for its checksum (FAISS never reads a damaged index), then by FAISS
        straight into the index's structures (no copy of the whole file in memory).
        An AQIX5 snapshot gives an ivf_flat index with empty lists and its `pending` maps:
        `refill` it from the store before anything else."""
        n0 = len(_SNAP_MAGIC) + _SNAP_HEADER.size
        pending: dict[int, np.ndarray] | None = None
        try:
            with path.open("rb") as f:
                head = f.read(n0)
                if len(head) < n0 or head[: len(_SNAP_MAGIC)] not in _SNAP_MAGICS:
                    return None
                trained_at, kind, bits, crc, meta_len, length = _SNAP_HEADER.unpack_from(
                    head, len(_SNAP_MAGIC))
                size = path.stat().st_size
                if size != n0 + meta_len + length or bits != shard_bits(shards):
                    return None
                raw_meta = f.read(meta_len)
                check = zlib.crc32(raw_meta)
                while chunk := f.read(_READ_CHUNK):
                    check = zlib.crc32(chunk, check)
                if check != crc:
                    return None
                f.seek(n0 + meta_len)
                if head[: len(_SNAP_MAGIC)] == _SNAP_MAGIC_LISTS:
                    lean = _read_lean(f, orjson.loads(raw_meta), length)
                    if lean is None:
                        return None
                    index, pending = lean
                else:
                    index = repair(faiss.read_index(
                        faiss.PyCallbackIOReader(f.read, _READ_CHUNK)), faiss)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError):
            return None
        meta = orjson.loads(raw_meta)
        curve: Curve = []
        by_rank: RankCurve = []
        if isinstance(meta, dict) and "covered" in meta:
            try:
                curve = checked_curve(meta.get("curve", []))
                by_rank = checked_rank_curve(meta.get("by_rank", []), CALIBRATION_K)
            except ValueError:
                return None
            meta = meta["covered"]
        covered = {int(s): int(q) for s, q in meta.items()}
        if kind and pending is None:
            # Snapshots of older versions hold FAISS's hash table direct map: dropped (see
            # `new_ivf`), its bucket array too (which emptying the table keeps: ~8 bytes a
            # vector), by putting an empty map (of no type) in its place.
            ivf = faiss.extract_index_ivf(index)
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
            ivf.direct_map = faiss.DirectMap()
        return VectorIndex(index, bool(kind), int(trained_at), bits, curve=curve,
                           by_rank=by_rank, pending=pending), covered

    def refill(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> int:
        """An index loaded from an AQIX5 snapshot: each of these (prepared vectors, global
        keys), the stored live documents unchanged since the snapshot (seq ≤ its covered
        position), added to the list the snapshot recorded for its label, in FAISS's
        `add_core` (no coarse assignment). Each list is first given the capacity the map
        counts for it (no growth by doubling). The label → list map is what was added: a
        label the replay that follows removes without its vector here is no entry. Returns
        how many vectors the snapshot did not place (it cannot hold them: the caller
        rebuilds from the store)."""
        assert self.pending is not None
        maps, self.pending = self.pending, None
        nlist = self.nlist
        counts = np.zeros(nlist, np.int64)
        for arr in maps.values():
            counts += np.bincount(arr[arr >= 0], minlength=nlist)
        inv = self.index.invlists
        for no in np.flatnonzero(counts).tolist():
            inv.resize(no, int(counts[no]))  # std::vector keeps its capacity when cut
            inv.resize(no, 0)
        self._lists = {}
        strays = 0
        for vectors, keys in chunks:
            keys = np.asarray(keys, dtype=np.int64)
            lists = np.full(len(keys), -1, np.int64)
            shard_of = keys >> LABEL_BITS
            for s in np.unique(shard_of).tolist():
                pick = np.flatnonzero(shard_of == s)
                known = maps.get(s, np.zeros(0, np.int16))
                labels = keys[pick] & _MASK
                inside = labels < len(known)
                lists[pick[inside]] = known[labels[inside]]
            keep = lists >= 0
            x = vectors
            if not keep.all():
                strays += int(len(keep) - np.count_nonzero(keep))
                x, keys, lists = vectors[keep], keys[keep], lists[keep]
            if not len(keys):
                continue
            x = np.ascontiguousarray(x, dtype=np.float32)
            ids = self.ids(keys)
            self.index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids),
                                faiss.swig_ptr(lists))
            self._note_lists(keys, lists)
        self.added = 0
        self._sizes = None
        return strays


def _without_vectors(index: Any) -> bool:
    """Whether a trained index's snapshot leaves its vectors to the store: ivf_flat's codes
    are the vectors themselves (quantised types keep their codes: re-encoding millions at a
    start would take too long)."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat)


def _read_lean(f: BinaryIO, meta: Any, length: int
               ) -> tuple[Any, dict[int, np.ndarray]] | None:
    """An AQIX5 payload (`f` at its start, `length` bytes): the ivf_flat index with empty
    lists and the per-shard label → list maps; None when its description does not fit."""
    info = meta.get("lists") if isinstance(meta, dict) else None
    if not isinstance(info, dict):
        return None
    nlist, dim, metric, qlen = (int(info[k]) for k in ("nlist", "dim", "metric", "quantizer"))
    shards = [(int(s), int(n), str(t)) for s, n, t in info["shards"]]
    if (min(nlist, dim, qlen) <= 0 or any(n < 0 or t not in _MAP_TYPES for _, n, t in shards)
            or qlen + sum(n * np.dtype(t).itemsize for _, n, t in shards) != length):
        return None
    quantizer = faiss.deserialize_index(np.frombuffer(f.read(qlen), np.uint8))
    if quantizer.ntotal != nlist or quantizer.d != dim or quantizer.metric_type != metric:
        return None
    maps: dict[int, np.ndarray] = {}
    for s, n, t in shards:
        arr = np.frombuffer(f.read(n * np.dtype(t).itemsize), t)
        if len(arr) != n or (n and (arr.min() < -1 or arr.max() >= nlist)):
            return None
        maps[s] = arr.astype(_list_type(nlist))
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
    quantizer.this.disown()  # the index owns it now
    index.own_fields = True
    index.set_direct_map_type(faiss.DirectMap.NoMap)
    return index, maps


def _list_type(nlist: int) -> type[np.signedinteger[Any]]:
    """The narrowest signed type for list numbers and -1: an array over every label a shard
    has given (a deleted document's slot stays until its label is given again) costs 2 bytes
    a label up to 32,767 lists."""
    return np.int16 if nlist < 2**15 else np.int32


def _put(arr: np.ndarray | None, labels: np.ndarray, values: np.ndarray, nlist: int
         ) -> np.ndarray:
    """`arr[labels] = values` on an array of list numbers defaulting to -1, grown to fit
    (`label_arrays`)."""
    if arr is None:
        arr = np.zeros(0, _list_type(nlist))
    need = int(labels.max()) + 1 if len(labels) else 0
    if need > len(arr):
        arr = widened(arr, capacity(need, len(arr)), -1)
    arr[labels] = values
    return arr


def _groups(lists: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Per list number (-1 left out), the positions in `lists` holding it."""
    order = np.argsort(lists, kind="stable")
    ordered = lists[order]
    bounds = np.r_[np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]), len(ordered)]
    for i in range(len(bounds) - 1):
        if bounds[i] < len(ordered) and ordered[bounds[i]] >= 0:
            yield int(ordered[bounds[i]]), order[bounds[i]: bounds[i + 1]]


def _bitmap(bits: np.ndarray) -> Any:
    # FAISS reads the array by raw pointer; its Python wrapper keeps it alive with the selector.
    return faiss.IDSelectorBitmap(bits)
