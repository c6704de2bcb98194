"""Batches of query vectors in one request (`"vectors": [...]`, --query-batch per request)
against one node, beside in-process FAISS searching the same batches over an index of the
node's own nlist (trained like the node's: on the first vectors it saw) at the same nprobe.

The node searches a request's batch with one FAISS call on one of its search threads (FAISS
single-threaded there); requests in flight at once use the other threads. So the node is
measured with one request at a time and with as many as the machine has cores, and FAISS
single-threaded and with every core: node at c=1 against FAISS on 1 thread is the per-request
overhead (JSON in and out, records), node at c=cores against FAISS on every core the machine's
throughput.

Standalone (1 node, or N with batches sent to node 1 so the others serve its peer
sub-searches; rounds of FAISS and the node interleaved; --profile S runs py-spy on each node):

    python scripts/bench_batch.py --limit 50000 --nprobe 32 --per 100 [--nodes 3] [--profile 10]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import faiss
import numpy as np
import orjson
from bench_common import COLLECTION, JSON_HEADERS, OPT_NP, K, log
from bench_cpu_split import wait_idle
from bench_data import DEFAULT_DATA, Dataset, load_dataset, normalise, recall_at_k
from bench_faiss import new_ivf
from bench_load import create_collection, ingest_rr, wait_trained
from bench_local_cluster import LocalCluster, maybe_reexec_in_netns, new_session, node_env
from bench_node import call, thread_cpu_of
from bench_profile import profile_pids

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
    return faiss_timed(faiss_index(ds, nlist, trained_on), ds, nlist, trained_on, nprobe, per)


def faiss_index(ds: Dataset, nlist: int, trained_on: int) -> faiss.IndexIVFFlat:
    """An IVFFlat of the node's nlist, trained as the node's was (on the first vectors)."""
    xb = normalise(ds.base)
    index = new_ivf(ds.dim, nlist)
    prefix = xb[: trained_on if 0 < trained_on <= ds.n else ds.n]
    index.train(prefix[: 256 * nlist] if len(prefix) > 256 * nlist else prefix)
    index.add(xb)
    return index


def faiss_timed(index: faiss.IndexIVFFlat, ds: Dataset, nlist: int, trained_on: int,
                nprobe: int, per: int) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------
# Standalone: python scripts/bench_batch.py [--nodes N] [--profile S]
# ---------------------------------------------------------------------------------------
async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """N nodes (1 by default), filled and trained, idle; then rounds of: FAISS in-process on
    the same batches, then batches sent to node 1 (the coordinator; the others, if any, serve
    its peer sub-searches), c=1 and c=cores. CPU per query is per node (from /proc)."""
    ds = load_dataset(args)
    root = Path(tempfile.mkdtemp(prefix="aquila-bench-batch-"))
    cluster = LocalCluster(root, node_env(args.train_min))
    out: dict[str, Any] = {"rounds": [], "load": []}
    try:
        async with new_session(8) as session:
            await cluster.start(session, args.nodes)
            spec = {"dim": ds.dim, "metric": "cosine", "shards": args.shards, "replication": 1,
                    "index": {"type": "ivf_flat"}}
            await create_collection(session, cluster.urls[0], spec)
            await ingest_rr(session, cluster.urls, ds, 1000, 4, cluster.cpu_seconds)
            await wait_trained(session, cluster.nodes[0], ds.n, args.train_min)
            desc = await call(session, "GET",
                              f"{cluster.urls[0]}/v1/collections/{COLLECTION}")
            info = desc["shard_states"][0]["index"]
            nlist, trained_on = int(info["nlist"]), int(info.get("trained_at", 0))
            index = await asyncio.to_thread(faiss_index, ds, nlist, trained_on)
            idle = await wait_idle(cluster)
            log(f"{args.nodes} node(s) idle ({', '.join(f'{c:.3f}' for c in idle)} cores); "
                f"nlist {nlist}")
            url = cluster.urls[0]
            for r in range(args.rounds):
                load = os.getloadavg()[0]
                ref = await asyncio.to_thread(faiss_timed, index, ds, nlist, trained_on,
                                              args.nprobe, args.per)
                faiss_cpu = ref["cpu_ms_per_query_1_thread"]
                row: dict[str, Any] = {"faiss": ref, "load": load, "node": []}
                for c in dict.fromkeys([1, os.cpu_count() or 1]):
                    # Per node and kind of thread, at the start and at the end.
                    marks: list[list[dict[str, float]]] = []

                    def cpu(marks: list[list[dict[str, float]]] = marks) -> float:
                        marks.append([threads_cpu(p) for p in cluster.pids])
                        return sum(sum(m.values()) for m in marks[-1])

                    b = await node_batches(session, url, ds, args.nprobe, args.per, c, cpu)
                    n = max(1, b["requests"] * b["per_request"])
                    b["per_node_thread_cpu_ms"] = [
                        {t: (y.get(t, 0.0) - x.get(t, 0.0)) * 1000 / n for t in y}
                        for x, y in zip(marks[0], marks[1], strict=True)]
                    b["per_node_cpu_ms"] = [sum(t.values())
                                            for t in b["per_node_thread_cpu_ms"]]
                    b["faiss_cpu_per_node_cpu"] = faiss_cpu / b["server_cpu_ms_per_query"]
                    row["node"].append(b)
                    log(f"round {r + 1} c={c}: node {b['qps']:,.0f} q/s, recall "
                        f"{b['recall']:.4f}, CPU {b['server_cpu_ms_per_query']:.3f} ms/query "
                        f"(per node {', '.join(_threads(t) for t in b['per_node_thread_cpu_ms'])}); "
                        f"FAISS 1 thread {ref['qps_1_thread']:,.0f} q/s, CPU "
                        f"{faiss_cpu:.3f} ms/query: FAISS CPU / node CPU "
                        f"{b['faiss_cpu_per_node_cpu']:.2f}x (load {load:.1f})")
                out["rounds"].append(row)
            if args.profile > 0:
                pids = {f"n{i}": p for i, p in enumerate(cluster.pids, 1)}

                async def one_pass() -> None:
                    await node_batches(session, url, ds, args.nprobe, args.per, 1,
                                       cluster.cpu_seconds)

                prof = await profile_pids(pids, args.profile, root, one_pass)
                keep = (args.out or Path("bench-batch.json")).parent
                for name, summary in prof.items():
                    if not isinstance(summary, dict):  # {"error": why}: no profile
                        continue
                    kept = keep / f"pyspy-batch-{name}.txt"
                    shutil.copy(root / f"pyspy-{name}.txt", kept)
                    log(f"py-spy {name}: {summary['samples']} samples ({kept}); self:")
                    for f in summary["self"][:15]:
                        log(f"  {f['pct']:5.1f}%  {f['frame']}")
                out["profile"] = prof
    finally:
        await cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a node's event-loop thread and of all its other threads (searches
    above all; writes, background work and RocksDB's own threads are idle meanwhile)."""
    out = {"loop": 0.0, "threads": 0.0}
    for tid, sec in thread_cpu_of(pid).items():
        out["loop" if tid == pid else "threads"] += sec
    return out


def _threads(ms: dict[str, float]) -> str:
    return f"{sum(ms.values()):.3f} = loop {ms['loop']:.3f} + threads {ms['threads']:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=50_000)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--per", type=int, default=100, help="query vectors per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-min", type=int, default=2048)
    p.add_argument("--profile", type=float, default=0.0, help="py-spy every node this long")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    args.synthetic, args.queries, args.dim, args.seed = None, 1000, 384, 1234
    where = maybe_reexec_in_netns(Path(__file__), sys.argv[1:])
    log(f"network: {where}")
    res = asyncio.run(main_async(args))
    if args.out:
        args.out.write_text(orjson.dumps(res, option=OPT_NP | orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
