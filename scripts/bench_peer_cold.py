#!/usr/bin/env python3
"""What a peer's sub-search costs when other processes ran on its core since the last one.

A peer of a three-node cluster on this machine's two cores answers one sub-search for each
search a client sends. At one client the three nodes, wrk and the coordinator's FAISS take
turns on the cores between two of its sub-searches, and each finds the caches full of the
others' data. This measures one sub-search (`PeerService.search_frame`: the frame decoded,
FAISS, the hits' reads, the answer's frame) in process on a node's share of the data (the
documents of 3 of 8 shards, as on three nodes), timed alone on its thread, alternately
one right after the other (warm), then each after a sweep of `--sweep` MiB of other
memory (what another process's work does to the caches); and FAISS alone and the hits'
reads alone the same way. The first round warms everything up.

    python scripts/bench_peer_cold.py --limit 50000 --sweep 32
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import faiss
import numpy as np
import orjson
from bench_data import DEFAULT_DATA, load_dataset

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.hlc import HybridClock
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.cluster.replication import frames
from aquila.cluster.replication.remote import PeerService
from aquila.cluster.replication.replica import LocalReplica
from aquila.cluster.state.entries import ClusterState, CollectionEntry
from aquila.node.blocking import Blocking
from aquila.node.storage.backend import EngineBackend
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import prepare
from aquila.node.storage.search import resolve

SHARDS = 8
MINE = (0, 1, 2)  # a peer's share on three nodes
K = 10


async def timed(fn: Callable[[int], Awaitable[None]], n: int, sweep: np.ndarray | None
                ) -> tuple[float, float]:
    """Median CPU µs of fn(i) on this thread: n calls one after the other (warm), then n
    calls each after a sweep of `sweep` (cold)."""
    warm: list[int] = []
    cold: list[int] = []
    for i in range(n):
        t0 = time.thread_time_ns()
        await fn(i)
        warm.append(time.thread_time_ns() - t0)
    for i in range(n):
        if sweep is not None:
            sweep += 1.0
        t0 = time.thread_time_ns()
        await fn(i)
        cold.append(time.thread_time_ns() - t0)
    return float(np.median(warm)) / 1e3, float(np.median(cold)) / 1e3


async def run(args: argparse.Namespace) -> None:
    ds = load_dataset(args)
    faiss.omp_set_num_threads(1)
    blocking = Blocking()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Path(tmp), blocking, Tuning(), fsync=False)
        await engine.start()
        try:
            spec = CollectionSpec("c", ds.dim, "cosine", SHARDS, 1, IndexSpec("ivf_flat"))
            coll = await engine.ensure(spec, MINE, "u")
            by: dict[int, list[Incoming]] = {}
            for i in range(ds.n):
                s = shard_of(str(i), SHARDS)
                if s in MINE:
                    meta = orjson.dumps(ds.metadata[i] if ds.metadata else {})
                    by.setdefault(s, []).append(Incoming(str(i), ds.base[i], meta, 1, "n"))
            await coll.write(by)
            deadline = time.monotonic() + 600
            while coll.state != "trained" or coll.training:
                if time.monotonic() > deadline:
                    raise SystemExit("the index did not train")
                await asyncio.sleep(0.2)
            state = ClusterState()
            state.merge([CollectionEntry(
                spec, tuple(("a",) if s in MINE else ("b",) for s in range(SHARDS)), 1, "a",
                uid="u")])
            service = PeerService("a", LocalReplica("a", EngineBackend(engine), state), state,
                                  state.merge, HybridClock())
            n = min(args.searches, len(ds.queries))
            raws = [frames.encode_search(ds.queries[i : i + 1], K, args.nprobe, list(MINE),
                                         None, frames.WITH_METADATA) for i in range(n)]
            qs = [prepare(ds.queries[i : i + 1], "cosine") for i in range(n)]
            answers = [coll.index.search(q, K, args.nprobe) for q in qs]

            async def sub_search(i: int) -> None:
                await service.search_frame("c", raws[i])

            async def faiss_only(i: int) -> None:
                coll.index.search(qs[i], K, args.nprobe)

            async def reads_only(i: int) -> None:
                resolve(coll, *answers[i], False)

            sweep = np.ones(args.sweep * (1 << 20) // 8) if args.sweep else None
            print(f"{coll.index.ntotal:,} documents of {ds.n:,} (shards {MINE} of {SHARDS}), "
                  f"nlist {coll.index.nlist}, nprobe {args.nprobe}, k {K}; sweep "
                  f"{args.sweep} MiB; CPU µs a call, medians of {n}")
            for r in range(args.rounds):
                for name, fn in (("sub-search", sub_search), ("FAISS alone", faiss_only),
                                 ("hits' reads alone", reads_only)):
                    warm, cold = await timed(fn, n, sweep)
                    print(f"  round {r + 1} {name:18} warm {warm:7.1f}  after the sweep "
                          f"{cold:7.1f}  ({cold / warm:.2f}x)")
        finally:
            await engine.close()
            blocking.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--synthetic", type=int, default=0)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--searches", type=int, default=1000)
    p.add_argument("--sweep", type=int, default=32, help="MiB swept between cold calls (the "
                   "machine's last-level cache is 32 MiB here)")
    p.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
