#!/usr/bin/env python3
"""A coordinator's own part of a search after the index answered, in process: every local hit
read then merged with two peers' answers (`resolve` + `merge_rows`, the old path) against the
hits found, merged, and only the survivors read (`found_rows` + `merge_found` +
`Collection.read_found`). The index's answers are computed once beforehand: only what differs
is timed, one query a search, in alternate rounds; medians.

    python scripts/bench_found.py --data /work/shared/data/wordnet-minilm-384 --docs 16000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from aquila.cluster.model.documents import Found, Hit, Incoming
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.cluster.replication.fanout import merge_found, merge_rows
from aquila.node.blocking import Blocking
from aquila.node.storage import search
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import prepare

SHARDS = 8
K = 10


async def run(args: argparse.Namespace) -> None:
    base = np.load(args.data / "base.f16.npy")[: args.docs].astype(np.float32)
    rng = np.random.default_rng(0)
    blocking = Blocking(2)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Path(tmp), blocking, Tuning(), fsync=False)
        await engine.start()
        try:
            spec = CollectionSpec("c", base.shape[1], "cosine", SHARDS, 1, IndexSpec("flat"))
            coll = await engine.ensure(spec, range(SHARDS), "u")
            for i0 in range(0, len(base), 2000):
                by: dict[int, list[Incoming]] = {}
                for i in range(i0, min(i0 + 2000, len(base))):
                    by.setdefault(shard_of(str(i), SHARDS), []).append(
                        Incoming(str(i), base[i], b'{"word":"entry %d"}' % i, 1, "n"))
                await coll.write(by)
            qs = base[rng.integers(0, len(base), args.queries)] + 0.05
            answers = [coll.index.search(prepare(qs[i : i + 1], "cosine"), K, 1)
                       for i in range(args.queries)]
            peers: list[tuple[list[list[Hit]], list[list[Hit]]]] = []
            for d, _ in answers:  # two peers whose hits are as good as the local ones
                scores = sorted(rng.uniform(float(d.min()), float(d.max()) + 0.02, 2 * K)
                                .tolist(), reverse=True)
                peers.append(([[Hit(f"p{j}", s, b"{}", b"", 98)
                                for j, s in enumerate(scores[::2])]],
                              [[Hit(f"q{j}", s, b"{}", b"", 99)
                                for j, s in enumerate(scores[1::2])]]))

            async def read(found: Found, keys: list[int]) -> list[Hit | None]:
                return await coll.read_found(found, keys, False)

            old_us: list[float] = []
            new_us: list[float] = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                for (d, keys), (p1, p2) in zip(answers, peers, strict=True):
                    merge_rows([p1, search.resolve(coll, d, keys, False), p2], 1, K, True)
                old_us.append((time.perf_counter() - t) / args.queries * 1e6)
                t = time.perf_counter()
                for (d, keys), (p1, p2) in zip(answers, peers, strict=True):
                    rows = search.found_rows(coll, d, keys)
                    found = Found([r[0] for r in rows], [r[1] for r in rows],
                                  [r[2] for r in rows], (coll, coll.relabelled))
                    await merge_found([p1, found, p2], 1, K, True, read)
                new_us.append((time.perf_counter() - t) / args.queries * 1e6)
            print(f"every local hit read, then merged: {statistics.median(old_us):.1f} µs a "
                  f"search; found, merged, survivors read: {statistics.median(new_us):.1f} µs "
                  f"({args.rounds} rounds of {args.queries})")
        finally:
            await engine.close()
            blocking.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--docs", type=int, default=16_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--rounds", type=int, default=9)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
