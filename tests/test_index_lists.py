"""An IVF index's map from a shard's labels to the inverted list holding each vector (what a
filtered search counts its matches by list with) stays the lists' own truth through deletes
and writes, at two bytes a label ever given."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from aquila.cluster.model.documents import Incoming
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import LABEL_BITS
from tests.conftest import settled
from tests.small_ivf import SPEC, doc


def truth(coll: Collection, size: int) -> np.ndarray:
    """Per label of shard 0, its list as the index's own lists say (-1: none)."""
    out = np.full(size, -1, np.int64)
    ivf, inv = coll.index.index, coll.index.index.invlists
    for no in range(ivf.nlist):
        n = inv.list_size(no)
        if n:
            keys = coll.index.keys(faiss.rev_swig_ptr(inv.get_ids(no), n).copy())
            out[keys & ((1 << LABEL_BITS) - 1)] = no
    return out


async def trained(engine: Engine) -> Collection:
    """The small IVF collection on `engine`, 150 documents written and trained on."""
    coll = await engine.ensure(SPEC, [0], "u")
    await coll.write({0: [doc(i) for i in range(150)]})
    await settled(coll, what="training")
    return coll


async def test_the_label_to_list_map_follows_deletes_and_writes(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await trained(engine)
        lists = coll.index.lists_of(0)  # built from the lists, then kept current
        assert lists.dtype == np.int16
        assert (lists.astype(np.int64) == truth(coll, len(lists))).all()

        gone = [Incoming(f"d{i}", None, b"", 2, "n1") for i in range(0, 150, 3)]
        await coll.write({0: gone})
        await coll.write({0: [doc(i) for i in range(150, 400)]})
        await settled(coll, what="the index to settle")
        lists = coll.index.lists_of(0)
        given = coll.shards[0].next_label
        assert (lists.astype(np.int64) == truth(coll, len(lists))).all()
        assert (lists >= 0).sum() == coll.count() == 400 - 50
        # Grown by a quarter at a time, over the labels given (not doubled past them).
        assert given <= len(lists) <= max(16, given * 5 // 4 + 1), (given, len(lists))
        assert lists.nbytes == 2 * len(lists)
    finally:
        await engine.close()


async def test_a_restarted_node_has_its_map_before_the_first_write(
    tmp_path: Path, blocking: Blocking
) -> None:
    """Built at the start, not by the first write (under the lock every search waits for)."""
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await trained(engine)
        await coll.snapshot()
    finally:
        await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = engine.get("s")
        assert coll.index.trained and coll.index._lists is not None
        assert np.array_equal(coll.index.lists_of(0)[1:151], truth(coll, 151)[1:])
    finally:
        await engine.close()
