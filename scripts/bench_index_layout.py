"""What the index's layout on a node costs a query: FAISS alone, in this process, on the shared
WordNet set, one thread, one query a call (as a REST search runs it), recall@10 against the
shipped ground truth, at several nprobe.

    python scripts/bench_index_layout.py [--data DIR] [--queries 1000] [--shards 8]

Layouts:
- `per-shard`: what a node does today, one IVF index per shard (nlist 4·√(shard's n)), every
  shard searched at the same nprobe, the shards' hits merged;
- `shared-quantizer`: one coarse quantizer for the node (nlist 4·√n) and per shard only its
  inverted lists: the query's lists are found once, then each shard's lists are scanned
  (`search_preassigned`), so the vectors scanned are those of one index;
- `one-index`: a single IVF index over the node's vectors, the bound the other two approach;
- and one index with compressed codes re-ranked by the exact vectors (`ivf_sq8`, 4× the hits;
  4-bit PQ with SIMD fast scan, 10× the hits).

It measures the index alone: no store reads, no HTTP. What it shows is how much of a query's
FAISS time the per-shard layout adds at equal recall.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import faiss
import numpy as np
from bench_common import K
from bench_data import DEFAULT_DATA, load_real, missing_data_message, normalise

NPROBES = (4, 8, 16, 32, 64)
Search = Callable[[np.ndarray, int], np.ndarray]  # one query, nprobe -> ids of the best K


def ivf(kind: str, dim: int, nlist: int, quantizer: faiss.Index) -> faiss.IndexIVF:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
    if kind == "sq8":
        return faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist,
                                             faiss.ScalarQuantizer.QT_8bit, ip)
    return faiss.IndexIVFPQFastScan(quantizer, dim, nlist, dim // 4, 4, ip)


def train_sample(base: np.ndarray, nlist: int) -> np.ndarray:
    n = min(len(base), max(nlist * 40, 20_000))
    return base[np.random.default_rng(0).choice(len(base), n, replace=False)]


def per_shard(base: np.ndarray, shard: np.ndarray, shards: int) -> Search:
    indexes = []
    for s in range(shards):
        rows = np.flatnonzero(shard == s)
        nlist = int(4 * np.sqrt(len(rows)))
        index = ivf("flat", base.shape[1], nlist, faiss.IndexFlatIP(base.shape[1]))
        index.train(train_sample(base[rows], nlist))
        index.add_with_ids(base[rows], rows.astype(np.int64))
        indexes.append(index)

    def search(q: np.ndarray, nprobe: int) -> np.ndarray:
        scores, ids = [], []
        for index in indexes:
            index.nprobe = nprobe
            d, i = index.search(q, K)
            scores.append(d[0])
            ids.append(i[0])
        d_all, i_all = np.concatenate(scores), np.concatenate(ids)
        return i_all[np.argsort(-d_all, kind="stable")[:K]]

    return search


def shared_quantizer(base: np.ndarray, shard: np.ndarray, shards: int) -> Search:
    dim = base.shape[1]
    nlist = int(4 * np.sqrt(len(base)))
    quantizer = faiss.IndexFlatIP(dim)
    first = ivf("flat", dim, nlist, quantizer)
    first.train(train_sample(base, nlist))
    indexes = []
    for s in range(shards):
        rows = np.flatnonzero(shard == s)
        index = first if s == 0 else ivf("flat", dim, nlist, quantizer)
        index.is_trained = True
        index.add_with_ids(base[rows], rows.astype(np.int64))
        indexes.append(index)

    def search(q: np.ndarray, nprobe: int) -> np.ndarray:
        dq, iq = quantizer.search(q, nprobe)
        scores, ids = [], []
        for index in indexes:
            index.nprobe = nprobe
            d, i = index.search_preassigned(q, K, iq, dq)
            scores.append(d[0])
            ids.append(i[0])
        d_all, i_all = np.concatenate(scores), np.concatenate(ids)
        return i_all[np.argsort(-d_all, kind="stable")[:K]]

    return search


def one_index(base: np.ndarray, kind: str, oversample: int) -> Search:
    dim = base.shape[1]
    nlist = int(4 * np.sqrt(len(base)))
    index = ivf(kind, dim, nlist, faiss.IndexFlatIP(dim))
    index.train(train_sample(base, nlist))
    index.add(base)

    def search(q: np.ndarray, nprobe: int) -> np.ndarray:
        index.nprobe = nprobe
        _, i = index.search(q, K * oversample)
        found = i[0][i[0] >= 0]
        if oversample == 1:
            return found
        exact = base[found] @ q[0]  # re-ranked with the exact vectors
        return found[np.argsort(-exact, kind="stable")[:K]]

    return search


def measure(search: Search, queries: np.ndarray, gt: np.ndarray, nprobe: int
            ) -> tuple[float, float]:
    found = []
    t0 = time.perf_counter()
    for i in range(len(queries)):
        found.append(search(queries[i:i + 1], nprobe))
    us = (time.perf_counter() - t0) / len(queries) * 1e6
    recall = float(np.mean([len(set(f.tolist()) & set(g.tolist())) / K
                            for f, g in zip(found, gt, strict=True)]))
    return recall, us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=str, default=str(DEFAULT_DATA))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()
    from pathlib import Path
    if not (Path(args.data) / "base.f16.npy").exists():
        raise SystemExit(missing_data_message(Path(args.data)))
    data = load_real(Path(args.data), None, args.queries)
    base, queries = normalise(data.base), normalise(data.queries)
    faiss.omp_set_num_threads(1)
    shard = np.random.default_rng(1).integers(0, args.shards, len(base))
    layouts: list[tuple[str, Search]] = [
        (f"per-shard ({args.shards} IVF flat)", per_shard(base, shard, args.shards)),
        ("shared-quantizer (flat)", shared_quantizer(base, shard, args.shards)),
        ("one-index flat", one_index(base, "flat", 1)),
        ("one-index sq8, re-ranked 4x", one_index(base, "sq8", 4)),
        ("one-index pq4 fast scan, re-ranked 10x", one_index(base, "pq4fs", 10)),
    ]
    print(f"{len(base)} x {base.shape[1]}, {len(queries)} queries, one thread, µs per query "
          "(recall@10); ratio: µs against per-shard at the same nprobe")
    baseline: dict[int, float] = {}
    for name, search in layouts:
        cells = []
        for nprobe in NPROBES:
            recall, us = measure(search, queries, data.gt, nprobe)
            baseline.setdefault(nprobe, us)
            cells.append(f"{us:7.0f} ({recall:.3f}) {us / baseline[nprobe]:.2f}x")
        print(f"{name:40s} " + " | ".join(f"nprobe {p}: {c}" for p, c in
                                          zip(NPROBES, cells, strict=True)), flush=True)


if __name__ == "__main__":
    main()
