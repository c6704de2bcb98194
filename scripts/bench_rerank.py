"""Recall@10 per index type at several nprobe, with and without re-ranking, and the index's
bytes per vector, on the shared WordNet set: the node's own storage (`Engine`, RocksDB and
FAISS as a node runs them, fsync off) in this process, no HTTP.

    python scripts/bench_rerank.py [--data DIR] [--limit N] [--queries 1000]

Re-ranking: a compressed index (ivf_sq8, ivf_pq) is asked for more candidates than k, which
are scored again with their stored vectors (`node.storage.search`); "codes only" switches it
off by emptying `search.OVERSAMPLE` for the measurement.

With `--timed N`, also the cost of N single queries (one a call, as a REST search runs it) at
each nprobe, re-ranked: the index's search alone (`VectorIndex.search` for the candidates the
node asks for) and the collection's whole search (with the re-ranking's record reads), in µs
per query. `--types` picks the types; `ivf_pq8` is ivf_pq as the node made it before the fast
scan (FAISS's `IndexIVFPQ`, 8-bit codes), for a before/after in one run.

With `--base DIR` (a tree of node/ and cluster/: `git archive main node cluster | tar -x -C
DIR`), each type is measured again, right after, by that code in a subprocess (the same data,
queries and settings), and printed beside this code's: an A/B in one run.

    python scripts/bench_rerank.py --timed 300 --types ivf_flat,ivf_sq8,ivf_pq --base DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
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
from aquila.node.storage.index import VectorIndex, prepare
from aquila.node.storage.search import candidates

SHARDS = 8
NPROBES = (4, 8, 16, 32, 64)
TYPES = ("ivf_flat", "ivf_sq8", "ivf_pq")
OLD_PQ = "ivf_pq8"


def recall(rows: list[list[str]], gt: np.ndarray) -> float:
    return float(np.mean([len({int(i) for i in r[:K]} & set(g[:K].tolist())) / K
                          for r, g in zip(rows, gt, strict=True)]))


async def timed(coll: Collection, queries: np.ndarray, nprobe: int
                ) -> tuple[float, float, float]:
    """µs per single query: the index's search alone (for the candidates the node asks
    for), the collection's, and the collection's without re-ranking (codes only)."""
    want = candidates(coll, K)
    q = prepare(queries, coll.spec.metric)
    t0 = time.perf_counter()
    for i in range(len(q)):
        coll.index.search(q[i: i + 1], want, nprobe)
    t1 = time.perf_counter()
    for i in range(len(queries)):
        await coll.search(queries[i: i + 1], K, nprobe)
    t2 = time.perf_counter()
    saved = dict(search.OVERSAMPLE)
    search.OVERSAMPLE.clear()
    try:
        for i in range(len(queries)):
            await coll.search(queries[i: i + 1], K, nprobe)
    finally:
        search.OVERSAMPLE.update(saved)
    t3 = time.perf_counter()
    return ((t1 - t0) / len(q) * 1e6, (t2 - t1) / len(q) * 1e6, (t3 - t2) / len(q) * 1e6)


async def measure(root: Path, itype: str, base: np.ndarray, queries: np.ndarray,
                  gt: np.ndarray, n_timed: int = 0) -> dict[str, object]:
    blocking = Blocking(2)
    engine = Engine(root, blocking, Tuning(), fsync=False)
    await engine.start()
    spec = CollectionSpec("c", base.shape[1], "cosine", SHARDS, 1,
                          IndexSpec("ivf_pq" if itype == OLD_PQ else itype))
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
                              "bytes_per_vector": coll.index.memory_bytes() / len(base),
                              "faiss": type(coll.index.index).__name__}
    if n_timed:
        out["timed"] = {nprobe: await timed(coll, queries[:n_timed], nprobe)
                        for nprobe in NPROBES}
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
    p.add_argument("--types", default=",".join(TYPES),
                   help=f"comma-separated, of {', '.join((*TYPES, OLD_PQ))}")
    p.add_argument("--timed", type=int, default=0, metavar="N",
                   help="also time N single queries per type and nprobe")
    p.add_argument("--base", type=Path, default=None,
                   help="also measure each type with the code in this tree (node/, cluster/)")
    p.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)  # a base child
    args = p.parse_args()
    if not (args.data / "base.f16.npy").exists():
        sys.exit(missing_data_message(args.data))
    ds = load_real(args.data, args.limit, args.queries)
    results = []
    with tempfile.TemporaryDirectory(prefix="aquila-rerank-") as tmp:
        for itype in args.types.split(","):
            with contextlib.ExitStack() as stack:
                if itype == OLD_PQ:
                    saved = VectorIndex.__dict__["new_ivf"]
                    VectorIndex.new_ivf = staticmethod(VectorIndex.new_ivfpq8)  # type: ignore[method-assign]
                    stack.callback(setattr, VectorIndex, "new_ivf", saved)
                results.append(asyncio.run(measure(Path(tmp) / itype, itype, ds.base,
                                                   ds.queries, ds.gt, args.timed)))
            if args.base is not None:
                results.append(_base_run(args, itype, Path(tmp) / f"{itype}.json"))
    if args.json is not None:
        args.json.write_text(json.dumps(results))
        return
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
    timings = [r for r in results if "timed" in r]
    if timings:
        ref = timings[0]["timed"]
        assert isinstance(ref, dict)
        print(f"\n{args.timed} single queries, µs per query: the index's search alone (for "
              f"the candidates re-ranked) / the collection's whole search, re-ranked (x: "
              f"against {timings[0]['type']}'s at the same nprobe) / the collection's, codes "
              f"only\n")
        print(f"| index | FAISS type | {head} |")
        print("|---|---|" + "---:|" * len(NPROBES))
        for r in timings:
            t = r["timed"]
            assert isinstance(t, dict)
            cells = " | ".join(f"{t[n][0]:.0f} / {t[n][1]:.0f} ({t[n][1] / ref[n][1]:.2f}x) "
                               f"/ {t[n][2]:.0f}" for n in NPROBES)
            print(f"| {r['type']} | {r['faiss']} | {cells} |")


def _base_run(args: argparse.Namespace, itype: str, out: Path) -> dict[str, object]:
    """One type measured by the code in `args.base`, in a subprocess (this script, that
    `aquila`); its figures, named "<type> (base)"."""
    from bench_node import code_pythonpath

    here = Path(__file__).resolve().parent
    cmd = [sys.executable, str(Path(__file__).resolve()), "--data", str(args.data),
           "--queries", str(args.queries), "--types", itype, "--timed", str(args.timed),
           "--json", str(out)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    env = {**os.environ, "PYTHONPATH": f"{code_pythonpath(args.base.resolve())}:{here}"}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    got: dict[str, object] = json.loads(out.read_text())[0]
    for key in ("reranked", "codes only", "timed"):  # JSON keys are strings
        figs = got.get(key)
        if isinstance(figs, dict):
            got[key] = {int(n): v for n, v in figs.items()}
    got["type"] = f"{itype} (base)"
    return got


if __name__ == "__main__":
    main()
