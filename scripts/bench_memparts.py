"""Where a process's resident memory sits (issue 14): /proc/PID/smaps by kind of mapping, and
glibc's own figures and what `malloc_trim(0)` would give back, read through gdb (the process
is stopped for a moment: only at rest).

    python scripts/bench_memparts.py PID [--log NODE_LOG] [--trim]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from bench_node import rss_mib_of

_MAP = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def smaps_parts(pid: int) -> dict[str, float]:
    """MiB resident by kind: `files` (libraries and other mapped files: clean, shared, the
    kernel may drop them), `heap` (the main arena's brk heap), `arenas` (glibc's other
    arenas: 64 MiB reservations), `stacks` (thread stacks: 8 MiB maps with a guard page),
    `anon_big` (other anonymous maps of 1 MiB and more: malloc's mapped blocks, Python's
    arenas), `anon_small` (the rest). A glibc arena's heap is a map of up to 64 MiB that
    starts on a 64 MiB boundary (the part not yet used is a map without access, not
    resident): so they are told apart."""
    out = dict.fromkeys(("files", "heap", "arenas", "stacks", "anon_big", "anon_small"), 0.0)
    size, start, name, guard_before = 0, 0, "", False
    last_perm = ""
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        m = _MAP.match(line)
        if m:
            start = int(m.group(1), 16)
            size = (int(m.group(2), 16) - start) >> 10
            guard_before = last_perm == "---p"
            last_perm, name = m.group(3), m.group(4).strip()
            continue
        if not line.startswith("Rss:"):
            continue
        mib = int(line.split()[1]) / 1024
        if name.startswith("/") or name.startswith("anon_inode"):
            kind = "files"
        elif name == "[heap]":
            kind = "heap"
        elif name.startswith("[stack"):
            kind = "stacks"
        elif name:
            kind = "anon_small"
        elif guard_before and size in (8188, 8192, 8184):
            kind = "stacks"
        elif start % (64 << 20) == 0 and size <= 64 << 10:
            # (no larger: a block mapped apart that lands on a 64 MiB boundary is not one)
            kind = "arenas"
        elif size >= 1024:
            kind = "anon_big"
        else:
            kind = "anon_small"
        out[kind] += mib
    return {k: round(v, 1) for k, v in out.items()}


def _gdb(pid: int, *commands: str) -> bool:
    gdb = shutil.which("gdb")
    if gdb is None:
        return False
    argv = [gdb, "-p", str(pid), "-batch", "-nx"]
    for c in commands:
        argv += ["-ex", c]
    return subprocess.run(argv, capture_output=True, timeout=120).returncode == 0


def _printed(pid: int, log: Path, command: str, end: str) -> str:
    """What `command` (a gdb call) made the process print to its stderr (the node's log)."""
    before = log.stat().st_size if log.exists() else 0
    if not _gdb(pid, command):
        return ""
    text = ""
    for _ in range(50):
        with log.open("rb") as f:
            f.seek(before)
            text = f.read().decode(errors="replace")
        if end in text:
            break
        time.sleep(0.1)
    return text


def malloc_stats(pid: int, log: Path) -> dict[str, float]:
    """glibc's `malloc_info()` of the process, over every arena: MiB the arenas hold from
    the system (`malloc_heap`), of it free (`malloc_free`: chunks a trim may give back in
    whole pages), the blocks mapped apart now (`malloc_mapped`), and the arenas' count."""
    text = _printed(pid, log, "call (int)malloc_info(0, *(void**)&stderr)", "</malloc>")
    tail = text[text.rfind("</heap>"):] if "</heap>" in text else ""
    out: dict[str, float] = {}
    sizes = {k: int(v) for k, v in re.findall(
        r'<(?:total|system) type="(fast|rest|mmap|current)" (?:count="\d+" )?size="(\d+)"',
        tail)}
    if "current" in sizes:
        out["malloc_heap_mib"] = round(sizes["current"] / 2**20, 1)
        out["malloc_free_mib"] = round((sizes.get("fast", 0) + sizes.get("rest", 0)) / 2**20, 1)
        out["malloc_mapped_mib"] = round(sizes.get("mmap", 0) / 2**20, 1)
    out["malloc_arenas"] = len(re.findall(r"<heap nr=", text))
    return out


def pymalloc_stats(pid: int, log: Path) -> dict[str, float]:
    """Python's small-object allocator (`sys._debugmallocstats`, printed to the process's
    stderr): MiB of its arenas (1 MiB each, given back only once empty) and of the blocks in
    use in them."""
    text = _printed(pid, log, "call (int)_PyObject_DebugMallocStats(*(void**)&stderr)",
                    "bytes in allocated blocks")
    out: dict[str, float] = {}
    for key, pat in (("arenas", r"# arenas allocated current\s*=\s*([\d,]+)"),
                     ("blocks", r"# bytes in allocated blocks\s*=\s*([\d,]+)")):
        m = re.search(pat, text)
        if m:
            n = int(m.group(1).replace(",", ""))
            out[f"pymalloc_{key}_mib"] = float(n) if key == "arenas" else round(n / 2**20, 1)
    return out


def trim_gain(pid: int) -> float:
    """MiB of RSS `malloc_trim(0)` gives back now (called in the process through gdb)."""
    before = rss_mib_of(pid)
    if not _gdb(pid, "call (int)malloc_trim(0)"):
        return float("nan")
    return round(before - rss_mib_of(pid), 1)


def breakdown(pid: int, log: Path | None, trim: bool = False) -> dict[str, object]:
    """RSS, its parts by mapping, glibc's figures (when the log is known) and, with `trim`,
    what a trim then gives back (this changes the process: last)."""
    out: dict[str, object] = {"rss_mib": round(rss_mib_of(pid), 1), **smaps_parts(pid)}
    with contextlib.suppress(OSError):
        out["threads"] = len(list(Path(f"/proc/{pid}/task").iterdir()))
    if log is not None:
        out.update(malloc_stats(pid, log))
        out.update(pymalloc_stats(pid, log))
    if trim:
        out["trim_gain_mib"] = trim_gain(pid)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pid", type=int)
    p.add_argument("--log", type=Path, help="the process's stderr file (for malloc_stats)")
    p.add_argument("--trim", action="store_true", help="then malloc_trim(0) and its gain")
    a = p.parse_args()
    print(json.dumps(breakdown(a.pid, a.log, a.trim)))


if __name__ == "__main__":
    main()
