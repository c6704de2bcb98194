#!/usr/bin/env python3
"""CPU per query of a search through 1 node and through N nodes, split by node and by thread
(the event loop's thread against the others: search threads, writers, background).

    python scripts/bench_cpu_split.py --nodes 3 --limit 50000 --nprobe 32

Each cluster is started (127.0.0.2.. in a private network namespace when root), filled over
REST with the first --limit WordNet vectors and trained; then the run waits until the nodes
are idle (retraining and compaction after an ingest take cores for a while: a figure taken
during them is not the cost of a query), warms up, and wrk sends one query per request to
node 1 only for --seconds. Node 1 is then the coordinator of every query, the others serve
its peer sub-searches: their CPU per query is what a peer request costs.

On a machine whose load changes (other work on shared cores), compare in one run:

    python scripts/bench_cpu_split.py --nodes 3 --rounds 3 --seconds 4 \
        --rounds-connections 1,8,16 --ab-env AQUILA_SOME_SETTING=value

or this code against other code (`--base DIR`, DIR from `git archive <commit> node cluster |
tar -x -C DIR`), one node each (with --nodes 1 no N-node cluster is started):

    python scripts/bench_cpu_split.py --nodes 1 --rounds 4 --seconds 6 \
        --rounds-connections 1,8 --base /tmp/base

starts every cluster at once (1 node, N nodes, and N nodes with the --ab-env settings), each on
its own port, and measures them in turns, round after round: CPU per query, q/s and p50 at
each connection count, and their ratios to one node. --profile (py-spy, Python frames) and
--perf (perf record: CPU time by library and kernel) look at the N-node cluster after its
measured run.

At a fixed nprobe, N nodes scan more than one node and reach a higher recall: each node's index
has nlist 4·√n of its own share n, so its lists hold 1/√N of one node's, and N nodes scanning
nprobe lists each do √N times one node's FAISS work. `--recall 0.95` (repeatable) measures
every cluster a second time with the search body's `"recall"` in place of `"nprobe"` (each node picks its
probes from its calibration), and every configuration's recall@10 against exact search on the
data is measured once (one client, --recall-queries queries) and printed beside its CPU and
q/s: the comparison at equal recall beside the one at equal nprobe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from bench_common import COLLECTION, log
from bench_data import DEFAULT_DATA, Dataset, load_dataset, recall_at_k
from bench_load import create_collection, ingest_rr, wait_trained
from bench_local_cluster import (
    PORT,
    LocalCluster,
    check_free,
    host_of,
    maybe_reexec_in_netns,
    new_session,
    node_env,
)
from bench_node import code_pythonpath, thread_cpu_of
from bench_profile import profile_pids
from wrkload import LUA_SCRIPT, MARKER, search_bodies, write_bodies

IDLE_CORES = 0.05  # below this on every node, the cluster counts as idle
IDLE_WAIT_S = 300.0


def split_s(pid: int, before: dict[int, float]) -> tuple[float, float]:
    """CPU seconds since `before` of (the main thread, all other threads) of a node."""
    after = thread_cpu_of(pid)
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    rest = sum(v - before.get(t, 0.0) for t, v in after.items() if t != pid)
    return main, rest


async def wait_idle(cluster: LocalCluster) -> list[float]:
    """Cores each node took over the last 3 s once all are below IDLE_CORES (or the wait ran
    out: then the figure says how busy they still were)."""
    deadline = time.monotonic() + IDLE_WAIT_S
    while True:
        before = [thread_cpu_of(p) for p in cluster.pids]
        await asyncio.sleep(3)
        cores = [sum(split_s(p, b)) / 3 for p, b in zip(cluster.pids, before, strict=True)]
        if max(cores) < IDLE_CORES or time.monotonic() > deadline:
            return cores


def run_wrk(url: str, bodies: Path, script: Path, seconds: int, connections: int) -> dict[str, int]:
    path = f"/v1/collections/{COLLECTION}/search"
    cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url + path,
           "--", str(bodies), path, "POST", "2", ""]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith(MARKER))
    raw = json.loads(line[len(MARKER):])
    return {"requests": int(raw["requests"]), "duration_us": int(raw["duration_us"]),
            "p50_us": int(raw["latency_us"]["p50"]),
            "ok": sum(int(v) for k, v in raw["statuses"].items() if 200 <= int(k) < 300)}


def settings_of(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The search settings every cluster is measured at: the --nprobe, then each --recall."""
    return [(f"nprobe {args.nprobe}", {"nprobe": args.nprobe})] + \
        [(f"recall {r:g}", {"recall": r}) for r in args.recall]


