"""bench_memory's split of a node's RSS (scripts/bench_memparts.py) and its bytes per vector:
checked on this process, whose memory the test changes by known amounts."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from bench_memory import per_vector, swaps_during, time_of_day  # noqa: E402
from bench_memparts import breakdown, smaps_parts  # noqa: E402


def test_a_mapped_block_counts_with_the_anonymous_maps_and_libraries_as_files() -> None:
    before = smaps_parts(os.getpid())
    block = np.ones(64 << 18, np.float32)  # 64 MiB, touched: a block mapped apart
    after = smaps_parts(os.getpid())
    # numpy aligns a block this big on 2 MiB: 1 time in 32 it starts on a 64 MiB boundary,
    # where only the map's address tells a glibc arena's heap, and it is counted as one.
    assert after["anon_big"] - before["anon_big"] >= 60 or after["arenas"] - before["arenas"] >= 60
    assert after["files"] > 5  # libpython, numpy's libraries
    assert abs(sum(after.values()) - breakdown(os.getpid(), None)["rss_mib"]) < 8
    del block


def test_bytes_per_vector_take_a_fresh_node_and_the_block_cache_off() -> None:
    fresh = {"malloc_heap_mib": 15.0, "malloc_free_mib": 1.0, "malloc_mapped_mib": 1.0}
    after = {"malloc_heap_mib": 400.0, "malloc_free_mib": 10.0, "malloc_mapped_mib": 50.0}
    # 440 MiB in use, less 15 (fresh) and 2 (the cache): 423 MiB over 1M vectors.
    assert per_vector(fresh, after, {"budget_used": 2.0}, 1_000_000) == round(
        423 * 2**20 / 1e6, 1)
    assert per_vector({}, after, {}, 10) is None


def test_the_swaps_of_a_churn_are_counted_from_its_start_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    before = "x INFO bench: trained (nlist=894) node=n\n"
    log.write_text(before + "x INFO bench: index lists compacted (50000 vectors) node=n\n"
                   "x INFO bench: trained (nlist=900) node=n\n"
                   "x INFO bench: index lists compacted (50500 vectors) node=n\n")
    assert swaps_during(log, len(before)) == {"lists_compactions": 2, "trainings": 1}
    assert swaps_during(log, 0)["trainings"] == 2


def test_a_settle_wait_past_its_limit_fails_or_reports_the_index_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_memory

    desc = {"count": 10, "shard_states": [
        {"index_state": "training", "index": {"retrain_at": 8}}]}
    calls: list[str] = []

    async def call(session: object, method: str, url: str, body: object = None) -> object:
        calls.append(url)
        return desc

    async def due(session: object, url: str) -> bool:
        return False

    monkeypatch.setattr(bench_memory, "call", call)
    monkeypatch.setattr(bench_memory, "compaction_due", due)
    with pytest.raises(RuntimeError):
        asyncio.run(bench_memory.wait_settled(None, "u", 10, 0.0))  # type: ignore[arg-type]
    got = asyncio.run(bench_memory.wait_settled(None, "u", 10, 0.0, True))  # type: ignore[arg-type]
    assert got["unsettled"] and got["count"] == 10
    # Not every row written yet: never reported as measured, whatever the flag.
    with pytest.raises(RuntimeError):
        asyncio.run(bench_memory.wait_settled(None, "u", 11, 0.0, True))  # type: ignore[arg-type]
    # Settled: returned as it is, unmarked.
    desc["shard_states"] = [{"index_state": "trained", "index": {"retrain_at": 20}}]
    got = asyncio.run(bench_memory.wait_settled(None, "u", 10, 0.0, True))  # type: ignore[arg-type]
    assert "unsettled" not in got


def test_the_settle_limit_ends_by_the_time_of_day_given() -> None:
    import time

    import bench_memory

    args = bench_memory.parse_args(["--settle-timeout", "100"])
    assert bench_memory.settle_limit(args) == 100.0
    now = time.gmtime(time.time() + 3 * 3600)  # three hours on, past midnight or not
    args = bench_memory.parse_args(["--settle-timeout", str(24 * 3600),
                                    "--settle-by", f"{now.tm_hour:02d}:{now.tm_min:02d}"])
    assert 3 * 3600 - 120 <= bench_memory.settle_limit(args) <= 3 * 3600


def test_a_time_of_day_is_the_next_one() -> None:
    """--ingest-by 00:40 given at 23:30 is 70 minutes away, not 23 hours ago."""
    import time

    now = time.time()
    for minutes_ahead in (1, 70, 23 * 60):
        at = time.gmtime(now + minutes_ahead * 60)
        got = time_of_day(f"{at.tm_hour:02d}:{at.tm_min:02d}")
        assert now < got <= now + minutes_ahead * 60, minutes_ahead
        assert got > now + minutes_ahead * 60 - 60


def test_churn_figures_give_the_climb_a_million_deletes_from_every_sample() -> None:
    from bench_memory import churn_figures

    # 2 MiB a million deletes after the first minute, with the memtables' swing on top.
    series = [{"t": t, "deleted": 10_000 * t, "memtables": 4.0 * (t % 40 == 0),
               "rss": 100.0 + 0.02 * t + 4.0 * (t % 40 == 0)} for t in range(0, 600, 20)]
    got = churn_figures(series)
    assert got["rss_mib_per_million_deletes_after_first_minute"] == pytest.approx(2.0, abs=0.1)
    assert got["rss_mib_at_first_minute"] == 101.2
    flat = [dict(r, rss=150.0) for r in series]
    assert churn_figures(flat)["rss_mib_per_million_deletes_after_first_minute"] == 0.0
    # Too few samples after the minute, or no deletes among them: no line.
    assert "rss_mib_per_million_deletes_after_first_minute" not in churn_figures(series[:4])
    still = [dict(r, deleted=0) for r in series]
    assert "rss_mib_per_million_deletes_after_first_minute" not in churn_figures(still)
