"""The write path's batch helpers against their per-document definitions: a shard's kept
digests after new, newer, stale, tied and re-written deleted documents equal the digests
computed from its records from scratch; `shards_of` is `shard_of` for every id;
`vectors_within`'s whole-batch check agrees with the per-row one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aquila.cluster.model.bounds import MAX_VECTOR_VALUE, vectors_within
from aquila.cluster.model.digests import BUCKETS, digests
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.sharding import shard_of, shards_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.storage.shard import IndexOps, Shard
from aquila.node.storage.store import Store

DIM = 6
SPEC = CollectionSpec("c", DIM, "l2", 4, 1, IndexSpec("flat"))


def stage(shard: Shard, docs: list[Incoming]) -> IndexOps:
    batch = shard.store.batch()
    ops = shard.prepare_writes(docs, batch)
    shard.stage_totals(batch, [ops])
    shard.store.write(batch)
    shard.durable(ops)
    return ops


def docs(ids: list[str], version: int, writer: str = "n1", seed: int = 0,
         dtype: str = "<f4") -> list[Incoming]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(ids), DIM)).astype(dtype)
    return [Incoming(i, x[j], b'{"n":%d,"s":"%s"}' % (j, i.encode()), version + j, writer)
            for j, i in enumerate(ids)]


def history(path: Path) -> tuple[Shard, list[IndexOps]]:
    store = Store(path, fsync=False)
    store.open()
    shard = Shard(SPEC, 2, store)
    shard.load()
    first = [f"d{i}" for i in range(60)] + ["é-ü", "x" * 256]
    out = [stage(shard, docs(first, 100, seed=1))]
    # Deletes: d0..d9 become tombstones.
    stage(shard, [Incoming(f"d{i}", None, b"", 1000 + i, "n1") for i in range(10)])
    # New ids, newer versions, stale ones, a tie won by the writer, tombstones written again.
    mixed = (docs([f"n{i}" for i in range(15)], 5000, seed=2)
             + docs([f"d{i}" for i in range(5, 25)], 6000, seed=3)   # 5..9 were deleted
             + docs([f"d{i}" for i in range(25, 30)], 1, seed=4)     # stale
             + [Incoming("d30", np.ones(DIM, "<f4"), b"{}", 100 + 30, "n2")]  # tie: n2 > n1
             + [Incoming("d31", np.ones(DIM, "<f4"), b"{}", 100 + 31, "n0")])  # tie lost
    out.append(stage(shard, mixed))
    out.append(stage(shard, docs(["d40", "d41"], 1, seed=5)))  # stale only: changes nothing
    out.append(stage(shard, docs([f"f{i}" for i in range(7)], 9000, dtype="<f8")))  # cast
    return shard, out


def test_kept_digests_are_those_of_the_records(tmp_path: Path) -> None:
    shard, ops = history(tmp_path)
    assert [o.applied for o in ops] == [62, 15 + 20 + 1, 0, 7]
    recs = [(i, r.version, r.writer) for i, r in shard.store.iter_docs(shard.shard)]
    assert [format(d, "032x") for d in shard.digests] == digests(recs, BUCKETS)
    assert shard.store.digests(shard.shard, BUCKETS) == shard.digests  # as stored
    shard.store.close()


@pytest.mark.parametrize("shards", [1, 2, 7, 256, 1024])
def test_shards_of_is_shard_of(shards: int) -> None:
    ids = [f"doc-{i}" for i in range(500)] + ["é", "日本語", "x" * 256, "\x00"]
    assert shards_of(ids, shards) == [shard_of(i, shards) for i in ids]
    assert shards_of([], shards) == []


def test_vectors_within_whole_batch_agrees_with_rows() -> None:
    rng = np.random.default_rng(4)
    for bad in (np.nan, np.inf, -np.inf, MAX_VECTOR_VALUE * 2, -MAX_VECTOR_VALUE * 1.01, None):
        x = rng.standard_normal((50, 8)).astype(np.float32)
        if bad is not None:
            x[rng.integers(50), rng.integers(8)] = bad
        want = (np.abs(x) <= MAX_VECTOR_VALUE).all(axis=-1)
        assert vectors_within(x).tolist() == want.tolist()
    assert vectors_within(np.zeros((0, 8), np.float32)).shape == (0,)


def test_the_index_rows_of_a_write_are_its_vectors_as_float32(tmp_path: Path) -> None:
    """A write's rows for the index are its documents' own float32 rows (views of the batch,
    no copy kept per document), or their float32 copies when they are of another type or
    not contiguous; either way the same rows, in order."""
    store = Store(tmp_path, fsync=False)
    store.open()
    try:
        shard = Shard(SPEC, 1, store)
        shard.load()
        x = np.random.default_rng(9).standard_normal((5, 2 * DIM))
        rows = [x[0, :DIM].astype("<f4"),                    # a view of a float32 batch
                x[1, :DIM],                                   # float64: cast
                x[2, ::2].astype("<f4"),                      # contiguous copy
                np.asarray(x[3].astype("<f4")[::2]),          # float32, not contiguous
                x[4, :DIM].astype("<f4")]
        batch32 = np.stack([r.astype("<f4") for r in rows])
        rows[0] = batch32[0]  # a row of a batch's array, as the REST paths give
        ops = stage(shard, [Incoming(f"v{i}", r, b"{}", 10 + i, "n1")
                            for i, r in enumerate(rows)])
        assert any(isinstance(v, np.ndarray) for v in ops.add_vectors)
        np.testing.assert_array_equal(ops.vectors(DIM, "l2"), batch32)
        stored = [r.vector_array() for r in store.get_records(1, [f"v{i}" for i in range(5)])
                  if r is not None]
        np.testing.assert_array_equal(np.stack(stored), batch32)
    finally:
        store.close()
