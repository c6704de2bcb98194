"""The in-process FAISS reference on the same vectors: one IndexIVFFlat over everything, the
per-shard equivalent (one IVF per shard, merged like the node merges), and one with the node's
own nlist; recall and queries/s batched and from Python threads one query at a time."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np
from bench_common import K, log
from bench_data import Dataset, normalise, recall_at_k

from aquila.cluster.model.sharding import shard_of


def _single_threaded_faiss() -> None:
    """Each worker thread runs FAISS single-threaded (like the node's search pool)."""
    faiss.omp_set_num_threads(1)


def new_ivf(d: int, nlist: int, seed: int | None = None) -> faiss.IndexIVFFlat:
    """An empty inner-product IndexIVFFlat (k-means seed: FAISS's default when None)."""
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 5
    if seed is not None:
        index.cp.seed = seed
    return index


def train_ivf(x: np.ndarray, nlist: int, seed: int = 0) -> faiss.IndexIVFFlat:
    index = new_ivf(x.shape[1], nlist, seed)
    sample = x
    if x.shape[0] > 256 * nlist:
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(x.shape[0], 256 * nlist, replace=False)]
    index.train(sample)
    index.add(x)
    return index


class Searcher:
    """One IVF index, or several (shards) whose answers are merged like the node does."""

    def __init__(self, name: str, parts: list[tuple[faiss.IndexIVFFlat, np.ndarray]]) -> None:
        self.name = name
        self.parts = parts  # (index, global row ids of its vectors)

    @property
    def nlists(self) -> list[int]:
        return [int(ix.nlist) for ix, _ in self.parts]

    def search(self, q: np.ndarray, nprobe: int) -> np.ndarray:
        if len(self.parts) == 1:
            index, ids = self.parts[0]
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, index.nlist))
            _, lab = index.search(q, K, params=params)
            return np.where(lab >= 0, ids[np.maximum(lab, 0)], -1)
        ds, ls = [], []
        for index, ids in self.parts:
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, index.nlist))
            d, lab = index.search(q, K, params=params)
            ds.append(np.where(lab >= 0, d, -np.inf))
            ls.append(np.where(lab >= 0, ids[np.maximum(lab, 0)], -1))
        d_all = np.hstack(ds)
        l_all = np.hstack(ls)
        order = np.argsort(-d_all, axis=1, kind="stable")[:, :K]
        return np.take_along_axis(l_all, order, axis=1)


def build_searchers(
    ds: Dataset, shards: int, node_nlists: dict[int, tuple[int, int]]
) -> tuple[list[Searcher], dict[str, Any]]:
    xb = normalise(ds.base)
    info: dict[str, Any] = {}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    out: list[Searcher] = []

    nlist = max(1, int(round(4 * math.sqrt(ds.n))))
    t0 = time.perf_counter()
    single = train_ivf(xb, nlist)
    info["single"] = {"nlist": nlist, "train_add_s": time.perf_counter() - t0}
    log(f"FAISS single IVFFlat nlist={nlist} built in {info['single']['train_add_s']:.1f}s")
    out.append(Searcher(f"FAISS 1×IVF{nlist}", [(single, np.arange(ds.n, dtype=np.int64))]))

    owner = np.fromiter((shard_of(str(i), shards) for i in range(ds.n)), np.int64, ds.n)
    rows = [np.flatnonzero(owner == s) for s in range(shards)]
    t0 = time.perf_counter()
    parts = []
    for r in rows:
        nl = max(1, min(int(round(4 * math.sqrt(len(r)))), len(r) // 8))
        parts.append((train_ivf(xb[r], nl), r.astype(np.int64)))
    per = Searcher(f"FAISS {shards}×IVF~{parts[0][0].nlist} merged", parts)
    info["per_shard"] = {"nlists": per.nlists, "train_add_s": time.perf_counter() - t0}
    log(
        f"FAISS per-shard {shards}×IVF nlists={per.nlists} built in {info['per_shard']['train_add_s']:.1f}s"
    )
    out.append(per)

    # The node trains one index over its local shards when they reach train_min vectors, and
    # again only after 4× growth: its nlist may be smaller than 4·√n and trained on a prefix.
    if 0 in node_nlists and node_nlists[0][0] != nlist:
        nl, trained_on = node_nlists[0]
        t0 = time.perf_counter()
        idx = new_ivf(ds.dim, nl)
        prefix = xb[: trained_on if 0 < trained_on <= ds.n else ds.n]
        idx.train(prefix[: 256 * nl] if len(prefix) > 256 * nl else prefix)
        idx.add(xb)
        info["node_like"] = {
            "nlist": nl,
            "trained_on": trained_on,
            "train_add_s": time.perf_counter() - t0,
        }
        log(f"FAISS node-like 1×IVF{nl} (trained on {trained_on}) built")
        out.append(
            Searcher(f"FAISS 1×IVF{nl} (node's nlist)", [(idx, np.arange(ds.n, dtype=np.int64))])
        )
    return out, info


def faiss_points(
    searcher: Searcher, ds: Dataset, nprobes: list[int], n_queries: int, threads: int
) -> list[dict[str, Any]]:
    xq = normalise(ds.queries[:n_queries])
    gt = ds.gt[:n_queries]
    results = []
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, initializer=_single_threaded_faiss) as pool:
        list(pool.map(lambda i: searcher.search(xq[i : i + 1], 8), range(min(64, n_queries))))
        for p in nprobes:
            searcher.search(xq[: min(100, n_queries)], p)  # warm-up
            batched_s = float("inf")
            for _ in range(3):  # best of 3: the machine is small and shared
                t0 = time.perf_counter()
                found = searcher.search(xq, p)
                batched_s = min(batched_s, time.perf_counter() - t0)
            rec = recall_at_k(found, gt)

            def one(i: int, p: int = p) -> np.ndarray:
                return searcher.search(xq[i : i + 1], p)[0]

            cpu0 = time.process_time()
            t0 = time.perf_counter()
            singles = list(pool.map(one, range(n_queries), chunksize=1))
            threaded_s = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            results.append(
                {
                    "index": searcher.name,
                    "nprobe": p,
                    "recall": rec,
                    "recall_threads": recall_at_k(singles, gt),
                    "qps_batched": n_queries / batched_s,
                    "qps_threads": n_queries / threaded_s,
                    "threads": threads,
                    "threads_cpu_s": cpu,
                }
            )
            log(
                f"  {searcher.name} nprobe={p}: recall {rec:.4f}, batched "
                f"{n_queries / batched_s:,.0f} q/s, {threads} threads {n_queries / threaded_s:,.0f} q/s"
            )
    return results
