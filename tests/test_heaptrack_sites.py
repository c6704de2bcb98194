"""scripts/heaptrack_sites.py: live bytes by allocation site over time, read from heaptrack's
interpreted format (a recording written here by hand, not by heaptrack, which the suite does
not need)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import heaptrack_sites  # noqa: E402


def recording() -> list[bytes]:
    """Two sites under `malloc`: `cache_insert` (1 KiB blocks, one more live every second)
    and `request` (4 KiB, allocated and freed every second: flat); 10 seconds."""
    head = [
        "s 9 libfoo.so", "s 6 malloc", "s c cache_insert", "s 7 request", "s 6 main.c",
        "s 4 main",
        "i 1000 1 2 5 1", "i 2000 1 3 5 2", "i 3000 1 4 5 3", "i 4000 1 6 5 4",
        # trace 3: malloc <- cache_insert <- main; trace 5: malloc <- request <- main
        "t 4 0", "t 2 1", "t 1 2", "t 3 1", "t 1 4",
        "a 400 3", "a 1000 5",  # info 0: 1 KiB from trace 3; info 1: 4 KiB from trace 5
    ]
    body: list[str] = []
    for second in range(1, 11):
        body += ["+ 0", "+ 1", "- 1", f"c {second * 1000:x}"]
    return [(line + "\n").encode() for line in head + body]


def test_the_growing_site_is_told_from_the_flat_one() -> None:
    rec = heaptrack_sites.read(recording(), step=1.0)
    names, live = rec.live_by_site(depth=1)
    assert names == ["cache_insert", "request"]  # named past the allocator's frame
    times = np.array(rec.times)
    lo, hi = heaptrack_sites.growth(times, live, (1, 3), (8, 11))
    assert lo.tolist() == [1024, 0] and hi.tolist() == [8 * 1024, 0]
    assert live[:, -1].tolist() == [10 * 1024, 0]


def test_deeper_sites_carry_their_callers_and_snapshots_follow_the_step() -> None:
    rec = heaptrack_sites.read(recording(), step=5.0)
    names, live = rec.live_by_site(depth=2)
    assert names == ["cache_insert <- main", "request <- main"]
    assert rec.times == [5.0, 10.0, 10.0]  # every 5 s, and the end
    assert live[0].tolist() == [5 * 1024, 10 * 1024, 10 * 1024]
