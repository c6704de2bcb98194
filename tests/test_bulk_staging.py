"""The column-by-column staging of upserts (node/storage/bulk.py) against the document-by-
document one it replaces for such batches (`Shard._prepare_distinct`): from the same history,
the same bytes stored under the same keys, the same digests, counters and index changes, for
new documents, newer and stale versions, ties broken by writer, and deleted documents
written again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aquila.cluster.model.digests import BUCKETS, digests
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.storage.bulk import be64_keys, stage_upserts
from aquila.node.storage.shard import IndexOps, Shard
from aquila.node.storage.store import Store, WriteBatch, change_key, label_key

DIM = 6
SPEC = CollectionSpec("c", DIM, "l2", 4, 1, IndexSpec("flat"))
Stager = Callable[[Shard, list[Incoming]], IndexOps]


def by_rows(shard: Shard, docs: list[Incoming]) -> IndexOps:
    batch = WriteBatch()
    ops = shard._prepare_distinct(docs, shard.store.get_records(shard.shard,
                                                                [d.id for d in docs]), batch)
    return commit(shard, batch, ops)


def by_columns(shard: Shard, docs: list[Incoming]) -> IndexOps:
    batch = WriteBatch()
    ops = shard.prepare_writes(docs, batch)  # upserts of distinct ids: the bulk path
    return commit(shard, batch, ops)


def commit(shard: Shard, batch: WriteBatch, ops: IndexOps) -> IndexOps:
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


def history(stage: Stager, path: Path) -> tuple[Shard, list[IndexOps]]:
    store = Store(path, fsync=False)
    store.open()
    shard = Shard(SPEC, 2, store)
    shard.load()
    first = [f"d{i}" for i in range(60)] + ["é-ü", "x" * 256]
    out = [stage(shard, docs(first, 100, seed=1))]
    # Deletes (the per-document path for both): d0..d9 become tombstones.
    by_rows(shard, [Incoming(f"d{i}", None, b"", 1000 + i, "n1") for i in range(10)])
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


def stored(store: Store) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in store.db.items()]


def test_columns_store_what_rows_store(tmp_path: Path) -> None:
    a, ops_a = history(by_rows, tmp_path / "rows")
    b, ops_b = history(by_columns, tmp_path / "columns")
    assert stored(a.store) == stored(b.store)
    assert (a.next_seq, a.next_label, a.count) == (b.next_seq, b.next_label, b.count)
    assert a.digests == b.digests
    for x, y in zip(ops_a, ops_b, strict=True):
        assert (x.remove, x.add_keys, x.add_meta, x.old_meta, x.gone, x.count_delta,
                x.applied, x.deleted, x.last_seq) == \
               (y.remove, y.add_keys, y.add_meta, y.old_meta, y.gone, y.count_delta,
                y.applied, y.deleted, y.last_seq)
        assert {k: v for k, v in x.digest_delta.items() if v} == \
               {k: v for k, v in y.digest_delta.items() if v}
        assert b"".join(x.add_vectors) == b"".join(y.add_vectors)
    # The kept digests are those of the records, as anti-entropy computes them from scratch.
    recs = [(i, r.version, r.writer) for i, r in b.store.iter_docs(b.shard)]
    assert [format(d, "032x") for d in b.digests] == digests(recs, BUCKETS)
    for s in (a, b):
        s.store.close()


def test_a_vector_of_another_dimension_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path, fsync=False)
    store.open()
    shard = Shard(SPEC, 0, store)
    shard.load()
    bad = docs(["a", "b"], 1) + [Incoming("c", np.ones(DIM + 1, "<f4"), b"{}", 9, "n1")]
    with pytest.raises(ValueError, match="dimension"):
        stage_upserts(IndexOps(), 0, DIM, 1, 1, bad, [None] * 3, WriteBatch())
    store.close()


def test_be64_keys() -> None:
    got = be64_keys(label_key(3, 0)[:3], np.array([1, 2**40 + 5], np.int64))
    assert got == [label_key(3, 1), label_key(3, 2**40 + 5)]
    assert be64_keys(change_key(1, 0)[:3], np.array([7])) == [change_key(1, 7)]
