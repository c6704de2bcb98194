"""What the index's codes cost a query at a given recall: FAISS alone, in this process, on the
shared WordNet set, one thread, one query a call (as a REST search runs it), recall@10 against
the shipped ground truth, at several nprobe.

    python scripts/bench_index_layout.py [--data DIR] [--queries 1000]

A node holds one IVF index per collection over all its local shards (nlist 4·√n). Measured
here on that layout:
- `ivf_flat`: the exact vectors in the lists (the node's `ivf_flat`);
- `ivf_sq8`, 4× the hits re-ranked by the exact vectors (the node re-ranks from RocksDB; here
  from memory, so this is its bound);
- 4-bit PQ with SIMD fast scan (FAISS's `IndexIVFPQFastScan`, no index type of the node yet),
  10× the hits re-ranked by the exact vectors held in memory.

It measures the index alone: no store reads, no HTTP.
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
    args = ap.parse_args()
    from pathlib import Path
    if not (Path(args.data) / "base.f16.npy").exists():
        raise SystemExit(missing_data_message(Path(args.data)))
    data = load_real(Path(args.data), None, args.queries)
    base, queries = normalise(data.base), normalise(data.queries)
    faiss.omp_set_num_threads(1)
    layouts: list[tuple[str, Search]] = [
        ("ivf_flat", one_index(base, "flat", 1)),
        ("ivf_sq8, re-ranked 4x from memory", one_index(base, "sq8", 4)),
        ("4-bit PQ fast scan, re-ranked 10x", one_index(base, "pq4fs", 10)),
    ]
    print(f"{len(base)} x {base.shape[1]}, {len(queries)} queries, one thread, µs per query "
          "(recall@10); ratio: µs against ivf_flat at the same nprobe")
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
