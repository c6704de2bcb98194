#!/usr/bin/env python3
"""The engine's fixed cost per search, in-process (no HTTP): `Collection.search` per query
against FAISS `index.search` alone on the same index, one caller and 8 concurrent callers,
and the blocking part (`run_batch`) split into the FAISS call and turning keys into hits.

    python scripts/bench_engine.py --limit 50000 --nprobe 1 32
    python scripts/bench_engine.py --limit 50000 --nprobe 64 --batch 100 --spin 15 [--freeze]

Figures are µs of wall time per query and µs of process CPU per query (the machine may be
shared: the references are measured in the same run, interleaved).
"""
# ruff: noqa: B023  (the timed closures run within their loop iteration)

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import orjson
from bench_data import DEFAULT_DATA, load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aquila.cluster.model.documents import Incoming, hit_json  # noqa: E402
from aquila.cluster.model.sharding import shard_of  # noqa: E402
from aquila.cluster.model.spec import CollectionSpec, IndexSpec  # noqa: E402
from aquila.node import collector  # noqa: E402
from aquila.node.blocking import Blocking  # noqa: E402
from aquila.node.storage.collection import Tuning  # noqa: E402
from aquila.node.storage.engine import Engine  # noqa: E402
from aquila.node.storage.index import prepare  # noqa: E402
from aquila.node.storage.search import candidates, resolve  # noqa: E402


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """(wall µs, CPU µs) per unit of what fn returns it did."""
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    return (time.perf_counter() - w0) / n * 1e6, (time.process_time() - c0) / n * 1e6


