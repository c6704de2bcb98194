"""Training a collection's IVF index without a second copy of its vectors in memory: the
vectors are streamed from the store in chunks, twice. The first pass keeps a uniform sample
(what k-means trains on: 64 points per list), the second adds every chunk to the trained
index and, for the calibration (search by recall), keeps the exact nearest neighbours of a few
stored documents over all of them, chunk by chunk. Memory beyond the new index: the sample and
one chunk.

Blocking (RocksDB reads, FAISS training): runs on the background thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from aquila.cluster.model.spec import CollectionSpec
from aquila.node.storage.index import (
    CALIBRATION_K,
    CALIBRATION_QUERIES,
    VectorIndex,
    choose_nlist,
    faiss,
    faiss_metric,
)

log = logging.getLogger(__name__)
Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # (prepared vectors, keys)
SAMPLE_PER_LIST = 64


class Truth:
    """The exact k+1 nearest stored vectors of some queries, merged chunk by chunk."""

    def __init__(self, queries: np.ndarray, k: int, metric: str) -> None:
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.metric = metric
        self.larger_is_better = metric != "l2"
        worst = -np.inf if self.larger_is_better else np.inf
        self.scores = np.full((len(queries), k), worst, dtype=np.float32)
        self.keys = np.full((len(queries), k), -1, dtype=np.int64)

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        if not len(vectors) or not len(self.q):
            return
        kk = min(self.k, len(vectors))
        s, rows = faiss.knn(self.q, np.ascontiguousarray(vectors), kk,
                            metric=faiss_metric(self.metric))
        scores = np.concatenate([self.scores, s], axis=1)
        cand = np.concatenate([self.keys, np.where(rows >= 0, keys[np.maximum(rows, 0)], -1)],
                              axis=1)
        order = np.argsort(-scores if self.larger_is_better else scores, axis=1,
                           kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(scores, order, 1)
        self.keys = np.take_along_axis(cand, order, 1)


def train_streamed(spec: CollectionSpec, n: int, chunks: Chunks,
                   seed: int = 0) -> VectorIndex | None:
    """An IVF index of the collection's type over every vector `chunks()` yields (about `n`
    of them), trained on a uniform sample, calibrated; None when there are none."""
    nlist = choose_nlist(max(1, n), spec.index.nlist)
    want = min(n, SAMPLE_PER_LIST * nlist)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(max(1, n), dtype=bool)
    chosen[rng.choice(n, want, replace=False) if n else []] = True
    sample_v: list[np.ndarray] = []
    sample_k: list[np.ndarray] = []
    seen = 0
    for vectors, keys in chunks():
        # Rows beyond the count taken at the start (written since) are not sampled.
        pick = chosen[seen: seen + len(vectors)]
        sample_v.append(vectors[: len(pick)][pick].copy())
        sample_k.append(keys[: len(pick)][pick].copy())
        seen += len(vectors)
    if not seen:
        return None
    sample = np.concatenate(sample_v)
    sample_keys = np.concatenate(sample_k)
    del sample_v, sample_k
    index = VectorIndex.new_ivf(spec, choose_nlist(seen, spec.index.nlist), seen)
    index.index.train(sample)
    # Calibration queries: stored documents, from the sample (uniform already).
    qrows = rng.permutation(len(sample))[:CALIBRATION_QUERIES]
    queries, qkeys = sample[qrows].copy(), sample_keys[qrows].copy()
    del sample, sample_keys
    truth = Truth(queries, CALIBRATION_K + 1, spec.metric)
    total = 0
    for vectors, keys in chunks():
        index.add(vectors, keys)
        truth.add(vectors, keys)
        total += len(vectors)
    index.trained_at = total
    index.calibrate_against(queries, qkeys, truth.keys)
    return index


def compacted(index: VectorIndex, scratch: Path) -> VectorIndex:
    """The same index with its inverted lists allocated to their size: written to `scratch`
    (the page cache, no fsync), dropped, read back, the file removed. Added to chunk by
    chunk, each list grew by doubling and holds on average about 40% more than its vectors
    (0.4x the raw vectors for ivf_flat), which a restart, reading a snapshot, never has.
    Memory: never more than the index once (the file stands in for the second copy)."""
    if not index.trained:
        return index
    try:
        try:  # through Python's file: an error at the close raises (FAISS's only prints)
            with open(scratch, "wb") as f:
                faiss.write_index(index.index, faiss.PyCallbackIOWriter(f.write, 8 << 20))
        except (OSError, RuntimeError) as exc:  # no room (say): the training is kept whole
            log.warning("index lists left as they are: no scratch file (%s)", exc)
            return index
        index.index = None
        release_memory()
        fresh = faiss.read_index(str(scratch))
    finally:
        with contextlib.suppress(OSError):
            scratch.unlink()
    faiss.extract_index_ivf(fresh).set_direct_map_type(faiss.DirectMap.Hashtable)
    index.index = fresh
    return index


# glibc's mallopt parameters. M_ARENA_MAX: how many heaps (arenas) threads may spread their
# allocations over; each keeps the memory freed in it. FAISS, RocksDB and the node's thread
# pools would otherwise get up to eight a core. M_MMAP_THRESHOLD: blocks from this size up are
# mapped apart and given back whole when freed. Set, it stays fixed; left alone glibc raises
# it to the largest block freed so far (up to 32 MiB), after which the write path's request
# buffers, RocksDB's memtable blocks and training's chunks are carved from the heaps, between
# blocks that live on, and what they leave is kept (RSS after a bulk load well above the same
# node restarted).
_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 10


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library's functions, through the process's own symbols: no lookup by name
    (`ctypes.util.find_library` runs `ldconfig -p` in a child process, a fork of the whole
    node each time, which held the event loop for half a second on a busy machine)."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def limit_arenas(arenas: int = 2) -> None:
    """Fewer malloc arenas: memory freed by one thread is reused by the next instead of
    staying behind in an arena of its own; large blocks always mapped apart (glibc only;
    elsewhere nothing)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, arenas)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim): a training
    frees hundreds of megabytes in blocks that glibc would otherwise keep for later, counted
    in the node's RSS."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc
        libc.malloc_trim(0)
