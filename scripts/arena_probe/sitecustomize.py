"""A debug-only probe of Python's small-object arenas, loaded into a node by putting this
directory on its PYTHONPATH (`scripts/bench_arenas.py` does): nothing of it is in the node's
code. With AQUILA_ARENA_PROBE=PREFIX set:

- SIGUSR2 writes PREFIX<name>.json (name: the contents of PREFIX.next, else a counter): what
  a full collection frees, object counts by type, every pymalloc arena's pools and bytes in
  use (read from the pool headers of the objects reachable from the collector's lists), and,
  for the arenas under a quarter used, the objects in them grouped by type and, when
  tracemalloc traces (PYTHONTRACEMALLOC=N), by the innermost frames that allocated them: the
  objects that keep a mostly empty arena resident.
- AQUILA_ARENA_PROBE_PEAKS=1: a thread samples sys.getallocatedblocks() every 10 ms and, at
  each new peak 5% above the last, writes PREFIXpeak.json: the blocks, every thread's stack
  and, when tracing, the small allocations (<= 512 bytes) by where they were made.

The pool header layout is CPython 3.8-3.12's (obmalloc.c: count, freeblock, nextpool,
prevpool, arenaindex, szidx); pools are 16 KiB from 3.10 on."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

_POOL = 16384 if sys.version_info >= (3, 10) else 4096
_state = {"dumping": False, "count": 0}


def _where(tb: Any, frames: int = 4) -> str:
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in list(tb)[::-1][:frames])


def _mapped_ranges() -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if parts[1].startswith("rw") and len(parts) == 5:  # anonymous, writable
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return sorted(out)


def _reachable() -> dict[int, Any]:
    import gc

    seen: dict[int, Any] = {}
    stack = list(gc.get_objects())
    for o in stack:
        seen[id(o)] = o
    while stack:
        o = stack.pop()
        for r in gc.get_referents(o):
            if id(r) not in seen and not gc.is_tracked(r):
                seen[id(r)] = r
                stack.append(r)
    return seen


def dump(path: str) -> None:
    import bisect
    import collections
    import ctypes
    import gc
    import json
    import time
    import tracemalloc

    t0 = time.time()
    before = collections.Counter(type(o).__name__ for o in gc.get_objects())
    collected = gc.collect()
    after = collections.Counter(type(o).__name__ for o in gc.get_objects())
    ranges = _mapped_ranges()
    starts = [lo for lo, _ in ranges]

    def mapped(a: int) -> bool:
        i = bisect.bisect_right(starts, a) - 1
        return i >= 0 and ranges[i][0] <= a < ranges[i][1]

    seen = _reachable()
    pools: dict[int, tuple[int, int, int] | None] = {}
    members: dict[int, list[Any]] = collections.defaultdict(list)
    for addr, o in seen.items():
        try:
            if sys.getsizeof(o) > 512 + 16:
                continue
        except Exception:  # noqa: BLE001 - any object may refuse
            continue
        p = addr & ~(_POOL - 1)
        if p not in pools:
            head = None
            if mapped(p):
                count = ctypes.c_uint.from_address(p).value
                arena = ctypes.c_uint.from_address(p + 32).value
                szidx = ctypes.c_uint.from_address(p + 36).value
                if szidx < 32 and arena < 1 << 20 and 0 < count * (szidx + 1) * 16 <= _POOL:
                    head = (arena, szidx, count)
            pools[p] = head
        h = pools[p]
        if h is not None:
            members[h[0]].append(o)
    arenas: dict[int, dict[str, int]] = collections.defaultdict(lambda: {"pools": 0, "used": 0})
    for h in pools.values():
        if h is not None:
            arenas[h[0]]["pools"] += 1
            arenas[h[0]]["used"] += h[2] * (h[1] + 1) * 16
    tracing = tracemalloc.is_tracing()
    groups: collections.Counter[str] = collections.Counter()
    nbytes: collections.Counter[str] = collections.Counter()
    sparse = [a for a, i in arenas.items() if i["used"] < 256 << 10]
    for a in sparse:
        for o in members[a]:
            key = type(o).__name__
            tb = tracemalloc.get_object_traceback(o) if tracing else None
            if tb is not None:
                key += " | " + _where(tb)
            groups[key] += 1
            nbytes[key] += sys.getsizeof(o)
    out = {
        "gc_collected": collected,
        "gc_freed_by_type": {k: before[k] - after.get(k, 0) for k in before
                             if before[k] - after.get(k, 0) > 10},
        "objects": len(seen), "types": after.most_common(40),
        "arenas": {str(a): arenas[a] for a in sorted(arenas)},
        "arenas_seen": len(arenas), "arenas_under_a_quarter": len(sparse),
        "in_sparse_arenas": [(k, n, nbytes[k]) for k, n in groups.most_common(60)],
        "modules": sorted(sys.modules), "took_s": round(time.time() - t0, 1),
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    sys._debugmallocstats()


def _on_signal(signum: int, frame: Any) -> None:
    prefix = os.environ["AQUILA_ARENA_PROBE"]
    _state["dumping"] = True
    try:
        try:
            with open(prefix + ".next") as f:
                name = f.read().strip()
        except OSError:
            name = str(_state["count"])
        _state["count"] += 1
        dump(f"{prefix}{name}.tmp")
        os.replace(f"{prefix}{name}.tmp", f"{prefix}{name}.json")
    finally:
        _state["dumping"] = False


def _sample_peaks(prefix: str) -> None:
    import collections
    import json
    import threading
    import time
    import traceback
    import tracemalloc

    def run() -> None:
        best = 0
        me = threading.get_ident()
        while True:
            time.sleep(0.01)
            n = sys.getallocatedblocks()
            if _state["dumping"] or n <= best * 1.05:
                continue
            best = n
            # No source lines read (linecache would keep every file read, in the arenas).
            rec: dict[str, Any] = {"t": time.time(), "blocks": n, "stacks": [
                [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}"
                 for f in traceback.StackSummary.extract(traceback.walk_stack(fr), limit=8,
                                                         lookup_lines=False)]
                for tid, fr in sys._current_frames().items() if tid != me]}
            if tracemalloc.is_tracing():
                by: collections.Counter[str] = collections.Counter()
                for tr in tracemalloc.take_snapshot().traces:
                    if tr.size <= 512:
                        by[_where(tr.traceback, 3)] += tr.size
                rec["small_bytes_by_place"] = by.most_common(25)
            with open(prefix + "peak.json", "w") as f:
                json.dump(rec, f, indent=1)

    threading.Thread(target=run, daemon=True, name="arena-probe").start()


if os.environ.get("AQUILA_ARENA_PROBE"):
    signal.signal(signal.SIGUSR2, _on_signal)
    if os.environ.get("AQUILA_ARENA_PROBE_PEAKS"):
        _sample_peaks(os.environ["AQUILA_ARENA_PROBE"])
