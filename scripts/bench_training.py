#!/usr/bin/env python3
"""Training an IVF index at large nlist, in process (issue 14): the k-means the node runs
(flat, 64 sample points per list, 10 rounds) beside cheaper ones: two-level k-means
(`node.storage.training.two_level_centroids`), fewer sample points per list, fewer rounds;
and adding vectors with the flat coarse quantizer beside an HNSW one built over the same
centroids. Per variant: training seconds, add seconds per 1M vectors, recall@10 at nprobe
8/16/32 against exact search on held-out queries. Data: seeded clustered vectors as
scripts/bench_memory.py makes them.

    python scripts/bench_training.py --n 2000000 --nlist 4000,10000
    python scripts/bench_training.py --data /work/shared/data/wordnet-minilm-384 --nlist 1312
    python scripts/bench_training.py --n 6200000 --streamed ivf_sq8   # as a node retrains

The machine is shared: every figure is printed with `uptime`'s load."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from bench_memory import clustered

from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.storage.index import global_keys
from aquila.node.storage.training import train_streamed, two_level_centroids

K = 10
PROBES = (1, 2, 4, 8, 16, 32)


def load_avg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def new_ivf(d: int, nlist: int, niter: int) -> Any:
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    index.cp.min_points_per_centroid = 5
    index.cp.niter = niter  # as node.storage.index.new_ivf
    return index


def sample_of(x: np.ndarray, want: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return x[np.sort(rng.choice(len(x), min(want, len(x)), replace=False))]


def flat_train(x: np.ndarray, nlist: int, per_list: int, niter: int) -> Any:
    index = new_ivf(x.shape[1], nlist, niter)
    index.train(sample_of(x, per_list * nlist))
    return index


def two_level_train(x: np.ndarray, nlist: int, per_list: int, niter: int,
                    refine: int = 0, rounds: int = 1) -> Any:
    index = new_ivf(x.shape[1], nlist, niter)
    sample = sample_of(x, per_list * nlist)
    rows = np.random.default_rng(1).choice(len(sample), min(len(sample), refine * nlist),
                                           replace=False)
    index.quantizer.add(two_level_centroids(sample, nlist, index.cp, faiss.METRIC_L2,
                                            sample[rows] if refine else None, rounds))
    index.train(sample)  # the quantizer is trained: only what else the index needs
    return index


def add_flat(index: Any, x: np.ndarray) -> None:
    for lo in range(0, len(x), 65536):
        index.add(x[lo: lo + 65536])


def add_hnsw(index: Any, x: np.ndarray, ef: int = 64) -> None:
    """Assign with an HNSW graph over the centroids, then add at those lists."""
    cent = index.quantizer.reconstruct_n(0, index.nlist)
    graph = faiss.IndexHNSWFlat(index.d, 32)
    graph.hnsw.efConstruction = 80
    graph.add(cent)
    graph.hnsw.efSearch = ef
    for lo in range(0, len(x), 65536):
        part = np.ascontiguousarray(x[lo: lo + 65536])
        _, a = graph.search(part, 1)
        a = np.ascontiguousarray(a[:, 0])
        ids = np.arange(lo, lo + len(part), dtype=np.int64)
        index.add_core(len(part), faiss.swig_ptr(part), faiss.swig_ptr(ids),
                       faiss.swig_ptr(a))


def recall(index: Any, q: np.ndarray, truth: np.ndarray
           ) -> tuple[dict[int, float], dict[int, int]]:
    """recall@K per nprobe, and the vectors a query compares with (what a search costs:
    uneven lists cost more at the same nprobe)."""
    out, scanned = {}, {}
    stats = faiss.cvar.indexIVF_stats
    for p in PROBES:
        index.nprobe = p
        stats.reset()
        _, got = index.search(q, K)
        scanned[p] = int(stats.ndis / len(q))
        out[p] = round(float(np.mean([len(set(g) & set(t)) / K
                                      for g, t in zip(got, truth, strict=True)])), 4)
    return out, scanned


def run_variant(name: str, x: np.ndarray, q: np.ndarray, truth: np.ndarray, nlist: int,
                train: Callable[[], Any], add: Callable[[Any, np.ndarray], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    index = train()
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    add(index, x)
    t_add = time.perf_counter() - t0
    got = recall(index, q, truth)
    sizes = np.array([index.invlists.list_size(i) for i in range(index.nlist)])
    res = {"variant": name, "nlist": nlist, "train_s": round(t_train, 1),
           "add_s_per_M": round(t_add / (len(x) / 1e6), 1), "recall": got[0], "scanned": got[1],
           "largest_list": int(sizes.max()), "empty_lists": int((sizes == 0).sum()),
           "load": load_avg().split("load average: ")[1]}
    print(json.dumps(res), flush=True)
    return res


def streamed(x: np.ndarray, kind: str) -> None:
    """The node's whole training (`train_streamed`: sample pass, k-means, add pass with the
    calibration's exact answers) over x in the store's chunks, as the node's background
    thread runs it: one FAISS thread at nice 10."""
    os.nice(10)
    faiss.omp_set_num_threads(1)
    spec = CollectionSpec("c", x.shape[1], "l2", 1, 1, IndexSpec(kind))
    step = 65_536

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for lo in range(0, len(x), step):
            yield x[lo: lo + step], global_keys(0, np.arange(lo, min(lo + step, len(x))))

    t0 = time.perf_counter()
    index = train_streamed(spec, len(x), chunks)
    assert index is not None
    print(json.dumps({"streamed": kind, "n": len(x), "nlist": index.nlist,
                      "seconds": round(time.perf_counter() - t0, 1),
                      "curve": index.curve[:8],
                      "load": load_avg().split("load average: ")[1]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--nlist", default="4000,10000")
    p.add_argument("--variants", default="flat64,flat32,flat64-it5,2lvl64,2lvl64-hnsw")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--data", type=Path,
                   help="a dataset directory (base.f16.npy, query.f16.npy) instead of blobs")
    p.add_argument("--streamed", metavar="TYPE",
                   help="time the node's whole training of an index of this type instead")
    args = p.parse_args()
    if args.streamed:
        streamed(clustered(args.n, args.dim, args.seed), args.streamed)
        return
    faiss.omp_set_num_threads(args.threads)
    if args.data:  # unit vectors (cosine): l2 ranks them as inner product does
        x = np.ascontiguousarray(np.load(args.data / "base.f16.npy").astype(np.float32))
        q = np.ascontiguousarray(
            np.load(args.data / "query.f16.npy")[: args.queries].astype(np.float32))
    else:
        allx = clustered(args.n + args.queries, args.dim, args.seed)
        x, q = allx[: args.n], np.ascontiguousarray(allx[args.n:])
    _, truth = faiss.knn(q, x, K)
    print(load_avg(), flush=True)
    for nlist in (int(v) for v in args.nlist.split(",")):
        for v in args.variants.split(","):
            kind, _, rest = v.partition("-")
            per_list = int(kind.removeprefix("flat").removeprefix("2lvl"))
            niter = int(rest[2:]) if rest.startswith("it") else 10
            refine, _, times = rest[1:].partition("x") if rest.startswith("r") else ("0", "", "")
            rounds = int(times or 1)
            add = add_hnsw if rest == "hnsw" else add_flat
            if kind.startswith("flat"):
                def train(nl: int = nlist, pl: int = per_list, it: int = niter) -> Any:
                    return flat_train(x, nl, pl, it)
            else:
                def train(nl: int = nlist, pl: int = per_list, it: int = niter,
                          r: int = int(refine), rr: int = rounds) -> Any:
                    return two_level_train(x, nl, pl, it, r, rr)
            run_variant(v, x, q, truth, nlist, train, add)


if __name__ == "__main__":
    main()