def write_setting_bodies(root: Path, ds: Dataset, settings: list[tuple[str, dict[str, Any]]]
                         ) -> list[Path]:
    """One wrk body file per setting (the first 1,000 queries each)."""
    paths = []
    for i, (_, opts) in enumerate(settings):
        path = root / f"bodies-{i}.txt"
        write_bodies(path, search_bodies(ds.queries[:1000], k=10, **opts))
        paths.append(path)
    return paths


async def recall_of(url: str, ds: Dataset, opts: dict[str, Any], n: int) -> dict[str, Any]:
    """recall@10 against exact search of the first `n` queries through `url`, one at a time
    (the data set's ground truth: exact cosine top-10 of the base vectors it was filled with),
    and the probes the nodes said they used (with `recall`: the most any node used)."""
    n = min(n, len(ds.gt))
    path = f"{url}/v1/collections/{COLLECTION}/search"
    found: list[list[int]] = []
    nprobes: set[int] = set()
    async with new_session(1) as session:
        for q in ds.queries[:n]:
            body = orjson.dumps({"vector": q, "k": 10, **opts}, option=orjson.OPT_SERIALIZE_NUMPY)
            async with session.post(path, data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"search -> {r.status}: {raw[:300]!r}")
            reply = orjson.loads(raw)
            if reply.get("partial"):
                raise RuntimeError(f"partial answer while measuring recall: {reply!r:.300}")
            found.append([int(h["id"]) for h in reply["results"][0]])
            if "nprobe" in reply:
                nprobes.add(int(reply["nprobe"]))
    return {"recall": recall_at_k(found, ds.gt[:n]), "queries": n,
            "nprobe_used": sorted(nprobes) or [int(opts["nprobe"])]}


async def ports_free(size: int, limit_s: float = 120.0) -> None:
    """Wait for the nodes' addresses of the last cluster to be free (a stopped node's socket
    may linger a moment)."""
    deadline = time.monotonic() + limit_s
    for i in range(1, size + 1):
        while True:
            try:
                check_free(host_of(i), PORT)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


