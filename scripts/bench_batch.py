"""Batches of query vectors in one request (`"vectors": [...]`, --query-batch per request)
against one node, beside in-process FAISS searching the same batches over an index of the
node's own nlist (trained like the node's: on the first vectors it saw) at the same nprobe.

The node searches a request's batch with one FAISS call on one of its search threads (FAISS
single-threaded there); requests in flight at once use the other threads. So the node is
measured with one request at a time and with as many as the machine has cores, and FAISS
single-threaded and with every core: node at c=1 against FAISS on 1 thread is the per-request
overhead (JSON in and out, records), node at c=cores against FAISS on every core the machine's
throughput.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import faiss
import numpy as np
import orjson
from bench_common import COLLECTION, JSON_HEADERS, OPT_NP, K, log
from bench_data import Dataset, normalise, recall_at_k
from bench_faiss import new_ivf

BATCH_SECONDS = 4.0  # measured per point (after one pass of warm-up)


def batch_bodies(ds: Dataset, nprobe: int, per: int) -> list[tuple[int, bytes]]:
    """(first query row, body) for each full batch of `per` queries."""
    out = []
    for start in range(0, len(ds.queries) - per + 1, per):
        body = {"vectors": ds.queries[start : start + per], "k": K, "nprobe": nprobe}
        out.append((start, orjson.dumps(body, option=OPT_NP)))
    return out


async def node_batches(
    session: aiohttp.ClientSession, url: str, ds: Dataset, nprobe: int, per: int,
    concurrency: int, server_cpu: Callable[[], float],
) -> dict[str, Any]:
    """Batch requests to one node for BATCH_SECONDS: queries/s, recall@10, CPU per query."""
    bodies = batch_bodies(ds, nprobe, per)
    if not bodies:
        raise ValueError(f"--queries must be at least --query-batch ({per})")
    target = f"{url}/v1/collections/{COLLECTION}/search"
    found: dict[int, list[list[int]]] = {}

    async def send(j: int) -> None:
        start, body = bodies[j % len(bodies)]
        async with session.post(target, data=body, headers=JSON_HEADERS) as r:
            raw = await r.read()
            if r.status != 200:
                raise RuntimeError(f"batch search -> {r.status}: {raw[:300]!r}")
        found[start] = [[int(h["id"]) for h in row] for row in orjson.loads(raw)["results"]]

    for j in range(len(bodies)):  # warm-up, and every batch's answer for the recall
        await send(j)
    seq = itertools.count()
    done = 0
    cpu0, t0 = server_cpu(), time.perf_counter()

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() - t0 < BATCH_SECONDS:
            await send(next(seq))
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu = server_cpu() - cpu0
    rows = [r for start in sorted(found) for r in found[start]]
    return {
        "per_request": per, "nprobe": nprobe, "concurrency": concurrency, "requests": done,
        "seconds": wall, "qps": done * per / wall, "requests_per_s": done / wall,
        "recall": recall_at_k(rows, ds.gt[: len(rows)]),
        "server_cpu_ms_per_query": cpu * 1000 / max(1, done * per),
    }


def faiss_batches(
    ds: Dataset, nlist: int, trained_on: int, nprobe: int, per: int
) -> dict[str, Any]:
    """In-process FAISS over an IVFFlat of the node's nlist, the same batches: queries/s on
    one thread and on every core (best of 3 passes each), and its recall@10."""
    xb = normalise(ds.base)
    index = new_ivf(ds.dim, nlist)
    prefix = xb[: trained_on if 0 < trained_on <= ds.n else ds.n]
    index.train(prefix[: 256 * nlist] if len(prefix) > 256 * nlist else prefix)
    index.add(xb)
    n = (len(ds.queries) // per) * per
    xq = normalise(ds.queries[:n])
    params = faiss.SearchParametersIVF(nprobe=min(nprobe, nlist))
    out: dict[str, Any] = {"nlist": nlist, "trained_on": trained_on, "nprobe": nprobe,
                           "per_request": per}
    for name, threads in (("qps_1_thread", 1), ("qps_all_cores", os.cpu_count() or 1)):
        faiss.omp_set_num_threads(threads)
        best = cpu = float("inf")
        labels = np.empty((0, K), np.int64)
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            labels = np.vstack([index.search(xq[s : s + per], K, params=params)[1]
                                for s in range(0, n, per)])
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
        out[name] = n / best
        # CPU per query: what the machine's other load does not change much (q/s it does).
        out[name.replace("qps", "cpu_ms_per_query")] = cpu * 1000 / n
        out["recall"] = recall_at_k(labels, ds.gt[:n])
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    log(f"  FAISS IVF{nlist} batches of {per}, nprobe={nprobe}: recall {out['recall']:.4f}, "
        f"{out['qps_1_thread']:,.0f} q/s on 1 thread, {out['qps_all_cores']:,.0f} q/s on "
        f"{os.cpu_count()} cores")
    return out
