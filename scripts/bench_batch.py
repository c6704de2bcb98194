"""Batches of query vectors in one request (`"vectors": [...]`, --query-batch per request)
against one node, beside in-process FAISS searching the same batches over an index of the
node's own nlist (trained like the node's: on the first vectors it saw) at the same nprobe.

The reference is FAISS in process on the node's own index (its snapshot, read with the
node's loader: the same centroids and lists; one node only), beside an IVFFlat trained apart
as the node trains (its recall is the one printed). Identical indexes in one process differ
by up to 10% in FAISS's CPU per query (where their lists lie in memory): compare medians of
rounds.

The node searches a request's batch with one FAISS call on one of its search threads (FAISS
single-threaded there); requests in flight at once use the other threads. So the node is
measured with one request at a time and with as many as the machine has cores, and FAISS
single-threaded and with every core: node at c=1 against FAISS on 1 thread is the per-request
overhead (JSON in and out, records), node at c=cores against FAISS on every core the machine's
throughput.

Standalone (1 node, or N with batches sent to node 1 so the others serve its peer
sub-searches; rounds of FAISS and the node interleaved; --profile S runs py-spy on each node):

    python scripts/bench_batch.py --limit 50000 --nprobe 32 --per 100 [--nodes 3] [--profile 10]

Against other code, both up at once and measured round by round, alternating (medians):

    git archive main node cluster | tar -x -C /tmp/base-batch
    python scripts/bench_batch.py --limit 50000 --nprobe 32 --per 100 --base /tmp/base-batch

or against other settings (--ab-env AQUILA_X=y, repeatable; with --base, that code's).
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
from statistics import median
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
from bench_local_cluster import (
    LocalCluster,
    maybe_reexec_in_netns,
    new_session,
    node_env,
)
from bench_node import Node, call, code_pythonpath, thread_cpu_of
from bench_profile import profile_pids
from bench_refs import parse_ints
from snapshot_index import snapshot_index
from wrkload import run_wrk, write_bodies

BATCH_SECONDS = 4.0  # measured per point (after one pass of warm-up)
SNAPSHOT_INTERVAL_S = 2.0  # the nodes' snapshot interval: the reference reads the snapshot
SNAPSHOT_WAIT_S = 120.0
FAISS_PASSES = 3  # timed passes over the batches per reference and thread count


def batch_bodies(ds: Dataset, nprobe: int, per: int) -> list[tuple[int, bytes]]:
    """(first query row, body) for each full batch of `per` queries."""
    out = []
    for start in range(0, len(ds.queries) - per + 1, per):
        body = {"vectors": ds.queries[start : start + per], "k": K, "nprobe": nprobe}
        out.append((start, orjson.dumps(body, option=OPT_NP)))
    return out


async def node_batches(
    session: aiohttp.ClientSession, url: str, ds: Dataset, nprobe: int, per: int,
    concurrency: int, server_cpu: Callable[[], float], loadgen: str = "python",
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Batch requests to one node for BATCH_SECONDS: queries/s, recall@10, CPU per query.
    Every batch is sent once first by a Python client, whose answers give the recall; the
    timed load then comes from that client (`loadgen` "python") or from wrk ("wrk": C,
    which reads no answer: the Python client's parse of 100 queries' hits took CPU from
    the two cores the node and the reference are measured on)."""
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
    rows = [r for start in sorted(found) for r in found[start]]
    recall = recall_at_k(rows, ds.gt[: len(rows)])
    if loadgen == "wrk":
        assert work_dir is not None
        body_file = work_dir / f"batches-{per}-{nprobe}.txt"
        if not body_file.exists():
            write_bodies(body_file, [b for _, b in bodies])
        cpu0 = server_cpu()
        res = await asyncio.to_thread(
            run_wrk, url, f"/v1/collections/{COLLECTION}/search", body_file,
            connections=concurrency, threads=min(2, concurrency), seconds=BATCH_SECONDS,
            timeout_s=60.0, work_dir=work_dir)
        cpu = server_cpu() - cpu0
        if res.non2xx or any(res.socket_errors.values()):
            raise RuntimeError(f"wrk: {res.non2xx} non-2xx answers, {res.socket_errors}")
        return {
            "per_request": per, "nprobe": nprobe, "concurrency": concurrency,
            "requests": res.requests, "seconds": res.seconds, "qps": res.rps * per,
            "requests_per_s": res.rps, "recall": recall,
            "server_cpu_ms_per_query": cpu * 1000 / max(1, res.requests * per),
        }
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
    return {
        "per_request": per, "nprobe": nprobe, "concurrency": concurrency, "requests": done,
        "seconds": wall, "qps": done * per / wall, "requests_per_s": done / wall,
        "recall": recall,
        "server_cpu_ms_per_query": cpu * 1000 / max(1, done * per),
    }


