"""The arena probe of scripts/bench_arenas.py (scripts/arena_probe/sitecustomize.py), run in
this process: it reads pymalloc's pool headers, and finds the objects kept alone in arenas
otherwise emptied, by the place tracemalloc saw them allocated."""

from __future__ import annotations

import importlib.util
import json
import sys
import tracemalloc
from pathlib import Path
from types import ModuleType

import pytest

PROBE = Path(__file__).resolve().parent.parent / "scripts" / "arena_probe" / "sitecustomize.py"


def _probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("arena_probe_under_test", PROBE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not (3, 10) <= sys.version_info < (3, 13), reason="pool layout of 3.10-3.12")
def test_objects_left_alone_in_emptied_arenas_are_found_where_they_were_made(
        tmp_path: Path) -> None:
    tracemalloc.start(2)
    try:
        # About 60 MiB of small objects, one kept in every 5,000: their arenas are left
        # almost empty, each kept by a few of them.
        junk = [(i, str(i)) for i in range(400_000)]
        kept = junk[::5000]
        del junk
        out = tmp_path / "probe.json"
        _probe().dump(str(out))
        d = json.loads(out.read_text())
    finally:
        tracemalloc.stop()
    assert d["arenas_seen"] > 5
    assert all(0 < a["used"] <= 1 << 20 for a in d["arenas"].values())
    assert d["arenas_under_a_quarter"] >= 5
    here = [n for k, n, _ in d["in_sparse_arenas"]
            if k.startswith("tuple | ") and "test_arena_probe.py" in k.split(" <- ")[0]]
    assert sum(here) >= len(kept) // 2
