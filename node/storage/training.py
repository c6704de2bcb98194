"""Training a collection's IVF index without a second copy of its vectors in memory: the
vectors are streamed from the store in chunks, twice. The first pass keeps a uniform sample
(what k-means trains on: 64 points per list), the second adds every chunk to the trained
index and, for the calibration (search by recall), keeps the exact nearest neighbours of a few
stored documents over all of them, chunk by chunk. Memory beyond the new index: the sample and
one chunk. From TWO_LEVEL_FROM lists on, k-means runs in two levels (`two_level_centroids`),
then a few flat rounds over a subsample: under half the time at 10k lists.

Blocking (RocksDB reads, FAISS training): runs on the background thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from aquila.cluster.model.spec import CollectionSpec
from aquila.node.storage.heap import trim
from aquila.node.storage.index import (
    CALIBRATION_K,
    CALIBRATION_QUERIES,
    VectorIndex,
    choose_nlist,
    faiss,
    faiss_metric,
    shard_bits,
)
from aquila.node.storage.packed_lists import repair
from aquila.node.storage.trained_checkpoint import Checkpoint

log = logging.getLogger(__name__)

Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # (prepared vectors, keys)
SAMPLE_PER_LIST = 64
# From this many lists on (about 1M vectors), k-means runs in two levels
# (`two_level_centroids`). Below it flat k-means takes a minute or two at most, and it is a
# little better: on the WordNet set at 1,312 lists, recall@10 at equal nprobe 0.01-0.02 above
# two-level k-means with the rounds below (scripts/bench_training.py).
TWO_LEVEL_FROM = 4096
# The rounds of flat k-means after the two levels, over a subsample of this many points per
# list: they move the lists the coarse borders cut, re-seed the empty ones, and buy back most
# of the recall two levels alone lose (0.03 on WordNet).
REFINE_PER_LIST = 32
REFINE_ROUNDS = 3


def _kmeans(x: np.ndarray, k: int, cp: Any, metric: int,
            start: np.ndarray | None = None) -> np.ndarray:
    """k centroids of the rows of x by FAISS's k-means with these parameters, from the
    centroids `start` when given (else FAISS's own seeding)."""
    d = x.shape[1]
    clus = faiss.Clustering(d, k, cp)
    if start is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(start).ravel(), clus.centroids)
    clus.train(np.ascontiguousarray(x), faiss.IndexFlat(d, metric))
    out: np.ndarray = faiss.vector_to_array(clus.centroids).reshape(k, d)
    return out


def _refined(x: np.ndarray, centroids: np.ndarray, cp: Any, metric: int,
             rounds: int = 1) -> np.ndarray:
    """Rounds of flat k-means over x from these centroids (FAISS moves each to the mean of
    its points and splits the largest clusters into those left without any)."""
    one = faiss.ClusteringParameters()
    one.niter, one.seed, one.spherical = rounds, cp.seed, cp.spherical
    one.min_points_per_centroid, one.max_points_per_centroid = 1, 1 << 30
    return _kmeans(x, len(centroids), one, metric, centroids)


