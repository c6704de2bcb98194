#!/usr/bin/env python3
"""REST search against in-process FAISS on the same index (issue 14, "REST at 1M"), in
interleaved rounds, with optional A/B of two versions of the node's code.

Builds (once; `--data DIR` keeps it for the next run) one node holding N seeded clustered
vectors (scripts/bench_memory.clustered: dim 96, l2, ivf_flat, default settings), trained,
and snapshotted. Each code variant then gets a node of its own on a copy of that data,
started, warmed from 8 clients and left until it is quiet (a start scans every shard for old
tombstones), all before the first round. `--rounds` times: wrk against each variant's node in
turn (8 connections, 2 wrk threads, single-query bodies at `--nprobe`, k 10; the order
alternates) for `--seconds`, then in-process FAISS for as long on the very index the nodes
serve (the snapshot, read with the node's own loader): single queries, `--nprobe`, k 10, the
same search parameters, on as many threads as the node's search pool has (`--threads`, 2 on
2 cores), each with FAISS's OpenMP at one thread (as the node's search threads are). Per
round: q/s, p99, the server's CPU per query (its event loop's thread and its other threads
apart), the cores of wrk and of everything else, the ratios to FAISS; the medians at the end.

`--base DIR`: a variant run from the code in DIR (`git archive <commit> node cluster | tar -x
-C DIR`). `--env-b K=V ...`: a variant of the worktree's code with these environment variables.
`--profile S` (py-spy, Python frames per thread), `--native S` (py-spy --native at a low
rate: C frames too; it stops the process per sample), `--perf S` (perf record, cpu-clock,
call graphs): the worktree's node profiled during an extra wrk run of S seconds.

    nice -n 5 .venv/bin/python scripts/bench_rest.py --n 1000000 --data /tmp/rest-1m
    git archive HEAD~1 node cluster | tar -x -C /tmp/base && nice -n 5 .venv/bin/python \
      scripts/bench_rest.py --n 1000000 --data /tmp/rest-1m --rounds 12 --seconds 5 \
      --base /tmp/base --perf 15 --native 20

The machine is shared: every figure is printed with `uptime`'s load; compare ratios measured
in the same run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from bench_common import COLLECTION, log
from bench_memory import clustered, faiss_round, ingest, load_avg, wait_settled
from bench_node import (
    Node,
    call,
    code_pythonpath,
    cpu_seconds_of,
    thread_cpu_of,
    wait_ready,
)
from bench_profile import pyspy_exe, summarise_collapsed
from snapshot_index import snapshot_index
from wrkload import run_wrk, write_bodies

K = 10
ENV = {"AQUILA_SNAPSHOT_INTERVAL_S": "5"}  # the log at its default level (INFO)


def queries(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    both = clustered(args.n + args.queries, args.dim, args.seed)
    return both[: args.n], np.ascontiguousarray(both[args.n :])


def snapshot_of(data: Path) -> Path:
    found = sorted((data / "node").rglob("index.faiss"))
    if len(found) != 1:
        raise RuntimeError(f"expected one index.faiss under {data}, found {found}")
    return found[0]


async def build(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """A node on `data` holding the N vectors, trained, stopped (it snapshots on stop)."""
    x, _ = queries(args)
    (data / "node").mkdir(parents=True)
    node = Node(data / "node", data / "node.log", ENV)
    node.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
            await wait_ready(s, node, 120)
            body = {"dim": args.dim, "metric": "l2", "index": {"type": "ivf_flat"}}
            await call(s, "PUT", f"{node.base_url}/v1/collections/{COLLECTION}",
                       orjson.dumps(body))
            secs = await ingest(s, node.base_url, x, 2000, 2)
            log(f"ingested {len(x)} in {secs:.0f}s; waiting for training")
            desc = await wait_settled(s, node.base_url, len(x))
    finally:
        node.stop()
    info = {"n": args.n, "dim": args.dim, "shards": desc["shards"],
            "index": desc["shard_states"][0].get("index", {})}
    (data / "built.json").write_text(json.dumps(info))
    return info


def code_env(code: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The node's environment to run the code in `code` (None: the worktree's), with
    `extra` variables."""
    if code is None:
        return {**ENV, **(extra or {})}
    return {**ENV, **(extra or {}), "PYTHONPATH": code_pythonpath(code)}


PROFILERS: list[subprocess.Popen[bytes]] = []


