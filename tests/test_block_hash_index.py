"""The column families read key by key (records, ids by label, vectors) have a hash index in
each data block; the change log, only scanned, has none. Records, ids and vectors read back
from table files written with it are the ones written, a missing key is still a miss."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.store import CHANGES_CF, VECTORS_CF, doc_key

DIM = 4
SPEC = CollectionSpec("c", DIM, "l2", 1, 1, IndexSpec("flat"))
N = 2000


def _table_options(db: Path, family: str) -> str:
    options = sorted(db.glob("OPTIONS-*"))[-1].read_text()
    return options.split(f'[TableOptions/BlockBasedTable "{family}"]')[1].split("[")[0]


async def test_point_read_families_have_a_block_hash_index(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, range(1), "u")
        for lo in range(0, N, 500):
            await coll.write({0: [
                Incoming(f"doc-{i}", np.full(DIM, float(i), np.float32), b'{"i":%d}' % i, 1,
                         "w") for i in range(lo, lo + 500)]})
    finally:
        await engine.close()  # flushed: what follows reads table files
    db = tmp_path / "collections" / "c" / "db"
    for family in ("default", VECTORS_CF):
        assert "data_block_index_type=kDataBlockBinaryAndHash" in _table_options(db, family)
    assert "data_block_index_type=kDataBlockBinarySearch" in _table_options(db, CHANGES_CF)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        assert coll.store.db.live_files()  # the records are in table files
        ids = [f"doc-{i}" for i in range(N)]
        raws = coll.store.raw_records([doc_key(0, i) for i in ids])
        assert all(r is not None for r in raws)
        assert coll.store.raw_records([doc_key(0, f"doc-{N + i}") for i in range(50)]) == \
            [None] * 50
        for i in (0, 1, 777, N - 1):
            hits = await coll.search(np.full((1, DIM), float(i), np.float32), 1, None,
                                     with_vectors=True)
            hit = hits[0][0]
            assert (hit.id, hit.metadata) == (f"doc-{i}", b'{"i":%d}' % i)
            assert np.frombuffer(hit.vector, "<f4").tolist() == [float(i)] * DIM
    finally:
        await engine.close()
