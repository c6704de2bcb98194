"""py-spy on the server during an extra c=max search run: top frames overall and on the
event-loop thread, and CPU cores per server thread from /proc."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from bench_common import log
from bench_data import Dataset
from bench_load import search_point
from bench_node import Node, thread_cpu_of

# Leaves that mean "waiting", which py-spy may not recognise as idle inside containers.
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py:81)",)
LOOP_LEAF = "Runner.run (asyncio/runners.py:118)"


def summarise_collapsed(path: Path, top: int = 20) -> dict[str, Any]:
    """Top frames (self and inclusive, idle waits left out) overall and for the event-loop
    thread, from py-spy's raw (collapsed) output recorded with --threads."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    main_self: Counter[str] = Counter()
    thread_busy: Counter[str] = Counter()
    tids: dict[int, str] = {}
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        m = re.match(r"thread \((\w+)\): ?(.*)", frames[0])
        thread = frames[0]
        if m:
            thread = m.group(2) or m.group(1)
            with contextlib.suppress(ValueError):
                tids[int(m.group(1))] = thread
            frames = frames[1:]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        if leaf in IDLE_LEAVES:
            idle += count
            continue
        if leaf == LOOP_LEAF:
            leaf = "<event loop in uvloop (C): epoll wait, socket I/O, callbacks>"
        thread_busy[thread] += count
        self_c[leaf] += count
        if thread == "MainThread":
            main_self[leaf] += count
        for f in set(frames):
            incl_c[f] += count

    busy = max(1, total - idle)

    def fmt(c: Counter[str], of: int) -> list[dict[str, Any]]:
        return [
            {"frame": f, "samples": n, "pct": round(100 * n / max(1, of), 1)}
            for f, n in c.most_common(top)
        ]

    return {
        "samples": total,
        "idle_samples_left_out": idle,
        "self": fmt(self_c, busy),
        "inclusive": fmt(incl_c, busy),
        "main_thread_self": fmt(main_self, sum(main_self.values())),
        "threads": fmt(thread_busy, busy),
        "tids": tids,
    }


def pyspy_exe() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


async def profile_server(
    session: aiohttp.ClientSession, node: Node, ds: Dataset, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    exe = pyspy_exe()
    if exe is None:
        log("py-spy not installed (pip install py-spy): no profile")
        return {"error": "py-spy not installed"}
    out = tmp / "pyspy.txt"
    cmax = max(args.concurrency)
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(node.pid),
        "--duration",
        str(int(args.profile)),
        "--rate",
        "100",
        "--format",
        "raw",
        "--threads",
        "--output",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    cpu0 = thread_cpu_of(node.pid)
    t0 = time.perf_counter()
    try:
        deadline = time.perf_counter() + args.profile + 30
        n = 0
        while proc.returncode is None and time.perf_counter() < deadline:
            await search_point(
                session, node, ds, args.profile_nprobe, cmax, min(500, args.queries), 0
            )
            n += 1
        async with asyncio.timeout(60):
            spy_out = (await proc.communicate())[0].decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if not out.exists():
        return {"error": spy_out[-2000:]}
    wall = time.perf_counter() - t0
    cpu1 = thread_cpu_of(node.pid)
    summary = summarise_collapsed(out)
    names: dict[int, str] = summary.pop("tids")
    per_thread: Counter[str] = Counter()
    for tid, c in cpu1.items():
        per_thread[names.get(tid, f"tid {tid}")] += c - cpu0.get(tid, 0.0)
    summary["thread_cpu_cores"] = {
        name: round(c / wall, 3) for name, c in per_thread.most_common() if c > 0
    }
    summary["wall_s"] = wall
    summary["nprobe"] = args.profile_nprobe
    summary["concurrency"] = cmax
    keep = args.out.with_suffix(".pyspy.txt")
    shutil.copy(out, keep)
    summary["raw_file"] = str(keep)
    log(f"py-spy: {summary['samples']} samples over {n} runs of 500 queries -> {keep}")
    return summary


async def profile_pids(
    pids: dict[str, int], seconds: float, out_dir: Path, load: Callable[[], Awaitable[Any]]
) -> dict[str, Any]:
    """py-spy on several processes (name → pid) at once while `load()` runs again and again
    for `seconds`: per process, the top frames (as `summarise_collapsed`)."""
    exe = pyspy_exe()
    if exe is None:
        log("py-spy not installed (pip install py-spy): no profile")
        return {"error": "py-spy not installed"}
    procs = {}
    for name, pid in pids.items():
        procs[name] = await asyncio.create_subprocess_exec(
            exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
            "--format", "raw", "--threads", "--nonblocking", "--output",
            str(out_dir / f"pyspy-{name}.txt"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
    out: dict[str, Any] = {}
    try:
        deadline = time.perf_counter() + seconds + 30
        while any(p.returncode is None for p in procs.values()) \
                and time.perf_counter() < deadline:
            await load()
        for p in procs.values():
            async with asyncio.timeout(60):
                await p.communicate()
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()
    for name in procs:
        raw = out_dir / f"pyspy-{name}.txt"
        if raw.exists():
            summary = summarise_collapsed(raw, top=30)
            summary.pop("tids")
            out[name] = summary
    return out
