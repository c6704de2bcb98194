"""Training at many lists (node.storage.training): two-level k-means keeps the recall of flat
k-means at equal nprobe, every index type trains and calibrates with it, its snapshots load,
and a stop between chunks still ends the training. Correctness only; the timings are in
scripts/bench_training.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.storage import training
from aquila.node.storage.index import VectorIndex, global_keys, prepare
from aquila.node.storage.training import (
    shares,
    train_quantizer,
    train_streamed,
    two_level_centroids,
)

# Lists of the indexes here; two-level k-means from this count on (the node's threshold,
# 4,096 lists, would need sets too large for a test: the code is the same).
NLIST = 1024


@pytest.fixture(autouse=True)
def two_levels_from_nlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "TWO_LEVEL_FROM", NLIST)


def blobs(n: int, dim: int, seed: int) -> np.ndarray:
    """Seeded Gaussian blobs (√n of them) around random centres, as scripts/bench_memory.py
    makes them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((int(np.sqrt(n)), dim)).astype(np.float32)
    return (centres[rng.integers(0, len(centres), n)]
            + 0.7 * rng.standard_normal((n, dim)).astype(np.float32))


def recall_at(index: VectorIndex, q: np.ndarray, truth: np.ndarray, nprobe: int) -> float:
    _, keys = index.search(q, 10, nprobe)
    return float(np.mean([len(set(k) & set(t)) / 10 for k, t in zip(keys, truth, strict=True)]))


def test_shares_split_in_proportion_and_never_beyond_the_points() -> None:
    got = shares(np.array([600, 300, 100, 0]), 10)
    assert got.tolist() == [6, 3, 1, 0]
    got = shares(np.array([5, 3, 1000]), 100)
    assert got.sum() == 100 and got[1] <= 3 and got[0] <= 5 and got[2] >= 92
    got = shares(np.array([2, 2]), 4)
    assert got.tolist() == [2, 2]
    assert shares(np.array([2, 1]), 5).tolist() == [2, 1]  # fewer points than lists: all


def test_two_level_centroids_leave_no_list_without_points() -> None:
    x = blobs(40_000, 16, 1)
    cp = faiss.ClusteringParameters()
    cp.niter = 10
    plain = two_level_centroids(x, NLIST, cp, faiss.METRIC_L2)
    refined = two_level_centroids(x, NLIST, cp, faiss.METRIC_L2, x[: 32 * NLIST], 3)
    assert plain.shape == refined.shape == (NLIST, 16)
    _, a = faiss.knn(x, refined, 1)
    sizes = np.bincount(a[:, 0], minlength=NLIST)
    assert (sizes == 0).sum() <= NLIST // 100, (sizes == 0).sum()
    with pytest.raises(ValueError):
        two_level_centroids(x[:100], NLIST, cp, faiss.METRIC_L2)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_two_level_training_keeps_the_recall_of_flat_kmeans(metric: str) -> None:
    """At equal nprobe, recall@10 of an index whose lists come from two-level k-means is
    within 0.02 of one trained by FAISS's flat k-means on the same sample."""
    n, dim = 60_000, 32
    x = prepare(blobs(n + 200, dim, 2), metric)
    x, q = x[:n], x[n:]
    spec = CollectionSpec("c", dim, metric, 1, 1, IndexSpec("ivf_flat"))
    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    _, rows = faiss.knn(q, x, 10, metric=mt)
    truth = global_keys(0, rows)
    rng = np.random.default_rng(0)
    sample = x[np.sort(rng.choice(n, 40 * NLIST, replace=False))]
    got = {}
    for how in ("flat", "two-level"):
        index = VectorIndex.new_ivf(spec, NLIST, n)
        if how == "flat":
            index.index.train(sample)
        else:
            train_quantizer(index.index, sample, metric, np.random.default_rng(0))
        index.add(x, global_keys(0, np.arange(n)))
        got[how] = [recall_at(index, q, truth, p) for p in (4, 8, 16)]
    assert all(t >= f - 0.02 for f, t in zip(got["flat"], got["two-level"], strict=True)), got
    assert got["two-level"][-1] > 0.8, got  # a real index, not one list holding everything


