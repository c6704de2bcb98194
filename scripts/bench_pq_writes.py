"""What ivf_pq's writes cost the index, before and after the fast scan: the node's
`VectorIndex` over FAISS's 8-bit `IndexIVFPQ` (plain lists, before) and over its 4-bit
`IndexIVFPQFastScan` (lists packed in blocks of 32, written by `node.storage.packed_lists`),
and `ivf_flat` beside them, in one process on the same vectors and lists: µs per vector to add
(in chunks of 5,000, as training streams them; one at a time, as a write), to remove (one at a
time, by 1,000, by all of a shard's), to read back (`vectors_of`), and the index's bytes per
vector (`memory_bytes`).

    nice -n 5 .venv/bin/python scripts/bench_pq_writes.py [--data DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_data import DEFAULT_DATA, load_real, missing_data_message

from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.storage.index import (
    LABEL_BITS,
    VectorIndex,
    choose_nlist,
    faiss,
    global_keys,
    prepare,
)

SHARDS = 8


def per(f: Callable[[], Any], count: int) -> float:
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) / max(1, count) * 1e6


def run(name: str, index: VectorIndex, x: np.ndarray, keys: np.ndarray,
        centroids: np.ndarray) -> None:
    index.index.quantizer.add(centroids)
    rng = np.random.default_rng(0)
    index.index.train(x[rng.choice(len(x), min(len(x), 64 * index.nlist), replace=False)])
    n = len(x)
    fig: dict[str, float] = {}

    def add_chunks() -> None:
        for lo in range(0, n - 1000, 5000):
            hi = min(lo + 5000, n - 1000)
            index.add(x[lo:hi], keys[lo:hi])

    fig["add by 5,000"] = per(add_chunks, n - 1000)
    fig["add 1 at a time"] = per(lambda: [index.add(x[i: i + 1], keys[i: i + 1])
                                          for i in range(n - 1000, n)], 1000)
    index.lists_of(0)
    order = rng.permutation(n)
    pick = keys[order[:1000]]
    fig["vectors_of by 1,000"] = per(lambda: index.vectors_of(pick), 1000)
    fig["remove 1 at a time"] = per(lambda: [index.remove(pick[i: i + 1])
                                             for i in range(1000)], 1000)
    batch = keys[order[1000:2000]]
    fig["remove by 1,000"] = per(lambda: index.remove(batch), 1000)
    shard = keys[(keys >> LABEL_BITS) == 3]
    held = index.ntotal
    fig["remove a shard's all"] = per(lambda: index.remove(shard), len(shard))
    assert index.ntotal == held - len(np.setdiff1d(shard, keys[order[:2000]]))
    bytes_per = index.memory_bytes() / max(1, index.ntotal)
    print(f"| {name} | {type(index.index).__name__} | "
          + " | ".join(f"{v:.2f}" for v in fig.values()) + f" | {bytes_per:.0f} |",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    if not (args.data / "base.f16.npy").exists():
        sys.exit(missing_data_message(args.data))
    ds = load_real(args.data, args.limit, 1)
    spec = CollectionSpec("c", ds.dim, "cosine", SHARDS, 1, IndexSpec("ivf_pq"))
    x = prepare(ds.base, spec.metric)
    n = len(x)
    labels = np.arange(n, dtype=np.int64)
    keys = global_keys(0, labels // SHARDS) + ((labels % SHARDS) << LABEL_BITS)
    nlist = choose_nlist(n, None)
    # One set of lists for all three (k-means once), so that they hold the same lists.
    km = faiss.Kmeans(ds.dim, nlist, niter=10, seed=1, spherical=False)
    rng = np.random.default_rng(1)
    km.train(x[rng.choice(n, min(n, 64 * nlist), replace=False)])
    print(f"{n:,} × {ds.dim} (cosine), {nlist} lists, {SHARDS} shards; µs per vector "
          "(per key) on one thread of this process\n")
    print("| index | FAISS type | add by 5,000 | add 1 at a time | vectors_of by 1,000 | "
          "remove 1 at a time | remove by 1,000 | remove a shard's all | bytes/vector |")
    print("|---|---|" + "---:|" * 7)
    faiss.omp_set_num_threads(1)
    flat = CollectionSpec("c", ds.dim, "cosine", SHARDS, 1, IndexSpec("ivf_flat"))
    run("ivf_flat", VectorIndex.new_ivf(flat, nlist, n), x, keys, km.centroids)
    run("ivf_pq before (8-bit)", VectorIndex.new_ivfpq8(spec, nlist, n), x, keys, km.centroids)
    run("ivf_pq (4-bit fast scan)", VectorIndex.new_ivf(spec, nlist, n), x, keys,
        km.centroids)


if __name__ == "__main__":
    main()
