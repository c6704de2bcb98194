"""The arena probe of scripts/bench_arenas.py (scripts/arena_probe/sitecustomize.py), run in
a process of its own: it reads pymalloc's pool headers, and finds the objects kept alone in arenas
otherwise emptied, by the place tracemalloc saw them allocated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parent.parent / "scripts" / "arena_probe" / "sitecustomize.py"


WORKLOAD = """
import importlib.util, sys, tracemalloc
tracemalloc.start(2)
# About 60 MiB of small objects, one kept in every 5,000: their arenas are left almost
# empty, each kept by a few of them.
junk = [(i, str(i)) for i in range(400_000)]
kept = junk[::5000]
del junk
spec = importlib.util.spec_from_file_location("arena_probe_under_test", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.dump(sys.argv[2])
print(len(kept))
"""


@pytest.mark.skipif(not (3, 10) <= sys.version_info < (3, 13), reason="pool layout of 3.10-3.12")
def test_objects_left_alone_in_emptied_arenas_are_found_where_they_were_made(
        tmp_path: Path) -> None:
    """In a process of its own: the probe walks every object reachable, and this test
    process's heap after the rest of the suite is large (30-40 s to walk, 2 s alone)."""
    script = tmp_path / "arena_workload.py"
    script.write_text(WORKLOAD)
    out = tmp_path / "probe.json"
    run = subprocess.run([sys.executable, str(script), str(PROBE), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    kept = int(run.stdout.split()[-1])
    d = json.loads(out.read_text())
    assert d["arenas_seen"] > 5
    assert all(0 < a["used"] <= 1 << 20 for a in d["arenas"].values())
    assert d["arenas_under_a_quarter"] >= 5
    here = [n for k, n, _ in d["in_sparse_arenas"]
            if k.startswith("tuple | ") and "arena_workload.py" in k.split(" <- ")[0]]
    assert sum(here) >= kept // 2