def chunked(x: np.ndarray, size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for lo in range(0, len(x), size):
        yield x[lo: lo + size], global_keys(0, np.arange(lo, min(lo + size, len(x))))


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_sq8", "ivf_pq"])
def test_every_type_trains_in_two_levels_calibrates_and_survives_a_snapshot(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n, dim = 30_000, 32
    x = prepare(blobs(n, dim, 3), "l2")
    spec = CollectionSpec("c", dim, "l2", 1, 1, IndexSpec(kind, nlist=NLIST))
    calls: list[int] = []

    def counted(*args: Any) -> np.ndarray:
        calls.append(args[1])
        return two_level_centroids(*args)

    monkeypatch.setattr(training, "two_level_centroids", counted)
    index = train_streamed(spec, n, lambda: chunked(x))
    assert calls == [NLIST]  # the lists came from the two levels
    assert index is not None and index.trained and index.nlist == NLIST
    assert index.ntotal == n and index.trained_at == n
    # Calibrated (ivf_pq's codes alone rank its answers: recall well below the others'; its
    # 4-bit codes of 4 bytes here reach 0.29 on these blobs).
    assert index.curve and index.curve[-1][1] >= (0.25 if kind == "ivf_pq" else 0.9), index.curve
    # The quantizer is a flat index as before: the snapshot format is unchanged.
    assert isinstance(faiss.downcast_index(index.index.quantizer), faiss.IndexFlat)
    q = x[:20]
    scores, keys = index.search(q, 10, 16)
    if kind != "ivf_pq":
        assert (keys[:, 0] == global_keys(0, np.arange(20))).mean() >= 0.9
    index.save(tmp_path / "snap", {0: 7})
    loaded = VectorIndex.load(tmp_path / "snap", 1)
    assert loaded is not None
    back, covered = loaded
    assert covered == {0: 7} and back.curve == index.curve and back.nlist == NLIST
    # ivf_flat's snapshot leaves the vectors to the store (AQIX5): refilled from them here.
    assert (back.pending is not None) == (kind == "ivf_flat")
    if back.pending is not None:
        assert back.refill(chunked(x)) == 0 and back.ntotal == n
    s2, k2 = back.search(q, 10, 16)
    assert (k2 == keys).all() and np.allclose(s2, scores)


class Stopped(Exception):
    pass


def test_a_stop_in_the_second_pass_ends_the_training() -> None:
    """The collection stops a training by raising from its chunks (TrainingStopped on
    close): after the two-level k-means too, the next chunk ends it."""
    n, dim = 20_000, 16
    x = blobs(n, dim, 4)
    spec = CollectionSpec("c", dim, "l2", 1, 1, IndexSpec("ivf_flat", nlist=NLIST))
    passes = []

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        passes.append(0)
        for i, chunk in enumerate(chunked(x)):
            if len(passes) == 2 and i == 1:
                raise Stopped
            yield chunk

    with pytest.raises(Stopped):
        train_streamed(spec, n, chunks)
    assert len(passes) == 2


def test_the_calibration_stops_where_more_probes_find_nothing_more() -> None:
    """Half of each query's true neighbours can never be found (keys the index does not
    hold, as a compressed index's codes miss some): the curve stops rising, and the ladder
    stops two steps later instead of going on to every list."""
    n, dim = 4000, 16
    x = blobs(n, dim, 5)
    spec = CollectionSpec("c", dim, "l2", 1, 1, IndexSpec("ivf_flat"))
    index = VectorIndex.new_ivf(spec, 64, n)
    index.index.train(x)
    keys = global_keys(0, np.arange(n))
    index.add(x, keys)
    q = x[:50]
    _, rows = faiss.knn(q, x, 11)
    truth = keys[rows]
    truth[:, 6:] = global_keys(0, np.arange(10**6, 10**6 + 250).reshape(50, 5))  # absent
    curve = index.calibrate_against(q, keys[:50], truth)
    assert curve[-1][1] == pytest.approx(0.5, abs=0.01), curve
    assert curve[-1][0] < 64 and curve[-1][1] == curve[-3][1], curve
    assert index.nprobe_for(0.99) == curve[-1][0]  # the best it measured