def shares(sizes: np.ndarray, total: int) -> np.ndarray:
    """`total` lists split among groups of these sizes in proportion (largest remainders),
    none given more lists than it has points (so every k-means has a point per centroid;
    fewer than `total` in all when there are fewer points)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    exact = total * sizes / max(1, int(sizes.sum()))
    out: np.ndarray = np.minimum(np.floor(exact).astype(np.int64), sizes)
    while (left := total - int(out.sum())) > 0 and (room := out < sizes).any():
        # The groups with the most points per list get the rest, one each.
        per = np.where(room, sizes / (out + 1), -1.0)
        pick = np.argsort(-per, kind="stable")[: min(left, int(room.sum()))]
        out[pick] += 1
    return out


def two_level_centroids(sample: np.ndarray, nlist: int, cp: Any, metric: int,
                        refine: np.ndarray | None = None, rounds: int = 1) -> np.ndarray:
    """nlist centroids in two levels: about √nlist coarse clusters of the sample, then each
    split by its own k-means into its share of the lists (in proportion to its points).
    Flat k-means compares every point with every centroid at each round (sample × nlist:
    640k × 10k at 10k lists, half an hour on a busy core); here each point meets √nlist
    coarse centroids, then about √nlist of its own cluster's. A split by coarse clusters
    leaves some lists that no vector is nearest to (a tenth at 10k lists on blobs that a
    coarse border cuts), and lists beside a border are placed worse than flat k-means would:
    `rounds` of flat k-means over `refine` (a uniform subsample) move every centroid to the
    mean of its points and re-seed the empty ones. Figures: scripts/bench_training.py."""
    if len(sample) < nlist:
        raise ValueError(f"{len(sample)} points cannot make {nlist} lists")
    k1 = max(1, int(round(math.sqrt(nlist))))
    coarse = _kmeans(sample, k1, cp, metric)
    _, assign = faiss.knn(sample, coarse, 1, metric=metric)
    assign = assign[:, 0]
    order = np.argsort(assign, kind="stable")
    sizes = np.bincount(assign, minlength=k1)
    counts = shares(sizes, nlist)
    out = np.empty((nlist, sample.shape[1]), np.float32)
    at, lo = 0, 0
    for c in range(k1):
        rows = order[lo: lo + sizes[c]]
        lo += sizes[c]
        k = int(counts[c])
        if k:
            pts = sample[rows]
            out[at: at + k] = pts if k == len(pts) else _kmeans(pts, k, cp, metric)
            at += k
    if refine is not None and len(refine) >= nlist:
        out = _refined(refine, out, cp, metric, rounds)
    return out


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


def train_quantizer(ivf: Any, sample: np.ndarray, metric: str,
                    rng: np.random.Generator) -> None:
    """Train an empty FAISS IVF index on the sample: its lists' centroids by two-level
    k-means from TWO_LEVEL_FROM lists on, else by FAISS's own (flat) k-means; then what else
    the index type needs (ivf_sq8's ranges, ivf_pq's codebooks), which FAISS trains on the
    sample once its quantizer holds nlist centroids."""
    nlist = int(ivf.nlist)
    if nlist >= TWO_LEVEL_FROM and len(sample) > nlist:
        rows = rng.choice(len(sample), min(len(sample), REFINE_PER_LIST * nlist),
                          replace=False)
        ivf.quantizer.add(two_level_centroids(sample, nlist, ivf.cp, faiss_metric(metric),
                                              sample[np.sort(rows)], REFINE_ROUNDS))
    ivf.train(sample)


def train_streamed(spec: CollectionSpec, n: int, chunks: Chunks, seed: int = 0,
                   checkpoint: Checkpoint | None = None, trained_at: int = 0
                   ) -> VectorIndex | None:
    """An IVF index of the collection's type over every vector `chunks()` yields (about `n`
    of them), trained on a uniform sample, calibrated; None when there are none.
    `checkpoint`: where the trained quantizer is kept, and taken from instead of training
    when an earlier training of the collection left one that fits (trained on more than
    `trained_at`, what the serving index was trained on: 0 for none)."""
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
    took, points = [time.perf_counter()], len(sample)
    kept = checkpoint.load(spec, seen, trained_at) if checkpoint is not None else None
    if kept is not None:
        index = VectorIndex(kept[0], True, seen, shard_bits(spec.shards))
        log.info("%s: the trained quantizer an earlier training kept is used (trained on "
                 "%d vectors; %d now)", spec.name, kept[1], seen)
    else:
        index = VectorIndex.new_ivf(spec, choose_nlist(seen, spec.index.nlist), seen)
        train_quantizer(index.index, sample, spec.metric, rng)
        if checkpoint is not None:
            checkpoint.save(index.index, seen)
    took.append(time.perf_counter())
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
    took.append(time.perf_counter())
    index.calibrate_against(queries, qkeys, truth.keys)
    took.append(time.perf_counter())
    # Where a training's time goes (the sample pass reads the store: see the collection's log
    # of the whole).
    log.info("%s: k-means %.1f s (%d lists from %d points), add and exact answers %.1f s "
             "(%d vectors), calibration %.1f s", spec.name, took[1] - took[0], index.nlist,
             points, took[2] - took[1], total, took[3] - took[2])
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
        trim()
        fresh = repair(faiss.read_index(str(scratch)), faiss)
    finally:
        with contextlib.suppress(OSError):
            scratch.unlink()
    faiss.extract_index_ivf(fresh).set_direct_map_type(faiss.DirectMap.NoMap)
    index.index = fresh
    index.added = 0
    return index