async def atimed(coro: Callable[[], object], n: int) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    await coro()  # type: ignore[misc]
    return (time.perf_counter() - w0) / n * 1e6, (time.process_time() - c0) / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/wordnet-minilm-384") if not DEFAULT_DATA.exists() else DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=50000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1, help="query vectors per search")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--synthetic", type=int, default=0)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--spin", type=float, default=0.0,
                    help="only run 8 callers at the first nprobe this many seconds (to profile), "
                    "then say what the garbage collector took")
    ap.add_argument("--freeze", action="store_true",
                    help="with --spin: the objects made before it frozen out of the garbage "
                    "collector's sight first (gc.freeze, as a node does once ready)")
    args = ap.parse_args()
    ds = load_dataset(args)
    blocking = Blocking()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Path(tmp), blocking, Tuning(), fsync=False)
        await engine.start()
        spec = CollectionSpec("c", ds.dim, "cosine", args.shards, 1, IndexSpec("ivf_flat"))
        coll = await engine.ensure(spec, range(args.shards), "u")
        for lo in range(0, ds.n, 5000):
            by: dict[int, list[Incoming]] = {}
            for i in range(lo, min(ds.n, lo + 5000)):
                meta = orjson.dumps(ds.metadata[i] if ds.metadata else {})
                by.setdefault(shard_of(str(i), args.shards), []).append(
                    Incoming(str(i), ds.base[i], meta, 1, "n"))
            await coll.write(by)
        t0 = time.monotonic()
        while coll.state != "trained" or coll.training:
            if time.monotonic() - t0 > 600:
                raise SystemExit("index did not train")
            await asyncio.sleep(0.5)
        while True:  # retraining and compaction after the ingest: wait them out
            c0 = time.process_time()
            await asyncio.sleep(2)
            if time.process_time() - c0 < 0.1 and not coll.training:
                break
        per = args.batch
        qs = [prepare(ds.queries[i : i + per], "cosine") for i in range(0, args.queries, per)]
        nq = sum(len(q) for q in qs)
        faiss.omp_set_num_threads(1)
        if args.spin:
            print(f"spinning pid {os.getpid()}", flush=True)
            end = time.monotonic() + args.spin

            async def spin() -> None:
                i = 0
                while time.monotonic() < end:
                    i += 1
                    await coll.search(qs[i % len(qs)], args.k, args.nprobe[0])

            # What Python's garbage collector took meanwhile, by generation, timed as a node
            # times it (with --freeze the objects made so far out of its sight first, as a
            # node does once ready).
            if args.freeze:
                collector.freeze()
            collector.watch()
            before = collector.figures()
            c0 = time.process_time()
            await asyncio.gather(*(spin() for _ in range(8)))
            cpu = time.process_time() - c0
            after = collector.figures()
            runs = [a - b for a, b in zip(after["collections"], before["collections"],
                                          strict=True)]
            spent = [a - b for a, b in zip(after["seconds"], before["seconds"], strict=True)]
            print(f"CPU {cpu:.2f} s; objects frozen {after['frozen']:,}; garbage "
                  f"collector {sum(spent) / cpu:.2%} of it: " + ", ".join(
                      f"generation {g} {n} runs, {spent[g] / max(1, n) * 1e3:.2f} ms each"
                      for g, n in enumerate(runs)))
            await engine.close()
            blocking.close()
            return
        print(f"n={ds.n} nlist={coll.index.nlist} k={args.k} queries={args.queries} "
              f"batch={per}")
        for nprobe in args.nprobe:
            want = candidates(coll, args.k)

            def faiss_only() -> int:
                for q in qs:
                    coll.index.search(q, want, nprobe)
                return nq

            def faiss_raw() -> int:
                params = faiss.SearchParametersIVF(nprobe=nprobe)
                for q in qs:
                    coll.index.index.search(q, want, params=params)
                return nq

            def resolve_only() -> int:
                for q in qs:
                    d, keys = coll.index.search(q, want, nprobe)
                    resolve(coll, d, keys, False)
                return nq

            from aquila.node.storage.index import LABEL_BITS
            from aquila.node.storage.store import doc_key, label_key

            lkeys, dkeys = [], []
            for q in qs:
                _, keys = coll.index.search(q, want, nprobe)
                ks = [int(x) for x in keys.reshape(-1) if x >= 0]
                lk = [label_key(x >> LABEL_BITS, x & ((1 << LABEL_BITS) - 1)) for x in ks]
                ids = coll.store.raw_records(lk)
                lkeys.append(lk)
                dkeys.append([doc_key(x >> LABEL_BITS, "") + i
                              for x, i in zip(ks, ids, strict=True) if i is not None])

            def label_gets() -> int:
                for lk in lkeys:
                    coll.store.raw_records(lk)
                return nq

            def record_gets() -> int:
                for dk in dkeys:
                    coll.store.raw_records(dk)
                return nq

            def single_gets() -> int:
                get = coll.store.db.get
                for dk in dkeys:
                    for key in dk:
                        get(key)
                return nq

            answers = [resolve(coll, *coll.index.search(q, want, nprobe), False) for q in qs]

            def answer_json() -> int:
                # The REST answer of each search's hits (metadata included, no vectors).
                for rows in answers:
                    orjson.dumps({"results": [[hit_json(h, True, False) for h in row]
                                              for row in rows]})
                return nq

            async def one_caller() -> None:
                for q in qs:
                    await coll.search(q, args.k, nprobe)

            async def one_caller_unsplit() -> None:
                # A request's batch on one search thread (not split over the threads).
                from aquila.node.storage import collection as cmod

                split, cmod.SPLIT_ROWS = cmod.SPLIT_ROWS, 1 << 30
                try:
                    await one_caller()
                finally:
                    cmod.SPLIT_ROWS = split

            async def eight() -> None:
                it = iter(qs)

                async def worker() -> None:
                    for q in it:
                        await coll.search(q, args.k, nprobe)

                await asyncio.gather(*(worker() for _ in range(8)))

            async def faiss_threads() -> None:
                # FAISS alone through the same search pool, 8 callers: the thread hop's cost
                it = iter(qs)

                async def worker() -> None:
                    for q in it:
                        await blocking.search(coll.index.search, q, want, nprobe)

                await asyncio.gather(*(worker() for _ in range(8)))

            if os.environ.get("BENCH_CPROFILE"):
                import cProfile
                import pstats
                pr = cProfile.Profile()
                pr.enable()
                resolve_only()
                pr.disable()
                pstats.Stats(pr).sort_stats("tottime").print_stats(12)
            rows: dict[str, list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                rows.setdefault("faiss index.search raw", []).append(timed(faiss_raw))
                rows.setdefault("VectorIndex.search", []).append(timed(faiss_only))
                rows.setdefault("  + resolve (sync)", []).append(timed(resolve_only))
                rows.setdefault("  multi_get k label keys", []).append(timed(label_gets))
                rows.setdefault("  multi_get k records", []).append(timed(record_gets))
                rows.setdefault("  k single gets of records", []).append(timed(single_gets))
                rows.setdefault("  hits -> REST answer JSON", []).append(timed(answer_json))
                rows.setdefault("Collection.search 1 caller", []).append(
                    await atimed(one_caller, nq))
                rows.setdefault("Collection.search 1 caller, unsplit", []).append(
                    await atimed(one_caller_unsplit, nq))
                rows.setdefault("Collection.search 8 callers", []).append(
                    await atimed(eight, nq))
                rows.setdefault("VectorIndex.search via pool, 8", []).append(
                    await atimed(faiss_threads, nq))
            print(f"\nnprobe {nprobe}: µs per query, best of {args.rounds} (wall / CPU)")
            for name, vals in rows.items():
                w = min(v[0] for v in vals)
                c = min(v[1] for v in vals)
                print(f"  {name:34s} {w:8.1f} {c:8.1f}")
        await engine.close()
    blocking.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
