"""Live heap bytes by allocation site over time, from a heaptrack recording (issue 14's churn:
which allocations grow). heaptrack_print reports what is allocated at the end or at the peak;
a churn needs what grows between two moments of a steady state, so this reads the recording
itself: every allocation and free, in order, and the live bytes of each call stack every
`--step` seconds.

Record a node from after the first minute of a churn, then stop it with SIGKILL (a clean
stop frees everything first; the recording then ends with what was live):

    python scripts/bench_memory.py --churn 600 --keep &      # find the node's pid, then
    heaptrack -o /tmp/ht -p PID                               # after a minute of churn
    kill -9 PID                                               # a few minutes later
    python scripts/heaptrack_sites.py /tmp/ht.zst --between 60 120 --and 300 360

prints, for the sites whose live bytes grew the most from the first window to the second,
the least of each window (troughs: memtables and caches swing between flushes and
evictions) and the call stack's innermost frames. Only what was allocated after heaptrack
attached is seen. heaptrack's interpreted format: `s` strings, `i` instruction pointers
(module, then function/file/line triples), `t` trace nodes (ip, parent), `a` allocation
infos (size, trace), `+`/`-` an allocation or free of an info, `c` milliseconds; numbers
in hex.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Frames that only allocate: a site is named by the first frame past them.
ALLOCATORS = ("operator new", "malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc",
              "PyMem_", "_PyObject_Malloc", "PyObject_Malloc", "default_malloc",
              "PyDataMem_UserNEW", "std::__new_allocator", "__gnu_cxx::new_allocator")


@dataclass
class Recording:
    """A heaptrack recording read through: its call stacks and the live count of each
    allocation info at each snapshot."""

    strings: list[str] = field(default_factory=lambda: [""])  # 1-based
    ips: list[tuple[int, list[int]]] = field(default_factory=lambda: [(0, [])])  # 1-based
    traces: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])  # 0: the root
    sizes: list[int] = field(default_factory=list)
    trace_of: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)

    def frame(self, ip: int) -> str:
        module, functions = self.ips[ip]
        if functions:
            return self.strings[functions[0]]
        return "?" + self.strings[module].rsplit("/", 1)[-1]

    def site(self, trace: int, depth: int) -> str:
        """The call stack's `depth` innermost frames past the allocator's own."""
        out: list[str] = []
        while trace and len(out) < depth:
            ip, parent = self.traces[trace]
            name = self.frame(ip)
            if out or not name.startswith(ALLOCATORS):
                out.append(name)
            trace = parent
        return " <- ".join(out)

    def live_by_site(self, depth: int) -> tuple[list[str], np.ndarray]:
        """Site names and their live bytes at each snapshot (sites × snapshots)."""
        names = [self.site(t, depth) for t in self.trace_of]
        order = sorted(set(names))
        row = {n: i for i, n in enumerate(order)}
        weights = np.zeros((len(order), len(self.sizes)))
        for j, n in enumerate(names):
            weights[row[n], j] = self.sizes[j]
        cols = [weights @ np.pad(c, (0, len(self.sizes) - len(c))) for c in self.counts]
        return order, np.stack(cols, axis=1) if cols else np.zeros((len(order), 0))


def read(lines: Iterable[bytes], step: float) -> Recording:
    """A recording from the lines of heaptrack's interpreted output; a snapshot of the live
    counts every `step` seconds and at the end."""
    rec = Recording()
    live: list[int] = []
    due, now = step, 0.0
    for line in lines:
        tag = line[:1]
        if tag == b"+":
            live[int(line[2:], 16)] += 1
        elif tag == b"-":
            live[int(line[2:], 16)] -= 1
        elif tag == b"c":
            now = int(line[2:], 16) / 1000
            if now >= due:
                rec.times.append(now)
                rec.counts.append(np.array(live, np.int64))
                due = (now // step + 1) * step
        elif tag == b"a":
            size, trace = line[2:].split()
            rec.sizes.append(int(size, 16))
            rec.trace_of.append(int(trace, 16))
            live.append(0)
        elif tag == b"t":
            ip, parent = line[2:].split()
            rec.traces.append((int(ip, 16), int(parent, 16)))
        elif tag == b"i":
            parts = line[2:].split()
            rec.ips.append((int(parts[1], 16), [int(p, 16) for p in parts[2::3]]))
        elif tag == b"s":
            rec.strings.append(line[2:].rstrip(b"\n").decode(errors="replace").partition(" ")[2])
    rec.times.append(now)
    rec.counts.append(np.array(live, np.int64))
    return rec


def zstd_lines(path: Path) -> Iterator[bytes]:
    proc = subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE, bufsize=1 << 20)
    assert proc.stdout is not None
    yield from proc.stdout
    proc.wait()


def growth(times: np.ndarray, live: np.ndarray, first: tuple[float, float],
           second: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Each site's least live bytes within each window of time (troughs)."""
    a = (times >= first[0]) & (times < first[1])
    b = (times >= second[0]) & (times < second[1])
    if not a.any() or not b.any():
        raise ValueError("a window holds no snapshot")
    return live[:, a].min(axis=1), live[:, b].min(axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path, help="heaptrack's .zst (or .gz: decompress it first)")
    p.add_argument("--step", type=float, default=10.0, help="seconds between snapshots")
    p.add_argument("--depth", type=int, default=3, help="frames naming a site")
    p.add_argument("--between", type=float, nargs=2, required=True, metavar=("FROM", "TO"))
    p.add_argument("--and", dest="second", type=float, nargs=2, required=True,
                   metavar=("FROM", "TO"))
    p.add_argument("--top", type=int, default=20)
    a = p.parse_args()
    rec = read(zstd_lines(a.file), a.step)
    names, live = rec.live_by_site(a.depth)
    times = np.array(rec.times)
    lo, hi = growth(times, live, tuple(a.between), tuple(a.second))
    total = live.sum(axis=0)
    print(f"live heap (allocated since attach) at troughs: {lo.sum() / 2**20:.1f} -> "
          f"{hi.sum() / 2**20:.1f} MiB; at the end {total[-1] / 2**20:.1f} MiB")
    for i in np.argsort(lo - hi)[:a.top]:
        print(f"{lo[i] / 2**20:8.2f} -> {hi[i] / 2**20:8.2f} MiB  {names[i][:240]}")


if __name__ == "__main__":
    main()