def faiss_batches(
    ds: Dataset, nlist: int, trained_on: int, nprobe: int, per: int
) -> dict[str, Any]:
    """In-process FAISS over an IVFFlat of the node's nlist, the same batches: queries/s on
    one thread and on every core (see `faiss_timed`), and its recall@10."""
    return faiss_timed(faiss_index(ds, nlist, trained_on), ds, nlist, trained_on, nprobe, per)


def faiss_index(ds: Dataset, nlist: int, trained_on: int) -> faiss.IndexIVFFlat:
    """An IVFFlat of the node's nlist, trained as the node's was (on the first vectors)."""
    xb = normalise(ds.base)
    index = new_ivf(ds.dim, nlist)
    prefix = xb[: trained_on if 0 < trained_on <= ds.n else ds.n]
    index.train(prefix[: 256 * nlist] if len(prefix) > 256 * nlist else prefix)
    index.add(xb)
    return index


def faiss_timed(index: faiss.IndexIVF, ds: Dataset, nlist: int, trained_on: int,
                nprobe: int, per: int, label: str = "") -> dict[str, Any]:
    """FAISS alone over `index`, the same batches as the node gets, on one thread and on
    every core: q/s (the best of 3 passes) and CPU per query (their mean, as the node's
    is a mean; the best too), after a pass of warm-up (the node's run before it took the
    caches); recall@10 when the index's ids are the dataset's rows (not for the node's
    own index: `label` says which)."""
    n = (len(ds.queries) // per) * per
    xq = normalise(ds.queries[:n])
    params = faiss.SearchParametersIVF(nprobe=min(nprobe, nlist))
    out: dict[str, Any] = {"nlist": nlist, "trained_on": trained_on, "nprobe": nprobe,
                           "per_request": per}
    for name, threads in (("qps_1_thread", 1), ("qps_all_cores", os.cpu_count() or 1)):
        faiss.omp_set_num_threads(threads)
        walls, cpus = [], []
        labels = np.empty((0, K), np.int64)
        for i in range(1 + FAISS_PASSES):
            t0, c0 = time.perf_counter(), time.process_time()
            labels = np.vstack([index.search(xq[s : s + per], K, params=params)[1]
                                for s in range(0, n, per)])
            if i:  # the first is the warm-up
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        out[name] = n / min(walls)
        # CPU per query: what the machine's other load does not change much (q/s it does).
        cpu_name = name.replace("qps", "cpu_ms_per_query")
        out[cpu_name] = sum(cpus) * 1000 / (n * len(cpus))
        out[cpu_name + "_best"] = min(cpus) * 1000 / n
        if not label:
            out["recall"] = recall_at_k(labels, ds.gt[:n])
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    what = label if label else f"recall {out['recall']:.4f}"
    log(f"  FAISS IVF{nlist} batches of {per}, nprobe={nprobe}: {what}, "
        f"{out['qps_1_thread']:,.0f} q/s on 1 thread ({out['cpu_ms_per_query_1_thread']:.3f} "
        f"ms CPU a query), {out['qps_all_cores']:,.0f} q/s on {os.cpu_count()} cores")
    return out


async def node_index(node: Node, shards: int, n: int) -> faiss.IndexIVF:
    """The node's own index, read from its snapshot with the node's loader (the same
    centroids and lists, in this process), once a snapshot holds all `n` vectors."""
    deadline = time.monotonic() + SNAPSHOT_WAIT_S
    while True:
        for path in node.data_dir.rglob("index.faiss"):
            # An ivf_flat snapshot holds no vectors: refilled from the node's store, read
            # beside it.
            got = await asyncio.to_thread(snapshot_index, path, shards, read_only=True)
            if got is not None and got.ntotal == n and got.trained:
                index: faiss.IndexIVF = got.index
                return index
        if time.monotonic() > deadline:
            raise RuntimeError(f"no snapshot of {n} vectors under {node.data_dir}")
        await asyncio.sleep(0.5)


# ---------------------------------------------------------------------------------------
# Standalone: python scripts/bench_batch.py [--nodes N] [--profile S] [--base DIR]
# ---------------------------------------------------------------------------------------
class Variant(LocalCluster):
    """A local cluster of one code tree (None: this worktree's), on its own addresses:
    variant v's node i on 127.0.0.(10·v + i + 1), so two clusters can run at once."""

    def __init__(self, root: Path, env: dict[str, str], name: str, slot: int,
                 code: Path | None) -> None:
        if code is not None:
            env = {**env, "PYTHONPATH": code_pythonpath(code)}
        super().__init__(root / name, env)
        self.name = name
        self.slot = slot

    def host(self, i: int) -> str:
        return f"127.0.0.{10 * self.slot + i + 1}"


async def filled(session: aiohttp.ClientSession, cluster: Variant, ds: Dataset,
                 args: argparse.Namespace) -> tuple[int, int]:
    """Start the cluster, fill it with the dataset and wait for its index: (nlist, trained
    on)."""
    await cluster.start(session, args.nodes)
    spec = {"dim": ds.dim, "metric": "cosine", "shards": args.shards, "replication": 1,
            "index": {"type": "ivf_flat"}}
    await create_collection(session, cluster.urls[0], spec)
    await ingest_rr(session, cluster.urls, ds, 1000, 4, cluster.cpu_seconds)
    await wait_trained(session, cluster.nodes[0], ds.n, args.train_min)
    desc = await call(session, "GET", f"{cluster.urls[0]}/v1/collections/{COLLECTION}")
    info = desc["shard_states"][0]["index"]
    return int(info["nlist"]), int(info.get("trained_at", 0))


async def measure(session: aiohttp.ClientSession, cluster: Variant, ds: Dataset,
                  args: argparse.Namespace, c: int, ref: dict[str, Any]) -> dict[str, Any]:
    """Batches to the cluster's node 1 at concurrency c: its figures, CPU per node and
    kind of thread, FAISS's CPU per query (one thread) over the node's, and the node's q/s
    over FAISS's on every core (the issue's measure: throughput; it moves with whatever
    else takes the cores, the CPU ratio less)."""
    marks: list[list[dict[str, float]]] = []  # per node and kind of thread, start and end

    def cpu() -> float:
        marks.append([threads_cpu(p) for p in cluster.pids])
        return sum(sum(m.values()) for m in marks[-1])

    b = await node_batches(session, cluster.urls[0], ds, args.nprobe, args.per, c, cpu,
                           args.loadgen, cluster.root)
    n = max(1, b["requests"] * b["per_request"])
    b["per_node_thread_cpu_ms"] = [
        {t: (y.get(t, 0.0) - x.get(t, 0.0)) * 1000 / n for t in y}
        for x, y in zip(marks[0], marks[1], strict=True)]
    b["per_node_cpu_ms"] = [sum(t.values()) for t in b["per_node_thread_cpu_ms"]]
    b["faiss_cpu_per_node_cpu"] = ref["cpu_ms_per_query_1_thread"] / b["server_cpu_ms_per_query"]
    b["qps_per_faiss_qps"] = b["qps"] / ref["qps_all_cores"]
    return b


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """N nodes (1 by default), filled and trained, idle; then rounds of: FAISS in-process on
    the same batches, then batches sent to node 1 (the coordinator; the others, if any, serve
    its peer sub-searches) at each of --connections (c=1 and c=cores by default). CPU per
    query is per node (from /proc). With --base, a second cluster runs the code in that
    tree, filled the same way and up at the same time; each round measures both, in
    alternating order, and the summary gives medians over the rounds."""
    ds = load_dataset(args)
    root = Path(tempfile.mkdtemp(prefix="aquila-bench-batch-"))
    env = {**node_env(args.train_min), "AQUILA_SNAPSHOT_INTERVAL_S": str(SNAPSHOT_INTERVAL_S)}
    variants = [Variant(root, env, "this", 0, None)]
    if args.base is not None or args.ab_env:
        extra = dict(kv.split("=", 1) for kv in args.ab_env)
        variants.append(Variant(root, {**env, **extra}, "base" if args.base else "ab-env", 1,
                                args.base.resolve() if args.base else None))
    out: dict[str, Any] = {"rounds": [], "load": []}
    try:
        async with new_session(8) as session:
            shapes = [await filled(session, v, ds, args) for v in variants]
            nlist, trained_on = shapes[0]
            if len(set(shapes)) > 1:
                log(f"the variants' indexes differ: (nlist, trained on) {shapes}")
            apart = await asyncio.to_thread(faiss_index, ds, nlist, trained_on)
            own = (await node_index(variants[0].nodes[0], args.shards, ds.n)
                   if args.nodes == 1 else None)
            for v in variants:
                idle = await wait_idle(v)
                log(f"{v.name}: {args.nodes} node(s) idle "
                    f"({', '.join(f'{c:.3f}' for c in idle)} cores); nlist {nlist}")
            for r in range(args.rounds):
                load = os.getloadavg()[0]
                ref = await asyncio.to_thread(faiss_timed, apart, ds, nlist, trained_on,
                                              args.nprobe, args.per)
                row: dict[str, Any] = {"faiss": ref, "load": load, "node": [],
                                       "variants": {}}
                if own is not None:
                    # The contract's reference: FAISS in process on the same index.
                    ref = row["faiss_own"] = await asyncio.to_thread(
                        faiss_timed, own, ds, nlist, trained_on, args.nprobe, args.per,
                        "the node's own index")
                faiss_cpu = ref["cpu_ms_per_query_1_thread"]
                order = variants if r % 2 == 0 else variants[::-1]
                for c in args.connections:
                    for v in order:
                        b = await measure(session, v, ds, args, c, ref)
                        row["variants"].setdefault(v.name, []).append(b)
                        if v is variants[0]:
                            row["node"].append(b)
                        log(f"round {r + 1} {v.name} c={c}: node {b['qps']:,.0f} q/s, recall "
                            f"{b['recall']:.4f}, CPU {b['server_cpu_ms_per_query']:.3f} "
                            f"ms/query (per node "
                            f"{', '.join(_threads(t) for t in b['per_node_thread_cpu_ms'])}); "
                            f"FAISS 1 thread {ref['qps_1_thread']:,.0f} q/s, CPU "
                            f"{faiss_cpu:.3f} ms/query: FAISS CPU / node CPU "
                            f"{b['faiss_cpu_per_node_cpu']:.2f}x; node q/s / FAISS q/s on "
                            f"{os.cpu_count()} cores {b['qps_per_faiss_qps']:.2f}x "
                            f"(load {load:.1f})")
                out["rounds"].append(row)
            out["summary"] = summary(out["rounds"], [v.name for v in variants])
            if args.profile > 0:
                cluster, url = variants[0], variants[0].urls[0]
                pids = {f"n{i}": p for i, p in enumerate(cluster.pids, 1)}

                async def one_pass() -> None:
                    await node_batches(session, url, ds, args.nprobe, args.per, 1,
                                       cluster.cpu_seconds)

                prof = await profile_pids(pids, args.profile, root, one_pass)
                keep = (args.out or Path("bench-batch.json")).parent
                for name, summ in prof.items():
                    if not isinstance(summ, dict):  # {"error": why}: no profile
                        continue
                    kept = keep / f"pyspy-batch-{name}.txt"
                    shutil.copy(root / f"pyspy-{name}.txt", kept)
                    log(f"py-spy {name}: {summ['samples']} samples ({kept}); self:")
                    for f in summ["self"][:15]:
                        log(f"  {f['pct']:5.1f}%  {f['frame']}")
                out["profile"] = prof
    finally:
        for v in variants:
            await v.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


def summary(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Medians over the rounds, per variant and concurrency: the node's CPU per query (all
    nodes; the event loop's and the other threads' of node 1), FAISS's CPU per query over
    the node's (FAISS on the node's own index when there is one node, else on one trained
    apart) and the node's q/s over FAISS's on every core (the same index); with two
    variants, the first's CPU per query over the second's, per round."""
    out: dict[str, Any] = {}
    concurrencies = [b["concurrency"] for b in rounds[0]["variants"][names[0]]]
    for i, c in enumerate(concurrencies):
        for name in names:
            bs = [r["variants"][name][i] for r in rounds]
            fig = {
                "cpu_ms_per_query": median(b["server_cpu_ms_per_query"] for b in bs),
                "loop_ms": median(b["per_node_thread_cpu_ms"][0]["loop"] for b in bs),
                "threads_ms": median(b["per_node_thread_cpu_ms"][0]["threads"] for b in bs),
                "faiss_cpu_per_node_cpu": median(b["faiss_cpu_per_node_cpu"] for b in bs),
                "qps": median(b["qps"] for b in bs),
                "qps_per_faiss_qps": median(b["qps_per_faiss_qps"] for b in bs),
            }
            out[f"{name} c={c}"] = fig
            log(f"median of {len(bs)} rounds, {name} c={c}: CPU {fig['cpu_ms_per_query']:.3f} "
                f"ms/query (loop {fig['loop_ms']:.3f} + threads {fig['threads_ms']:.3f}), "
                f"FAISS CPU / node CPU {fig['faiss_cpu_per_node_cpu']:.3f}x, "
                f"{fig['qps']:,.0f} q/s ({fig['qps_per_faiss_qps']:.3f}x FAISS's on every "
                "core)")
        if len(names) > 1:
            ratio = median(r["variants"][names[0]][i]["server_cpu_ms_per_query"]
                           / r["variants"][names[1]][i]["server_cpu_ms_per_query"]
                           for r in rounds)
            out[f"{names[0]} / {names[1]} c={c}"] = ratio
            log(f"median of per-round ratios, c={c}: CPU per query {names[0]} / {names[1]} "
                f"{ratio:.3f}")
    for key, what in (("faiss", "an index trained apart"), ("faiss_own", "the node's own index")):
        if key in rounds[0]:
            ms = out[f"{key}_cpu_ms_per_query"] = median(
                r[key]["cpu_ms_per_query_1_thread"] for r in rounds)
            log(f"median of {len(rounds)} rounds, FAISS on {what}: {ms:.3f} ms CPU a "
                f"query on 1 thread")
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
    p.add_argument("--base", type=Path, help="a tree of node/ and cluster/ (`git archive "
                   "main node cluster | tar -x -C DIR`) measured beside this worktree's code")
    p.add_argument("--ab-env", action="append", default=[], metavar="KEY=VALUE",
                   help="the second cluster's node settings (with --base or alone: then it "
                   "runs this worktree's code too)")
    p.add_argument("--connections", type=parse_ints,
                   default=list(dict.fromkeys([1, os.cpu_count() or 1])),
                   metavar="C1,C2,...",
                   help="requests in flight at once, measured in turn (default: 1 and as "
                   "many as the machine has cores; more keep every search thread busy "
                   "while a request's answer travels and the next one is parsed)")
    p.add_argument("--loadgen", choices=("wrk", "python"),
                   default="wrk" if shutil.which("wrk") else "python",
                   help="what sends the timed batches (default wrk when installed: "
                   "scripts/bench_setup.sh)")
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
