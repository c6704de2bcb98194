"""Recall@10 per index type at several nprobe, with and without re-ranking, and the index's
bytes per vector, on the shared WordNet set: the node's own storage (`Engine`, RocksDB and
FAISS as a node runs them, fsync off) in this process, no HTTP.

    python scripts/bench_rerank.py [--data DIR] [--limit N] [--queries 1000]

Re-ranking: a compressed index (ivf_sq8, ivf_pq) is asked for more candidates than k, which
are scored again with their stored vectors (`node.storage.search`); "codes only" switches it
off by emptying `search.OVERSAMPLE` for the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import K, log
from bench_data import DEFAULT_DATA, load_real, missing_data_message

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage import search
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine

SHARDS = 8
NPROBES = (4, 8, 16, 32, 64)
TYPES = ("ivf_flat", "ivf_sq8", "ivf_pq")


def recall(rows: list[list[str]], gt: np.ndarray) -> float:
    return float(np.mean([len({int(i) for i in r[:K]} & set(g[:K].tolist())) / K
                          for r, g in zip(rows, gt, strict=True)]))


async def measure(root: Path, itype: str, base: np.ndarray, queries: np.ndarray,
                  gt: np.ndarray) -> dict[str, object]:
    blocking = Blocking(2)
    engine = Engine(root, blocking, Tuning(), fsync=False)
    await engine.start()
    spec = CollectionSpec("c", base.shape[1], "cosine", SHARDS, 1, IndexSpec(itype))
    coll: Collection = await engine.ensure(spec, range(SHARDS), "u")
    t0 = time.perf_counter()
    for lo in range(0, len(base), 5000):
        by: dict[int, list[Incoming]] = {}
        for i in range(lo, min(lo + 5000, len(base))):
            by.setdefault(shard_of(str(i), SHARDS), []).append(
                Incoming(str(i), base[i], b"{}", 1, "bench"))
        await coll.write(by)
    for _ in range(3000):  # the background training, polled for up to 10 minutes
        if coll.state == "trained" and coll.index.trained_at >= len(base):
            break
        await asyncio.sleep(0.2)
    else:
        raise SystemExit(f"{itype}: not trained after 10 minutes")
    log(f"{itype}: loaded and trained in {time.perf_counter() - t0:.1f} s "
        f"(nlist {coll.index.nlist})")
    out: dict[str, object] = {"type": itype, "nlist": coll.index.nlist,
                              "bytes_per_vector": coll.index.memory_bytes() / len(base)}
    saved = dict(search.OVERSAMPLE)
    for label, oversample in (("reranked", saved), ("codes only", {})):
        search.OVERSAMPLE.clear()
        search.OVERSAMPLE.update(oversample)
        figures = {}
        for nprobe in NPROBES:
            rows = await coll.search(queries, K, nprobe)
            figures[nprobe] = recall([[h.id for h in row] for row in rows], gt)
        out[label] = figures
    search.OVERSAMPLE.update(saved)
    await engine.close()
    blocking.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=None, help="only the first N base vectors")
    p.add_argument("--queries", type=int, default=1000)
    args = p.parse_args()
    if not (args.data / "base.f16.npy").exists():
        sys.exit(missing_data_message(args.data))
    ds = load_real(args.data, args.limit, args.queries)
    results = []
    with tempfile.TemporaryDirectory(prefix="aquila-rerank-") as tmp:
        for itype in TYPES:
            results.append(asyncio.run(measure(Path(tmp) / itype, itype, ds.base, ds.queries,
                                               ds.gt)))
    head = " | ".join(f"nprobe {n}" for n in NPROBES)
    print(f"\n{ds.n:,} vectors of dim {ds.dim}, {len(ds.queries)} queries, recall@{K}\n")
    print(f"| index | nlist | index bytes/vector | | {head} |")
    print("|---|---:|---:|---|" + "---:|" * len(NPROBES))
    for r in results:
        for label in ("reranked", "codes only"):
            figs = r[label]
            assert isinstance(figs, dict)
            cells = " | ".join(f"{figs[n]:.3f}" for n in NPROBES)
            print(f"| {r['type']} | {r['nlist']} | {r['bytes_per_vector']:.0f} | {label} | "
                  f"{cells} |")


if __name__ == "__main__":
    main()
