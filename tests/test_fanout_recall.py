"""What a request's `nprobe` and `recall` mean across nodes, on real indexes (each node's
engine: RocksDB and FAISS) in the in-process cluster, the WordNet sample in 6 shards.

Each node keeps one IVF index over the shards it holds, with lists chosen from its own size:
at 3 nodes each index holds about a third of the vectors in about 1/√3 as many lists.
- An explicit `nprobe` is per index: every node probes that many lists of its own index, so a
  cluster scans more of the data than one node (about √3× at 3 nodes) and its recall is never
  below one node's.
- A `recall` target is met by each node with its own measured curve, for its share of the
  k best (`model.recall.share_top`): the cluster scans about
  what one node scans for that recall (each node the probes its smaller index needs), and
  still reaches at least one node's recall.
"""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.model.bounds import BoundsError
from aquila.cluster.model.operations import DocBatch, SearchRequest
from aquila.cluster.model.recall import checked_rank_curve, curve_at, nprobe_for, share_top
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.backend import EngineBackend
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import CALIBRATION_K, VectorIndex, prepare
from tests.conftest import wait_for
from tests.datasets import load_sample, recall_at_k
from tests.simcluster import SimCluster

SHARDS = 6
NPROBES = (4, 8, 16, 32)
TARGETS = (0.8, 0.9, 0.95)


async def measured(n: int, root: Path, blocking: Blocking) -> dict[tuple[str, float], Any]:
    """Recall@10 and the probes used per request, on an n-node cluster of real engines."""
    smp = load_sample()
    sim = SimCluster(n)
    engines = []
    async with AsyncExitStack() as stack:
        for node in sim.nodes.values():
            # Trained at last on all of a node's vectors, the steady state: any growth calls
            # for a retraining, which waits until the writes pause (see the writes below).
            engine = Engine(root / node.id, blocking,
                            Tuning(train_min=1000, retrain_growth=1.01), fsync=False)
            await engine.start()
            stack.push_async_callback(engine.close)
            engines.append(engine)
            node.storage = EngineBackend(engine)
        await sim.start()
        stack.push_async_callback(sim.stop)
        svc = sim.node("n1").svc
        await sim.run(svc.collections.create(
            CollectionSpec("c", smp.dim, "cosine", SHARDS, 1, IndexSpec("ivf_flat"))))
        entry = svc.collections.entry("c")
        ids = [str(i) for i in range(len(smp.base))]
        metas = [b"{}"] * len(ids)
        # Plain awaits from here: the sim's clock stays still while FAISS works on threads.
        # In parts (the in-memory network runs each peer's side on this loop), back to back:
        # the retraining after the first waits for them to pause, and takes them all.
        for at in range(0, len(ids), 500):
            part = slice(at, at + 500)
            await svc.writes.upsert(entry, DocBatch(ids[part], smp.base[part], metas[part], "all"))

        def trained() -> bool:
            colls = [e.collections["c"] for e in engines if "c" in e.collections]
            return len(colls) == n and all(
                c.state == "trained" and bool(c.index.curve) and c.index.trained_at == c.count()
                for c in colls)

        await wait_for(trained, 120, what="every node's index trained on all its vectors")
        out: dict[tuple[str, float], Any] = {}
        requests = [("nprobe", float(p)) for p in NPROBES] + [("recall", t) for t in TARGETS]
        for mode, value in requests:
            req = SearchRequest(
                vectors=smp.queries, k=10, nprobe=int(value) if mode == "nprobe" else None,
                filter=None, predicate=None, include_metadata=False, include_vector=False,
                allow_partial=False, timeout_ms=None,
                recall=value if mode == "recall" else None)
            found: list[list[int]] = []
            chose: dict[str, int] = {}
            for at in range(0, len(smp.queries), 50):  # a few queries a request, as above
                answer = await svc.reads.search(
                    entry, dataclasses.replace(req, vectors=smp.queries[at : at + 50]))
                found += [[int(h["id"]) for h in row] for row in answer["results"]]
                # A search by recall names the probes each node chose for its shards.
                chose |= {p["node"]: p["nprobe"] for p in answer.get("nprobes", [])}
            # Share of the vectors scanned: per node, its probes over its lists, by its size.
            scanned = 0.0
            for node_id, e in zip(sim.nodes, engines, strict=True):
                coll = e.collections["c"]
                probes = int(value) if mode == "nprobe" else chose[node_id]
                scanned += min(probes, coll.index.nlist) / coll.index.nlist * coll.count()
            out[(mode, value)] = {"recall": recall_at_k(found, smp.gt_I, 10),
                                  "scanned": scanned / len(smp.base),
                                  "nlists": [e.collections["c"].index.nlist for e in engines]}
    return out


