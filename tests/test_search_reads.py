"""Turning a batch's index answers into documents (`node.storage.search.resolve`): from
`FEW_HITS` answers on, every document read once however many queries found it, the reads in
key order; on both paths (below it, hit by hit) the same answers: per query in the index's
order, a row ending at its first -1, keys of shards not held here and documents deleted since
left out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.model.documents import Hit, Incoming
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage import search
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import LABEL_BITS
from aquila.node.storage.search import label_keys, resolve
from aquila.node.storage.store import Store, label_key
from tests.datasets import load_sample

N = 400
SHARDS = 4


@pytest.fixture
async def coll(tmp_path: Path) -> AsyncIterator[Collection]:
    smp = load_sample()
    blocking = Blocking(2)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        spec = CollectionSpec("c", smp.dim, "cosine", SHARDS, 1, IndexSpec("flat"))
        c = await engine.ensure(spec, range(SHARDS), "u")
        by: dict[int, list[Incoming]] = {}
        for i, v in enumerate(smp.base[:N]):
            by.setdefault(shard_of(str(i), SHARDS), []).append(
                Incoming(str(i), v, b'{"i":%d}' % i, 1, "n"))
        await c.write(by)
        yield c
    finally:
        await engine.close()
        blocking.close()


@pytest.fixture(params=["arrays", "hit by hit"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test's batches resolved on arrays, then hit by hit."""
    monkeypatch.setattr(search, "FEW_HITS", 0 if request.param == "arrays" else 1 << 30)
    return str(request.param)


class Reads:
    """The keys of every multi-get a store is asked for."""

    def __init__(self, store: Store) -> None:
        self.calls: list[list[bytes]] = []
        self._raw = store.raw_records

    def __call__(self, keys: list[bytes]) -> list[bytes | None]:
        self.calls.append(list(keys))
        return self._raw(keys)


def _rows(rows: list[list[Hit]]) -> list[list[tuple[Any, ...]]]:
    return [[(h.id, h.score, h.metadata, h.vector, h.shard) for h in row] for row in rows]


def _index(coll: Collection, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from aquila.node.storage.index import prepare

    return coll.index.search(prepare(q, "cosine"), k, 1)


async def test_each_document_is_read_once_per_batch_in_key_order(
    coll: Collection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "FEW_HITS", 0)
    smp = load_sample()
    q = smp.queries[[0, 1, 0, 2, 0, 1]]  # queries 0 and 1 again: the same hits
    scores, keys = _index(coll, q, 10)
    alone = [resolve(coll, *_index(coll, q[i : i + 1], 10), False)[0] for i in range(len(q))]
    reads = Reads(coll.store)
    monkeypatch.setattr(coll.store, "raw_records", reads)
    rows = resolve(coll, scores, keys, False)
    assert _rows(rows) == _rows(alone)
    assert _rows(rows)[0] == _rows(rows)[2] == _rows(rows)[4] and len(rows[0]) == 10
    labels, docs = reads.calls  # ids by label, then the records by id: two multi-gets
    distinct = {int(x) for x in keys.reshape(-1)}
    assert len(labels) == len(set(labels)) == len(distinct) == len(docs) == len(set(docs))
    assert labels == sorted(labels)
    assert [h.metadata for h in rows[3]] == [b'{"i":%s}' % h.id.encode() for h in rows[3]]


async def test_stored_vectors_come_with_the_hits_when_asked(coll: Collection, path: str) -> None:
    smp = load_sample()
    q = smp.queries[[3, 3, 4]]
    scores, keys = _index(coll, q, 5)
    bare = resolve(coll, scores, keys, False)
    rows = resolve(coll, scores, keys, True)
    assert [[h.id for h in row] for row in rows] == [[h.id for h in row] for row in bare]
    assert all(h.vector == b"" for row in bare for h in row)
    for row in rows:
        for h in row:
            assert np.array_equal(np.frombuffer(h.vector, "<f4"), smp.base[int(h.id)])


async def test_a_row_ends_at_its_first_gap_and_foreign_shards_are_left_out(
    coll: Collection, path: str
) -> None:
    smp = load_sample()
    scores, keys = _index(coll, smp.queries[5:7], 6)
    foreign = (SHARDS + 3) << LABEL_BITS | 1  # a shard this node does not hold
    keys = keys.copy()
    keys[0, 2] = -1  # a gap: what follows it in the row is not an answer
    keys[1, 1] = foreign
    full = resolve(coll, *_index(coll, smp.queries[5:7], 6), False)
    rows = resolve(coll, scores, keys, False)
    assert _rows(rows) == [_rows(full)[0][:2], _rows(full)[1][:1] + _rows(full)[1][2:]]
    none = resolve(coll, scores[:, :0], keys[:, :0], False)
    assert none == [[], []]


async def test_documents_deleted_since_the_index_answered_are_left_out(
    coll: Collection, path: str
) -> None:
    smp = load_sample()
    q = smp.queries[[8, 9, 8]]
    scores, keys = _index(coll, q, 8)
    before = resolve(coll, scores, keys, False)
    gone = {before[0][1].id, before[1][0].id}
    await coll.write({shard_of(i, SHARDS): [Incoming(i, None, b"", 2, "n")] for i in gone})
    rows = resolve(coll, scores, keys, False)  # the answers read before the delete
    assert _rows(rows) == [[h for h in row if h[0] not in gone] for row in _rows(before)]


def test_label_keys_made_on_arrays_are_the_stores() -> None:
    pairs = [(0, 1), (3, 255), (65535, (1 << LABEL_BITS) - 1), (7, 1 << 32)]
    shards, labels = (np.array(x, np.int64) for x in zip(*pairs, strict=True))
    assert label_keys(shards, labels) == [label_key(s, lab) for s, lab in pairs]
    assert label_keys(shards[:0], labels[:0]) == []


async def test_both_paths_give_the_same_answers(
    coll: Collection, monkeypatch: pytest.MonkeyPatch
) -> None:
    smp = load_sample()
    q = smp.queries[[0, 1, 0, 2, 7]]
    scores, keys = _index(coll, q, 12)
    keys = keys.copy()
    keys[1, 4] = -1
    keys[2, 0] = (SHARDS + 1) << LABEL_BITS | 3
    answers = []
    for few in (0, 1 << 30):
        monkeypatch.setattr(search, "FEW_HITS", few)
        answers.append([_rows(resolve(coll, scores, keys, vectors)) for vectors in (False, True)])
    assert answers[0] == answers[1]
    assert sum(len(row) for row in answers[0][0]) > 40