def start_profiler(tool: str, pid: int, seconds: float, work: Path) -> Path:
    """perf (cpu-clock samples with call graphs) or py-spy (Python frames per thread) on
    `pid` for `seconds`, left in PROFILERS; the file it writes."""
    stamp = time.strftime("%H%M%S")
    log_file = (work / f"{tool}.log").open("wb")
    if tool == "perf":
        raw = work / f"perf-{stamp}.data"
        cmd = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid),
               "-o", str(raw), "--", "sleep", str(int(seconds))]
    else:
        exe = pyspy_exe()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        raw = work / f"pyspy-{stamp}.txt"
        # --native (C frames too: FAISS, RocksDB, uvloop, the kernel's entry points) stops
        # the process for each sample: a low rate keeps that cost small.
        how = ["--native", "--rate", "47"] if tool == "native" else ["--nonblocking",
                                                                     "--rate", "100"]
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), *how,
               "--format", "raw", "--threads", "--output", str(raw)]
    PROFILERS.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT))
    return raw


async def wait_quiet(pid: int, limit_s: float = 180.0) -> float:
    """Wait until the idle node uses under a tenth of a core over a second (after a start it
    scans every shard's records for old tombstones: a minute of a core at 1M documents)."""
    t0 = time.perf_counter()
    last = cpu_seconds_of(pid)
    while time.perf_counter() - t0 < limit_s:
        await asyncio.sleep(1.0)
        now = cpu_seconds_of(pid)
        if now - last < 0.1:
            break
        last = now
    return time.perf_counter() - t0


class Running:
    """A node of one variant, started on its own copy of the built data (RocksDB locks its
    folder: variants cannot share one), warmed and quiet."""

    def __init__(self, name: str, data: Path, code: Path | None, extra: dict[str, str]) -> None:
        own = data / "variants" / name
        if not own.exists():
            own.mkdir(parents=True)
            subprocess.run(["cp", "-a", str(data / "node"), str(own / "node")], check=True)
        self.name = name
        self.node = Node(own / "node", own / "node.log", code_env(code, extra))

    async def start(self, q: np.ndarray, nprobe: int) -> None:
        self.node.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            await wait_ready(s, self.node, 600)
            url = f"{self.node.base_url}/v1/collections/{COLLECTION}/search"

            async def warm(rows: np.ndarray) -> None:
                for v in rows:
                    await call(s, "POST", url, orjson.dumps(
                        {"vector": v, "k": K, "nprobe": nprobe},
                        option=orjson.OPT_SERIALIZE_NUMPY))

            # Warm (the index's pages, the block cache, the code paths) from 8 clients at
            # once: every search thread is started before a profiler attaches (perf -p
            # follows the threads there are).
            await asyncio.gather(*(warm(q[i:64:8]) for i in range(8)))
        await wait_quiet(self.node.pid)


