"""The data set of a benchmark run: the real wordnet-minilm-384 set (or a prefix of it) or
seeded synthetic vectors, with ground truth, and recall@k against it."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import orjson
from bench_common import REPO_ROOT, K, log

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wordnet-minilm-384"


@dataclass
class Dataset:
    name: str
    base: np.ndarray  # n × d float32 (as stored; the node normalises for cosine)
    queries: np.ndarray  # nq × d float32
    gt: np.ndarray  # nq × K int64: row numbers into base (document id = str(row))
    metadata: list[dict[str, Any]]
    synthetic: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.base.shape[0])

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(x / norms)


def exact_topk(base_n: np.ndarray, queries_n: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k over unit vectors (= cosine) with FAISS flat."""
    index = faiss.IndexFlatIP(base_n.shape[1])
    index.add(base_n)
    _, ids = index.search(queries_n, k)
    return ids.astype(np.int64)


def missing_data_message(path: Path) -> str:
    return (
        f"dataset not found at {path}\n"
        "It is the wordnet-minilm-384 set (base.f16.npy 107,659×384, query.f16.npy 10,000×384,\n"
        "gt_I.npy, base.jsonl, query.jsonl). Either:\n"
        f"  * copy that directory to {DEFAULT_DATA} (the default), or pass --data DIR\n"
        "    pointing at a copy of it; or\n"
        "  * run on synthetic data instead: --synthetic N (seeded clustered vectors, ground\n"
        "    truth computed with FAISS flat; the figures are then synthetic), e.g.\n"
        "    python scripts/bench.py --synthetic 100000"
    )


def load_real(path: Path, n_limit: int | None, nq: int) -> Dataset:
    t0 = time.perf_counter()
    base16 = np.load(path / "base.f16.npy", mmap_mode="r")
    n_all = int(base16.shape[0])
    n = n_all if n_limit is None else min(n_limit, n_all)
    base = np.ascontiguousarray(base16[:n], dtype=np.float32)
    q16 = np.load(path / "query.f16.npy", mmap_mode="r")
    if nq > q16.shape[0]:
        raise SystemExit(f"--queries {nq} exceeds the {q16.shape[0]} queries of the dataset")
    queries = np.ascontiguousarray(q16[:nq], dtype=np.float32)
    notes: list[str] = []
    if n == n_all:
        gt = np.load(path / "gt_I.npy", mmap_mode="r")[:nq, :K].astype(np.int64)
        # Sanity: the shipped ground truth is cosine top-10 of the f16 vectors.
        m = min(100, nq)
        check = exact_topk(normalise(base), normalise(queries[:m]), K)
        agree = float(
            np.mean([len(set(a) & set(b)) / K for a, b in zip(check, gt[:m], strict=True)])
        )
        notes.append(f"gt_I[:, :10] agrees with exact cosine top-10 on {m} queries: {agree:.4f}")
    else:
        gt = exact_topk(normalise(base), normalise(queries), K)
        notes.append(f"subset of {n} base vectors: ground truth recomputed with FAISS flat (IP)")
    metadata: list[dict[str, Any]] = []
    with open(path / "base.jsonl", "rb") as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            metadata.append(orjson.loads(line))
    if len(metadata) != n:
        raise SystemExit(f"base.jsonl has {len(metadata)} lines, expected at least {n}")
    log(
        f"loaded {path.name}: {n}×{base.shape[1]} base, {nq} queries ({time.perf_counter() - t0:.1f}s)"
    )
    return Dataset(path.name, base, queries, gt, metadata, False, notes)


def make_synthetic(n: int, nq: int, dim: int, seed: int) -> Dataset:
    """Seeded clustered vectors: Gaussian blobs around random centres, queries drawn the same
    way; ground truth with FAISS flat on the normalised vectors (cosine)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(8, int(math.sqrt(n)))
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    spread = 0.6

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        c = rng.integers(0, n_clusters, count)
        x = centres[c] + spread * rng.standard_normal((count, dim)).astype(np.float32)
        return normalise(x), c

    base, cl = draw(n)
    queries, _ = draw(nq)
    gt = exact_topk(base, queries, K)
    metadata = [{"cluster": int(c), "row": i} for i, c in enumerate(cl)]
    log(
        f"generated synthetic data: {n}×{dim} base, {nq} queries, {n_clusters} clusters (seed {seed})"
    )
    return Dataset(
        f"synthetic-{n}x{dim}-seed{seed}",
        base,
        queries,
        gt,
        metadata,
        True,
        ["SYNTHETIC data: figures do not describe a real embedding set"],
    )


def load_dataset(args: argparse.Namespace) -> Dataset:
    if args.synthetic:
        return make_synthetic(args.synthetic, args.queries, args.dim, args.seed)
    data: Path = args.data
    needed = ["base.f16.npy", "query.f16.npy", "gt_I.npy", "base.jsonl"]
    if not all((data / f).exists() for f in needed):
        print(missing_data_message(data), file=sys.stderr)
        raise SystemExit(2)
    return load_real(data, args.limit, args.queries)


def recall_at_k(found: list[list[int]] | np.ndarray, gt: np.ndarray, k: int = K) -> float:
    total = 0
    for row, truth in zip(found, gt, strict=True):
        total += len(set(int(x) for x in list(row)[:k]) & set(int(t) for t in truth[:k]))
    return total / (k * len(gt))
