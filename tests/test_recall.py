"""Search by target recall (contract v2 `"recall"`): the calibration curve measured when the
index trains (monotone, kept in the snapshot), the nprobe it picks reaching the target on
held-out queries (the WordNet sample's own queries, not stored), the answer naming the nprobe
per shard, and bad targets refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.cluster.model.bounds import BoundsError
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.recall import check_target, checked_curve, ladder, monotone, nprobe_for
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.cluster.replication.reads import nprobes_used
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import Node, expect_error, wait_for
from tests.datasets import load_sample, recall_at_k

SHARDS = 2


def test_curve_math() -> None:
    assert ladder(1) == [1] and ladder(3) == [1, 2, 3]
    assert ladder(283) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 283]
    curve = monotone([(4, 0.8), (1, 0.5), (2, 0.79), (8, 0.78), (16, 1.0)])
    assert curve == [(1, 0.5), (2, 0.79), (4, 0.8), (8, 0.8), (16, 1.0)]
    assert nprobe_for(curve, 0.5) == 1 and nprobe_for(curve, 0.8) == 4
    assert nprobe_for(curve, 0.95) == 16 and nprobe_for([], 0.9) == 1
    assert nprobe_for([(1, 0.3), (2, 0.6)], 0.99) == 2  # never reached: every list
    for bad in (0, 0.49, 1, 1.5, -1, float("nan"), float("inf"), True, "0.9", None, [0.9]):
        with pytest.raises(BadRequest):
            check_target(bad)
    assert check_target(0.95) == 0.95 and check_target(0.5) == 0.5
    for raw in ("x", [[1]], [[0, 0.5]], [[1, 2.0]], [[True, 0.5]], [[1, 0.5]] * 65):
        with pytest.raises(BoundsError):
            checked_curve(raw)
    assert checked_curve([[2, 0.9], [1, 0.95]]) == [(1, 0.95), (2, 0.95)]


async def load(root: Path, blocking: Blocking, itype: str = "ivf_flat"
               ) -> tuple[Engine, Collection]:
    smp = load_sample()
    engine = Engine(root, blocking, Tuning(), fsync=False)
    await engine.start()
    spec = CollectionSpec("c", smp.dim, "cosine", SHARDS, 1, IndexSpec(itype, None, 4))
    coll = await engine.ensure(spec, range(SHARDS), "u")
    by: dict[int, list[Incoming]] = {}
    for i, v in enumerate(smp.base):
        by.setdefault(shard_of(str(i), SHARDS), []).append(Incoming(str(i), v, b"{}", 1, "n"))
    await coll.write(by)
    await wait_for(lambda: coll.state == "trained" and bool(coll.index.curve), 60,
                   what="the index to train")
    return engine, coll


@pytest.mark.parametrize("itype", ["ivf_flat", "ivf_sq8"])
async def test_chosen_nprobe_reaches_the_target_on_held_out_queries(
    tmp_path: Path, blocking: Blocking, itype: str
) -> None:
    smp = load_sample()
    engine, coll = await load(tmp_path, blocking, itype)
    curve = coll.index.curve
    nprobes = [n for n, _ in curve]
    recalls = [r for _, r in curve]
    assert nprobes == sorted(set(nprobes)) and nprobes[0] == 1
    assert recalls == sorted(recalls) and recalls[0] < 0.9 < recalls[-1]
    for target in (0.8, 0.9, 0.95):
        plans: dict[int, dict[str, Any]] = {}
        rows = await coll.search(smp.queries, 10, None, plans=plans, recall=target)
        chosen = coll.index.nprobe_for(target)
        # The smallest nprobe of the curve that reached it.
        assert chosen == min(n for n, r in curve if r >= target)
        assert {p["nprobe"] for p in plans.values()} == {chosen}
        got = recall_at_k([[int(h.id) for h in row] for row in rows], smp.gt_I, 10)
        assert got >= target - 0.02, (target, chosen, got, curve)
        if chosen > 1:  # and the step below it would not have been enough on the sample
            below = nprobes[nprobes.index(chosen) - 1]
            assert dict(curve)[below] < target
    await engine.close()

    # The curve is kept with the snapshot: a restart answers with the same probes.
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    again = engine.get("c")
    assert again.index.trained and again.index.curve == curve
    info = again.shard_states()[0]["index"]
    assert info["recall_curve"] == [[n, r] for n, r in curve]
    # Trained on all 5,000: nlist is what 5,000 calls for, until twice as many.
    assert info["trained_at"] == 5000 and info["retrain_at"] == 10_000
    assert info["nlist"] == info["nlist_target"] == 283
    await engine.close()


async def test_exact_index_answers_any_target_with_one_probe(
    tmp_path: Path, blocking: Blocking
) -> None:
    smp = load_sample()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(CollectionSpec("f", smp.dim, "cosine", 1, 1, IndexSpec("flat")),
                               [0], "u")
    await coll.write({0: [Incoming(str(i), v, b"{}", 1, "n")
                          for i, v in enumerate(smp.base[:500])]})
    plans: dict[int, dict[str, Any]] = {}
    await coll.search(smp.queries[:5], 10, None, plans=plans, recall=0.999)
    assert "nprobe" not in plans[0]  # no lists probed: the answer says the whole index, 1
    assert nprobes_used(plans) == {"nprobe": 1, "nprobes": [{"shard": 0, "node": "",
                                                             "nprobe": 1}]}
    await engine.close()


async def test_rest_search_by_recall_names_its_nprobe(node: Node) -> None:
    smp = load_sample()
    await node.create("r", smp.dim, metric="cosine", index="ivf_flat", shards=2)
    await node.upsert_matrix("r", smp.base[:2000], batch=500)
    desc = await node.wait_trained("r", 60)

    async def calibrated() -> dict[str, Any] | None:
        d = await node.describe("r")
        return d if all(s.get("index", {}).get("recall_curve") for s in d["shard_states"]) \
            else None

    desc = await wait_for(calibrated, 60, what="the curve in the description")
    curve = desc["shard_states"][0]["index"]["recall_curve"]
    assert [r for _, r in curve] == sorted(r for _, r in curve)
    want = nprobe_for([(n, r) for n, r in curve], 0.9)
    out = await node.search("r", vectors=smp.queries[:3].tolist(), k=5, recall=0.9)
    assert out["nprobe"] == want
    assert [p["shard"] for p in out["nprobes"]] == [0, 1]
    assert {p["nprobe"] for p in out["nprobes"]} == {want}
    assert len(out["results"]) == 3 and "plans" not in out
    # With explain too, the plans say it as well.
    out = await node.search("r", vector=smp.queries[0].tolist(), recall=0.9, explain=True)
    assert {p["nprobe"] for p in out["plans"]} == {want}
    # A search without recall says nothing of probes (as before).
    assert "nprobe" not in await node.search("r", vector=smp.queries[0].tolist())
    q = smp.queries[0].tolist()
    for bad in ({"recall": 1.5}, {"recall": 0}, {"recall": 1}, {"recall": "0.9"},
                {"recall": True}, {"recall": 0.9, "nprobe": 4}, {"recall": [0.9]}):
        resp = await node.post_json("/v1/collections/r/search", {"vector": q, **bad})
        await expect_error(resp, 400, "bad_request")
    assert (await node.describe("r"))["count"] == 2000  # and the node is still serving


def test_peer_codec_carries_the_target() -> None:
    from aquila.cluster.model.operations import SearchRequest
    from aquila.cluster.replication.remote import decode_search, encode_search

    spec = CollectionSpec("c", 4, "l2", 2, 1, IndexSpec("ivf_flat"))
    req = SearchRequest(np.ones((1, 4), np.float32), 3, None, None, None, True, False, True,
                        None, recall=0.95)
    body = orjson.loads(orjson.dumps(encode_search(req, [0, 1])))
    got, shards = decode_search(body, spec)
    assert got.recall == 0.95 and got.nprobe is None and shards == [0, 1]
    with pytest.raises(BadRequest):
        decode_search({**body, "recall": 7}, spec)


async def test_compressed_indexes_rerank_to_ivf_flat_recall(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ivf_sq8 and ivf_pq search more candidates than asked and re-rank them with the stored
    vectors: at the same nprobe they reach ivf_flat's recall, which their codes alone do not
    (ivf_pq's least of all), and the scores they answer with are the exact ones."""
    from aquila.node.storage import search

    smp = load_sample()
    got: dict[tuple[str, bool], float] = {}
    for itype in ("ivf_flat", "ivf_sq8", "ivf_pq"):
        engine, coll = await load(tmp_path / itype, blocking, itype)
        for rerank in (True, False):
            with monkeypatch.context() as m:
                if not rerank:
                    m.setattr(search, "OVERSAMPLE", {})
                rows = await coll.search(smp.queries, 10, 16)
            got[itype, rerank] = recall_at_k([[int(h.id) for h in row] for row in rows],
                                             smp.gt_I, 10)
            if rerank and itype != "ivf_flat":  # re-ranked: the exact scores, in order
                for q, row in zip(smp.queries, rows, strict=True):
                    exact = [float(q @ smp.base[int(h.id)]) for h in row]
                    assert [h.score for h in row] == pytest.approx(exact, abs=1e-4)
                    assert [h.score for h in row] == sorted((h.score for h in row),
                                                            reverse=True)
        await engine.close()
    flat = got["ivf_flat", True]
    assert got["ivf_flat", False] == flat  # nothing to re-rank
    for itype in ("ivf_sq8", "ivf_pq"):
        assert got[itype, True] >= flat - 0.01, got
    assert got["ivf_pq", False] < flat - 0.1, got  # the codes alone misrank
