"""Python's cyclic garbage collector on a node: what it costs, and the start's objects kept
out of its sight.

A full collection walks every object the collector tracks, and holds the GIL (so the event
loop and every search thread) while it does: 25 ms for the 47,000 objects of a node's engine
alone, every 1.5 s under 8 callers of batches of 100 queries (in process, WordNet 50k,
nprobe 64: each request's rows and hits live through a few young collections, reach the old
generation, and die there, which is what triggers full ones). Nearly all of those objects
are the start's: modules, the app and its routes, the collections' state, kept for the
process's life. `freeze` moves them to the permanent generation once the node is ready;
full collections then walk only what came after (0.4 ms each; the collector's CPU 1.25% of
the search's -> 0.43%: `scripts/bench_engine.py --spin 15 [--freeze]`).

What is frozen is never collected: a reference cycle through it stays. None holds a
collection now (a dropped one is freed by its count), and a collection that closes lets its
index go itself (`Collection.close`), so one that did would keep only small objects.

`watch` times each collection by generation (`figures`, for /metrics)."""

from __future__ import annotations

import gc
import time
from typing import Any

_GENERATIONS = 3
_spent = [0.0] * _GENERATIONS
_started = [0.0]


def _timed(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        generation = int(info.get("generation", 0))
        if 0 <= generation < _GENERATIONS:
            _spent[generation] += time.perf_counter() - _started[0]


def watch() -> None:
    """Time every collection from now on (once a process: a second call adds nothing)."""
    if _timed not in gc.callbacks:
        gc.callbacks.append(_timed)


def freeze() -> int:
    """Collect what is garbage now, then move every object left to the permanent generation
    (never collected, never walked again; an object of it freed by its count is still
    freed). For a server process once it has started, not for one that runs many apps in
    turn (a test's): what those leave behind would stay. Returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def figures() -> dict[str, Any]:
    """Collections and seconds spent in them (since `watch`) by generation, and the objects
    frozen."""
    return {
        "collections": [int(s["collections"]) for s in gc.get_stats()],
        "seconds": list(_spent),
        "frozen": gc.get_freeze_count(),
    }
