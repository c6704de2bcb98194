"""What FAISS's hash table direct map cost, against the node's own label → list map
(issue 14): removal time per key and reconstruction time, in one process on the same index,
and the index's resident memory after loading its snapshot, in fresh processes.

    nice -n 5 .venv/bin/python scripts/bench_direct_map.py [--n 1000000] [--dim 96]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.storage.index import LABEL_BITS, VectorIndex, choose_nlist, global_keys
from aquila.node.storage.training import limit_arenas, release_memory

faiss: Any = _faiss
SHARDS = 8


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def keys_for(n: int) -> np.ndarray:
    labels = np.arange(n, dtype=np.int64)
    return global_keys(0, labels // SHARDS) + ((labels % SHARDS) << LABEL_BITS)


def child(kind: str, path: Path) -> None:
    """Print the resident memory the index adds once loaded (old: with the hash table the
    node used to set; new: with the label → list map built), with the node's malloc settings;
    freed memory is given back before each reading."""
    limit_arenas()
    release_memory()
    base = rss()
    loaded = VectorIndex.load(path, SHARDS)
    assert loaded is not None
    index = loaded[0]
    release_memory()
    after_load = rss()
    if kind == "old":
        index.index.set_direct_map_type(faiss.DirectMap.Hashtable)
    elif kind == "legacy":  # a snapshot the old code wrote: the hash table dropped at load
        for s in range(SHARDS):
            index.lists_of(s)
    else:
        for s in range(SHARDS):
            index.lists_of(s)
    release_memory()
    done = rss()
    print(f"{kind} {index.ntotal} {after_load - base} {done - base}")


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--child", choices=["old", "new", "legacy"])
    ap.add_argument("--path", type=Path)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.path)
        return
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.n, a.dim)).astype(np.float32)
    keys = keys_for(a.n)
    spec = CollectionSpec("b", a.dim, "l2", SHARDS, 1, IndexSpec("ivf_sq8"))
    nlist = choose_nlist(a.n, None)
    t0 = time.perf_counter()
    ours = VectorIndex.new_ivf(spec, nlist, a.n)
    ours.index.train(x[rng.choice(a.n, min(a.n, 64 * nlist), replace=False)])
    ours.add(x, keys)
    print(f"built: {a.n} vectors, dim {a.dim}, ivf_sq8, {nlist} lists, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.snap"
        ours.save(path, {s: 0 for s in range(SHARDS)})
        legacy = Path(tmp) / "legacy.snap"
        ours.index.set_direct_map_type(faiss.DirectMap.Hashtable)
        ours.save(legacy, {s: 0 for s in range(SHARDS)})
        ours.index.set_direct_map_type(faiss.DirectMap.NoMap)
        for kind in ("old", "new", "legacy", "old", "new", "legacy"):
            snap = legacy if kind == "legacy" else path
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--path", str(snap)],
                                 check=True, capture_output=True, text=True).stdout.split()
            n, loaded, total = (int(v) for v in out[1:])
            print(f"RSS {kind}: load +{loaded / 2**20:.1f} MiB, with its "
                  f"{'hash table' if kind == 'old' else 'label map'} +{total / 2**20:.1f} MiB "
                  f"({(total - loaded) / n:.1f} B/vector over the codes)", flush=True)
    old = faiss.clone_index(ours.index)
    t = timed(lambda: old.set_direct_map_type(faiss.DirectMap.Hashtable))
    print(f"hash table built: {t * 1e3:.0f} ms", flush=True)
    t = timed(lambda: [ours.lists_of(s) for s in range(SHARDS)])
    print(f"label map built from the lists: {t * 1e3:.0f} ms", flush=True)
    order = rng.permutation(a.n)
    for count in (1000, 1000, 100_000):
        pick = keys[order[:count]]
        order = order[count:]
        t_new = timed(lambda pick=pick: ours.remove(pick))
        t_old = timed(lambda pick=pick: old.remove_ids(ours.ids(pick)))
        assert ours.ntotal == old.ntotal
        print(f"remove {count}: hash table {t_old / count * 1e6:.2f} µs/key, "
              f"label map {t_new / count * 1e6:.2f} µs/key "
              f"(ratio {t_new / t_old:.1f})", flush=True)
    for count in (100, 100, 100, 10_000, 10_000):
        if len(order) < count:
            break
        pick = keys[order[:count]]
        order = order[count:]
        t_new = timed(lambda pick=pick: ours.vectors_of(pick))
        t_old = timed(lambda pick=pick: old.reconstruct_batch(ours.ids(pick)))
        assert np.array_equal(ours.vectors_of(pick), old.reconstruct_batch(ours.ids(pick)))
        print(f"vectors_of {count}: hash table {t_old / count * 1e6:.2f} µs/key, "
              f"label map {t_new / count * 1e6:.2f} µs/key", flush=True)

if __name__ == "__main__":
    main()