async def rest_round(run: Running, bodies: Path, seconds: float, work: Path,
                     profile: float = 0.0, tool: str = "py-spy") -> dict[str, Any]:
    """wrk against the node for `seconds` (8 connections, 2 threads): q/s, p99, CPU per
    query of the server (its event loop's thread and its other threads apart)."""
    node = run.node
    spy = None
    raw = work / "none"
    if profile:
        raw = start_profiler(tool, node.pid, profile, work)
        spy = PROFILERS.pop()
    cpu0 = thread_cpu_of(node.pid)
    w = await asyncio.to_thread(
        run_wrk, node.base_url, f"/v1/collections/{COLLECTION}/search", bodies,
        connections=8, threads=2, seconds=profile or seconds, server_pid=node.pid,
        work_dir=work)
    cpu1 = thread_cpu_of(node.pid)
    loop_s = cpu1.get(node.pid, 0.0) - cpu0.get(node.pid, 0.0)
    rest_s = sum(c - cpu0.get(t, 0.0) for t, c in cpu1.items() if t != node.pid)
    out: dict[str, Any] = {
        "qps": round(w.rps), "p99_ms": round(w.lat_p99_ms, 2), "non2xx": w.non2xx,
        "server_cpu_per_query_us": round(w.server_cpu_s / max(1, w.requests) * 1e6),
        "loop_cpu_per_query_us": round(loop_s / max(1, w.requests) * 1e6),
        "threads_cpu_per_query_us": round(rest_s / max(1, w.requests) * 1e6),
        "server_cores": round(w.server_cpu_s / w.seconds, 2),
        "wrk_cores": round(w.client_cpu_s / w.seconds, 2),
        "others_cores": round(w.other_cpu_s / w.seconds, 2)}
    if spy is not None:
        spy.wait(timeout=profile + 60)
        if tool == "perf":
            out["perf_data"] = str(raw)
        elif raw.exists():
            summary = summarise_collapsed(raw, top=40)
            summary.pop("tids")
            out["profile"] = summary
            out["profile_raw"] = str(raw)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    data = args.data or Path(tempfile.mkdtemp(prefix="aquila-rest-"))
    log(f"data {data}; {load_avg()}")
    if not (data / "built.json").exists():
        info = await build(args, data)
    else:
        info = json.loads((data / "built.json").read_text())
        if info["n"] != args.n or info["dim"] != args.dim:
            raise SystemExit(f"{data} holds n={info['n']} dim={info['dim']}")
    log(f"built: {info}")
    _, q = queries(args)
    loaded = snapshot_index(snapshot_of(data), int(info["shards"]))
    if loaded is None:
        raise RuntimeError("the node's snapshot did not load")
    index = loaded.index
    log(f"the node's index: {type(index).__name__} nlist {index.nlist} ntotal {index.ntotal}")
    variants: dict[str, tuple[Path | None, dict[str, str]]] = {"worktree": (None, {})}
    if args.base:
        variants["base"] = (args.base.resolve(), {})
    if args.env_b:
        variants["env_b"] = (None, dict(kv.split("=", 1) for kv in args.env_b))
    out: dict[str, Any] = {"n": args.n, "dim": args.dim, "nprobe": args.nprobe,
                           "nlist": int(index.nlist), "seconds": args.seconds, "rounds": []}
    work = Path(tempfile.mkdtemp(prefix="aquila-rest-wrk-"))
    bodies = work / "bodies.txt"
    write_bodies(bodies, [orjson.dumps({"vector": v, "k": K, "nprobe": args.nprobe},
                                       option=orjson.OPT_SERIALIZE_NUMPY) for v in q])
    runs = {name: Running(name, data, code, extra) for name, (code, extra) in variants.items()}
    try:
        for run in runs.values():
            await run.start(q, args.nprobe)
        for r in range(args.rounds):
            one: dict[str, Any] = {}
            order = list(runs.values())
            if r % 2:
                order.reverse()  # A B, B A, ...: drift in the machine's load hits both alike
            for run in order:
                one[run.name] = await rest_round(run, bodies, args.seconds, work)
                log(f"round {r} {run.name}: {one[run.name]}")
            one["faiss"] = await asyncio.to_thread(faiss_round, index, q, args.nprobe,
                                                   args.threads, args.seconds)
            for name in variants:
                one[name]["over_faiss"] = round(one[name]["qps"] / one["faiss"]["qps"], 3)
                one[name]["cpu_over_faiss"] = round(
                    one["faiss"]["cpu_per_query_us"] / one[name]["server_cpu_per_query_us"], 3)
            one["uptime"] = load_avg()
            log(f"round {r}: faiss {one['faiss']}; {one['uptime']}")
            out["rounds"].append(one)
        for name in [*variants, "faiss"] if out["rounds"] else []:
            for key in ("qps", "over_faiss", "cpu_over_faiss", "server_cpu_per_query_us",
                        "loop_cpu_per_query_us", "cpu_per_query_us"):
                vals = sorted(x[name][key] for x in out["rounds"] if key in x[name])
                if vals:
                    out[f"{name}_{key}_median"] = vals[len(vals) // 2]
        main = runs["worktree"]
        for tool, secs in (("py-spy", args.profile), ("native", args.native),
                           ("perf", args.perf)):
            if secs:
                out[tool] = await rest_round(main, bodies, secs, work, profile=secs, tool=tool)
    finally:
        for run in runs.values():
            run.node.stop()
    out["uptime"] = load_avg()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2,
                   help="in-process FAISS threads (the node's search threads: 2 cores here)")
    p.add_argument("--data", type=Path, help="keep the built node here and reuse it")
    p.add_argument("--base", type=Path, help="code of a second variant (DIR/node, DIR/cluster)")
    p.add_argument("--env-b", nargs="*", metavar="KEY=VALUE",
                   help="a variant: the worktree's code with these environment variables")
    p.add_argument("--profile", type=float, default=0.0, help="py-spy the node this long")
    p.add_argument("--native", type=float, default=0.0,
                   help="py-spy --native (Python and C frames) the node this long")
    p.add_argument("--perf", type=float, default=0.0,
                   help="perf record (cpu-clock, call graphs) the node this long")
    p.add_argument("--json", type=Path, help="write the results here too")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    out = asyncio.run(main_async(args))
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