async def perf_pids(pids: list[int], seconds: float, out_dir: Path, size: int,
                    load: Callable[[], object]) -> None:
    """`perf record` (CPU time: cpu-clock, with call graphs) of every node while `load`
    runs: where the CPU goes by library and kernel, which py-spy's wall-clock samples of
    Python frames do not tell (a thread preempted on a busy machine looks busy to it)."""
    procs = [await asyncio.create_subprocess_exec(
        "perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-g", "-p", str(pid),
        "-o", str(out_dir / f"perf-n{size}-{i}.data"), "--", "sleep", str(seconds),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for i, pid in enumerate(pids, 1)]
    await asyncio.to_thread(load)
    for p in procs:
        await p.wait()
    log(f"  perf of {size} node(s): {out_dir}/perf-n{size}-*.data")


async def measure(args: argparse.Namespace, ds: Dataset, root: Path, size: int,
                  env: dict[str, str] | None = None, tag: str = "") -> dict[str, Any]:
    await ports_free(size)
    cluster = LocalCluster(root / f"c{size}{tag}", {**node_env(args.train_min), **(env or {})})
    try:
        await filled(args, ds, cluster, size)
        bodies = root / "bodies.txt"
        write_bodies(bodies, search_bodies(ds.queries[:1000], k=10, nprobe=args.nprobe))
        script = root / "wrkload.lua"
        script.write_text(LUA_SCRIPT)
        idle = await wait_idle(cluster)
        url = cluster.urls[0]
        run_wrk(url, bodies, script, 5, args.connections)  # warm-up
        rec = await recall_of(url, ds, {"nprobe": args.nprobe}, args.recall_queries)
        before = [thread_cpu_of(p) for p in cluster.pids]
        load0 = os.getloadavg()[0]
        got = run_wrk(url, bodies, script, args.seconds, args.connections)
        splits = [split_s(p, b) for p, b in zip(cluster.pids, before, strict=True)]
        n = max(1, got["ok"])
        per_node = [{"main_ms": 1000 * m / n, "other_ms": 1000 * r / n} for m, r in splits]
        out: dict[str, Any] = {
            "nodes": size, "queries": got["ok"], "errors": got["requests"] - got["ok"],
            "qps": got["ok"] / (got["duration_us"] / 1e6), "idle_cores_before": idle,
            "load_before": load0, "load_after": os.getloadavg()[0], "per_node": per_node,
            "all_ms": sum(p["main_ms"] + p["other_ms"] for p in per_node), **rec,
        }
        if args.profile and (size > 1 or args.profile_one):
            # After the measured run: py-spy's sampling costs the nodes CPU too.
            async def load() -> None:
                await asyncio.to_thread(run_wrk, url, bodies, script, 5, args.connections)
            prof = args.profile_dir or root
            prof.mkdir(parents=True, exist_ok=True)
            names = {f"n{size}-{i}": p for i, p in enumerate(cluster.pids, 1)}
            out["profile"] = await profile_pids(names, args.profile, prof, load)
            log(f"  py-spy of {size} node(s): raw stacks in {prof}/pyspy-n{size}-*.txt")
        if args.perf and size > 1:
            prof = args.profile_dir or root
            prof.mkdir(parents=True, exist_ok=True)
            await perf_pids(cluster.pids, args.perf, prof, size,
                            lambda: run_wrk(url, bodies, script, int(args.perf) + 2,
                                            args.connections))
        log(f"{size} node(s){tag}: {out['qps']:.0f} q/s, {out['all_ms']:.3f} ms CPU per query, "
            f"recall@10 {rec['recall']:.4f} (load {load0:.1f})")
        for i, p in enumerate(per_node, 1):
            log(f"  node {i}: main thread {p['main_ms']:.3f} ms, other threads "
                f"{p['other_ms']:.3f} ms per query")
        return out
    finally:
        await cluster.stop()


class PortCluster(LocalCluster):
    """A local cluster on its own port, so that several can run side by side."""

    def __init__(self, root: Path, env: dict[str, str], port: int) -> None:
        super().__init__(root, env, port)


async def filled(args: argparse.Namespace, ds: Dataset, cluster: LocalCluster, size: int
                 ) -> None:
    async with new_session(8) as session:
        await cluster.start(session, size)
        spec = {"dim": ds.dim, "metric": "cosine", "shards": args.shards, "replication": 1,
                "index": {"type": "ivf_flat"}}
        await create_collection(session, cluster.urls[0], spec)
        await ingest_rr(session, cluster.urls, ds, 1000, 4, cluster.cpu_seconds)
        await wait_trained(session, cluster.nodes[0], ds.n, args.train_min)


async def interleaved(args: argparse.Namespace, ds: Dataset, root: Path) -> dict[str, Any]:
    """1 node, N nodes and (with --ab-env) N nodes with other settings, all up at once, and
    measured in turns (--rounds of --seconds each): a change in the machine's load meanwhile
    (other work on shared cores) weighs on each alike. Each is measured at the --nprobe and at
    each --recall, and its recall@10 at each is measured once, before the rounds."""
    variants: list[tuple[str, int, dict[str, str]]] = [("1 node", 1, {})]
    if args.nodes > 1:
        variants.append((f"{args.nodes} nodes", args.nodes, {}))
    if args.ab_env:
        variants.append((f"{args.nodes} node(s) [{' '.join(args.ab_env)}]", args.nodes,
                         dict(kv.split("=", 1) for kv in args.ab_env)))
    if args.base:
        # Other code (`git archive <commit> node cluster | tar -x -C DIR`), same settings.
        variants.append((f"{args.nodes} node(s) [base {args.base}]", args.nodes,
                         {"PYTHONPATH": code_pythonpath(args.base.resolve())}))
    clusters = [PortCluster(root / f"v{i}", {**node_env(args.train_min), **env}, PORT + 1 + i)
                for i, (_, _, env) in enumerate(variants)]
    settings = settings_of(args)
    bodies = write_setting_bodies(root, ds, settings)
    script = root / "wrkload.lua"
    script.write_text(LUA_SCRIPT)
    try:
        for (name, size, _), cluster in zip(variants, clusters, strict=True):
            log(f"starting and filling: {name}")
            await filled(args, ds, cluster, size)
        recalls: list[list[dict[str, Any]]] = []
        for (name, _, _), cluster in zip(variants, clusters, strict=True):
            await wait_idle(cluster)
            for path in bodies:
                run_wrk(cluster.urls[0], path, script, 3, args.connections)  # warm-up
            recalls.append([await recall_of(cluster.urls[0], ds, opts, args.recall_queries)
                            for _, opts in settings])
            log(f"{name}: recall@10 " + ", ".join(
                f"{sname} {r['recall']:.4f} (nprobe {r['nprobe_used']})"
                for (sname, _), r in zip(settings, recalls[-1], strict=True)))
        conns = [int(c) for c in args.rounds_connections.split(",")] if \
            args.rounds_connections else [args.connections]
        points = [(si, c) for si in range(len(settings)) for c in conns]
        totals = [{pt: {"ok": 0, "us": 0, "p50": [], "cpu": [(0.0, 0.0)] * len(cl.pids)}
                   for pt in points} for cl in clusters]
        loads = []
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for pt in points:
                order = list(zip(clusters, totals, strict=True))
                if r % 2:
                    order.reverse()  # none goes first every round
                for cluster, tots in order:
                    tot = tots[pt]
                    before = [thread_cpu_of(p) for p in cluster.pids]
                    got = run_wrk(cluster.urls[0], bodies[pt[0]], script, args.seconds, pt[1])
                    splits = [split_s(p, b) for p, b in zip(cluster.pids, before, strict=True)]
                    tot["ok"] += got["ok"]
                    tot["us"] += got["duration_us"]
                    tot["p50"].append(got["p50_us"] / 1000)
                    tot["cpu"] = [(a + m, b + o) for (a, b), (m, o)
                                  in zip(tot["cpu"], splits, strict=True)]
        out: dict[str, Any] = {"rounds": args.rounds, "loads": loads,
                               "settings": [name for name, _ in settings], "variants": []}
        for (name, size, env), tots, recs in zip(variants, totals, recalls, strict=True):
            by_point = []
            for (si, c), tot in tots.items():
                n = max(1, tot["ok"])
                per_node = [{"main_ms": 1000 * m / n, "other_ms": 1000 * o / n}
                            for m, o in tot["cpu"]]
                by_point.append({
                    "setting": settings[si][0], "connections": c, **recs[si],
                    "queries": tot["ok"], "qps": tot["ok"] / (tot["us"] / 1e6),
                    "p50_ms": sorted(tot["p50"])[len(tot["p50"]) // 2], "per_node": per_node,
                    "all_ms": sum(p["main_ms"] + p["other_ms"] for p in per_node)})
            out["variants"].append({"name": name, "nodes": size, "env": env, "points": by_point})
        one = out["variants"][0]["points"]
        log(f"interleaved, {args.rounds} rounds of {args.seconds} s at {conns} connection(s), "
            f"load {min(loads):.1f}-{max(loads):.1f}; ratios to one node at the same setting:")
        for v in out["variants"]:
            for x, o in zip(v["points"], one, strict=True):
                x["cpu_ratio"] = x["all_ms"] / o["all_ms"]
                x["qps_ratio"] = x["qps"] / o["qps"]
                x["p50_added_ms"] = x["p50_ms"] - o["p50_ms"]
                log(f"{v['name']}, {x['setting']}, c={x['connections']}: recall@10 "
                    f"{x['recall']:.4f}, {x['qps']:.0f} q/s ({x['qps_ratio']:.2f}x), "
                    f"p50 {x['p50_ms']:.2f} ms ({x['p50_added_ms']:+.2f}), "
                    f"{x['all_ms']:.3f} ms CPU per query ({x['cpu_ratio']:.2f}x)")
                for i, p in enumerate(x["per_node"], 1):
                    log(f"  node {i}: main thread {p['main_ms']:.3f} ms, other threads "
                        f"{p['other_ms']:.3f} ms per query")
        if args.base:
            # This code against the base, point by point (with --nodes 1: one node each).
            this = out["variants"][1 if args.nodes > 1 else 0]["points"]
            base = out["variants"][-1]["points"]
            for x, b in zip(this, base, strict=True):
                log(f"this code / base, {x['setting']}, c={x['connections']}: q/s "
                    f"{x['qps'] / b['qps']:.3f}, CPU per query {x['all_ms'] / b['all_ms']:.3f} "
                    "(main threads " + " ".join(
                        f"{p['main_ms'] / q['main_ms']:.3f}" for p, q
                        in zip(x["per_node"], b["per_node"], strict=True)) + "), p50 "
                    f"{x['p50_ms'] - b['p50_ms']:+.2f} ms")
        return out
    finally:
        await asyncio.gather(*(c.stop() for c in clusters))


async def main_async(args: argparse.Namespace) -> None:
    ds = load_dataset(args)
    root = Path(tempfile.mkdtemp(prefix="aquila-cpu-split-"))
    try:
        if args.rounds:
            result = await interleaved(args, ds, root)
            if args.out:
                args.out.write_text(json.dumps(result, indent=1))
            return
        one = await measure(args, ds, root, 1)
        many = await measure(args, ds, root, args.nodes)
        ratio = many["all_ms"] / one["all_ms"]
        result: dict[str, Any] = {"one": one, "many": many, "ratio": ratio}
        if args.ab_env:
            env = dict(kv.split("=", 1) for kv in args.ab_env)
            tag = " [" + " ".join(args.ab_env) + "]"
            b = await measure(args, ds, root, args.nodes, env, tag)
            result |= {"many_b": b, "ratio_b": b["all_ms"] / one["all_ms"], "env_b": env}
        log(f"CPU per query, {args.nodes} nodes / 1 node: {ratio:.2f}")
        if args.ab_env:
            log(f"CPU per query, {args.nodes} nodes{tag} / 1 node: {result['ratio_b']:.2f}")
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=50_000)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--train-min", type=int, default=2048)
    p.add_argument("--out", type=Path)
    p.add_argument("--profile", type=float, default=0.0,
                   help="after the measured run, py-spy every node of the N-node cluster for "
                        "this many seconds under the same load")
    p.add_argument("--profile-one", action="store_true",
                   help="profile the 1-node cluster too")
    p.add_argument("--ab-env", action="append", default=[], metavar="KEY=VALUE",
                   help="measure the N-node cluster a second time with this variable in the "
                        "nodes' environment (repeatable): an A/B in the same run")
    p.add_argument("--rounds", type=int, default=0,
                   help="run every cluster at once and measure them in turns, this many "
                        "rounds of --seconds each (see `interleaved`)")
    p.add_argument("--perf", type=float, default=0.0,
                   help="after the measured run, perf record every node of the N-node "
                        "cluster for this many seconds under the same load")
    p.add_argument("--rounds-connections", metavar="C1,C2,...",
                   help="with --rounds: measure at each of these connection counts in every "
                        "round (the p50 at 1, the throughput at 16: the fan-out goals)")
    p.add_argument("--recall", type=float, action="append", default=[], metavar="R",
                   help="with --rounds: measure every cluster at this target recall too (the "
                        "search body's \"recall\" in place of \"nprobe\"; repeatable)")
    p.add_argument("--recall-queries", type=int, default=1000,
                   help="queries each configuration's recall@10 is measured over")
    p.add_argument("--profile-dir", type=Path, help="where py-spy's raw stacks go")
    p.add_argument("--base", type=Path,
                   help="with --rounds: a tree of node/ and cluster/ (`git archive <commit> "
                        "node cluster | tar -x -C DIR`) run as one more cluster of --nodes, "
                        "measured in the same turns (with --nodes 1: this code against it)")
    args = p.parse_args()
    if args.base and not args.rounds:
        p.error("--base needs --rounds (the clusters are measured in turns)")
    if args.recall and not args.rounds:
        p.error("--recall needs --rounds")
    if any(not 0.5 <= r <= 0.999 for r in args.recall):
        p.error("--recall takes 0.5 to 0.999")
    args.synthetic, args.queries, args.dim, args.seed = None, 1000, 384, 1234
    where = maybe_reexec_in_netns(Path(__file__), sys.argv[1:])
    log(f"network: {where}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