async def test_three_nodes_reach_one_nodes_recall_for_the_same_request(
    tmp_path: Path, blocking: Blocking
) -> None:
    one = await measured(1, tmp_path / "one", blocking)
    three = await measured(3, tmp_path / "three", blocking)
    assert len(three[("nprobe", 4.0)]["nlists"]) == 3
    # Each of three indexes has fewer lists than the one index of all the vectors.
    assert max(three[("nprobe", 4.0)]["nlists"]) < one[("nprobe", 4.0)]["nlists"][0]
    for key in one:
        a, b = one[key], three[key]
        if key[0] == "nprobe":
            assert b["recall"] >= a["recall"], (key, a, b)
            # The same nprobe scans more at three nodes (√3×): recall bought with work.
            assert b["scanned"] > 1.6 * a["scanned"], (key, a, b)
        else:
            # A target recall costs the cluster about what it costs one node (each node
            # its probes from its own curve, whose steps are up to 1.5× apart), and the
            # cluster meets it on held-out queries as one node does (within 0.005 of one
            # node's recall: each node's curve is measured on its own training sample, drawn
            # from its vectors in label order, and a step of it is a few queries' hits).
            assert b["scanned"] <= 1.5 * a["scanned"], (key, a, b)
            assert b["recall"] >= key[1] - 0.01, (key, b)
            assert b["recall"] >= a["recall"] - 0.005, (key, a, b)


def test_share_of_the_best_and_recall_at_m() -> None:
    assert share_top(10, 8, 8) == 10 and share_top(10, 3, 8) == 4 and share_top(10, 2, 6) == 4
    assert share_top(1, 1, 8) == 1 and share_top(100, 1, 3) == 34
    by_rank = [(1, [0.9, 0.5, 0.1]), (2, [1.0, 0.8, 0.3]), (4, [1.0, 1.0, 0.9])]
    assert curve_at(by_rank, 1) == [(1, 0.9), (2, 1.0), (4, 1.0)]
    assert curve_at(by_rank, 3) == [(1, 0.5), (2, 0.7), (4, 0.9667)]
    assert nprobe_for(curve_at(by_rank, 1), 0.95) == 2 and nprobe_for(curve_at(by_rank, 3), 0.9) == 4
    assert checked_rank_curve([[2, [0.5, 1]], [1, [0.1, 0.2]]], 2) == [(1, [0.1, 0.2]),
                                                                       (2, [0.5, 1.0])]
    for raw in ("x", [[1]], [[1, [0.5]]], [[0, [0.5, 0.5]]], [[1, [0.5, 2]]],
                [[1, [True, 0.5]]], [[True, [0.5, 0.5]]], [[1, [0.5, 0.5]]] * 65):
        with pytest.raises(BoundsError):
            checked_rank_curve(raw, 2)


def test_calibration_by_rank_is_kept_in_the_snapshot(tmp_path: Path) -> None:
    smp = load_sample()
    spec = CollectionSpec("c", smp.dim, "cosine", 1, 1, IndexSpec("ivf_flat"))
    x = prepare(smp.base[:2000], "cosine")
    index = VectorIndex.train_ivf(spec, x, np.arange(2000, dtype=np.int64))
    index.calibrate(x, np.arange(2000, dtype=np.int64), "cosine")  # shard 0: key = label
    assert [n for n, _ in index.by_rank] == [n for n, _ in index.curve]
    assert index.curve[0][1] < 0.8 and index.curve[-1][1] > 0.99
    # recall@10 is the mean over ranks; the nearest are found first: fewer probes for top 1.
    for (_, shares), (_, r10) in zip(index.by_rank, index.curve, strict=True):
        assert len(shares) == CALIBRATION_K and abs(sum(shares) / len(shares) - r10) < 0.01
    for target in (0.8, 0.9, 0.95):
        assert index.nprobe_for(target, 1) <= index.nprobe_for(target, 4) \
            <= index.nprobe_for(target) == nprobe_for(index.curve, target)
    index.save(tmp_path / "snap", {0: 1})
    loaded = VectorIndex.load(tmp_path / "snap", 1)
    assert loaded is not None
    assert loaded[0].by_rank == index.by_rank and loaded[0].curve == index.curve
