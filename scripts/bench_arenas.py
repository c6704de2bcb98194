#!/usr/bin/env python3
"""What keeps Python's small-object arenas resident after a bulk load (issue 14): one node
(the worktree's code, or `--base DIR`'s) gets N seeded clustered vectors over REST as
`bench_memory.py` sends them; once trained and settled, the probe in scripts/arena_probe/
(loaded through PYTHONPATH: nothing in the node's code) writes the arenas' occupancy and the
objects in the mostly empty ones; the node is restarted and probed again. Printed: RSS, its
parts (`bench_memparts`), the arenas after the load and after the restart, the objects that
hold the mostly empty arenas (by where they were allocated, with `--tracemalloc N`), and,
with `--peaks`, the largest count of small blocks during the load and where they came from.

    python scripts/bench_arenas.py --n 200000 --tracemalloc 10 --peaks

tracemalloc slows the node down several times: for finding causes, not for figures."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from bench_common import COLLECTION, REPO_ROOT, log
from bench_memory import clustered, ingest, wait_settled
from bench_memparts import breakdown
from bench_node import Node, call, code_pythonpath, wait_ready

PROBE = REPO_ROOT / "scripts" / "arena_probe"


def probe(node: Node, prefix: str, name: str, timeout_s: float = 600) -> dict[str, Any]:
    """Signal the node's probe and read what it wrote (blocking: polls with a deadline)."""
    Path(prefix + ".next").write_text(name)
    out = Path(f"{prefix}{name}.json")
    out.unlink(missing_ok=True)
    node.signal(signal.SIGUSR2)
    deadline = time.monotonic() + timeout_s
    while not out.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no probe output {out}")
        time.sleep(0.2)
    return dict(json.loads(out.read_text()))


def read_peak(prefix: str) -> dict[str, Any] | None:
    peak = Path(prefix + "peak.json")
    return dict(json.loads(peak.read_text())) if peak.exists() else None


def arenas_line(d: dict[str, Any]) -> str:
    used = [round(v["used"] / 2**20, 2) for v in d["arenas"].values()]
    return (f"{d['arenas_seen']} arenas seen, {d['arenas_under_a_quarter']} under a quarter "
            f"used; MiB used per arena: {used}")


async def run(a: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="aquila-arenas-"))
    prefix = str(root / "probe-")
    x = clustered(a.n + 1, a.dim, a.seed)
    env = {"AQUILA_FSYNC": "true", "AQUILA_SNAPSHOT_INTERVAL_S": "5", "AQUILA_LOG_LEVEL": "INFO",
           "AQUILA_ARENA_PROBE": prefix}
    paths = [str(PROBE)] + ([code_pythonpath(a.base.resolve())] if a.base else [])
    env["PYTHONPATH"] = ":".join(paths)
    if a.tracemalloc:
        env["PYTHONTRACEMALLOC"] = str(a.tracemalloc)
    if a.peaks:
        env["AQUILA_ARENA_PROBE_PEAKS"] = "1"
    await asyncio.to_thread((root / "node").mkdir)
    node = Node(root / "node", root / "node.log", env)
    node.start()
    out: dict[str, Any] = {"n": a.n, "root": str(root)}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
            await wait_ready(s, node, 120)
            await call(s, "PUT", f"{node.base_url}/v1/collections/{COLLECTION}", orjson.dumps(
                {"dim": a.dim, "metric": "l2", "index": {"type": a.type}}))
            secs = await ingest(s, node.base_url, x[:a.n], a.batch, a.clients)
            out["ingest_docs_per_s"] = round(a.n / secs)
            await wait_settled(s, node.base_url, a.n)
            await asyncio.sleep(a.settle_s)
            out["parts_load"] = breakdown(node.pid, node.log_path)
            peak = await asyncio.to_thread(read_peak, prefix)
            if peak is not None:
                out["peak"] = peak
            out["load"] = await asyncio.to_thread(probe, node, prefix, "load")
            node.signal(signal.SIGTERM)
            await asyncio.to_thread(node.wait_exit, 300)
            node.start()
            await wait_ready(s, node, 600)
            await call(s, "POST", f"{node.base_url}/v1/collections/{COLLECTION}/search",
                       orjson.dumps({"vector": x[a.n].tolist(), "k": 10}))
            out["parts_restart"] = breakdown(node.pid, node.log_path)
            out["restart"] = await asyncio.to_thread(probe, node, prefix, "restart")
    finally:
        node.stop()
        if not a.keep:
            await asyncio.to_thread(shutil.rmtree, root, True)
    return out


def report(r: dict[str, Any]) -> str:
    lines = [f"n={r['n']:,} ingest {r['ingest_docs_per_s']:,} docs/s"]
    for k in ("load", "restart"):
        p = r[f"parts_{k}"]
        lines.append(f"after {k}: RSS {p['rss_mib']} MiB, Python's arenas "
                     f"{p.get('pymalloc_arenas_mib')} MiB ({p.get('pymalloc_blocks_mib')} in "
                     f"blocks); {arenas_line(r[k])}; a collection freed "
                     f"{r[k]['gc_collected']} objects")
    late = sorted(set(r["load"]["modules"]) - set(r["restart"]["modules"]))
    lines.append(f"modules imported after the load but not after the restart: {late}")
    lines.append("objects in the arenas under a quarter used after the load (count, bytes):")
    lines += [f"  {n:6} {b:8}  {k[:200]}" for k, n, b in r["load"]["in_sparse_arenas"][:25]]
    if "peak" in r:
        pk = r["peak"]
        lines.append(f"the load's peak: {pk['blocks']:,} small blocks; threads:")
        lines += [f"  {' <- '.join(st[:5])}" for st in pk["stacks"] if st]
        lines += [f"  {b:>10,} B  {w}" for w, b in pk.get("small_bytes_by_place", [])[:15]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--type", default="ivf_sq8")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--settle-s", type=float, default=8.0)
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    p.add_argument("--peaks", action="store_true")
    p.add_argument("--base", type=Path, help="the node of the code in DIR (see bench_memory)")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the node's folder and the probe's files")
    a = p.parse_args()
    r = asyncio.run(run(a))
    if a.json:
        a.json.write_text(json.dumps(r, indent=1, default=str))
    log(report(r))


if __name__ == "__main__":
    main()
