"""ivf_pq is FAISS's 4-bit fast-scan IVF index (codes packed in blocks of 32), written by the
node itself: through deletes, upserts and new documents it holds exactly the stored vectors'
labels and codes; it survives a snapshot; filtered and shard-subset searches answer only what
they admit; and a snapshot of the 8-bit `IndexIVFPQ` the node made before still loads and
serves, until the next training makes the new type."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np
import orjson
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import (
    VectorIndex,
    fast_scan_m,
    global_key,
    prepare,
)
from aquila.node.storage.packed_lists import PackedLists
from aquila.node.storage.store import Record
from tests.conftest import settled, wait_for
from tests.datasets import load_sample, recall_at_k
from tests.test_filtered_search import FILTERS, PATHS, SHARDS, load, metadata

faiss: Any = _faiss


def test_sub_quantizers_of_four_dimensions_where_they_divide() -> None:
    assert fast_scan_m(384) == 96 and fast_scan_m(768) == 192 and fast_scan_m(32) == 8
    assert fast_scan_m(6) == 2  # 3 dimensions each
    assert fast_scan_m(75) == 25  # 3 or 5 dimensions: the finer
    assert fast_scan_m(7) == 7 and fast_scan_m(67) == 67  # a prime: one dimension each


def by_shard(docs: list[Incoming]) -> dict[int, list[Incoming]]:
    out: dict[int, list[Incoming]] = {}
    for d in docs:
        out.setdefault(shard_of(d.id, SHARDS), []).append(d)
    return out


def stored(coll: Collection) -> dict[int, tuple[str, np.ndarray]]:
    """Global key → id and stored vector of every live document (blocking: call on a
    thread)."""
    out: dict[int, tuple[str, np.ndarray]] = {}
    for s in coll.shards:
        for doc, rec in coll.store.iter_docs(s):
            r: Record = rec
            if not r.tombstone:
                out[global_key(s, r.label)] = (doc, np.frombuffer(r.vector, np.float32))
    return out


def check_holds_the_store(coll: Collection) -> None:
    """The index holds the live documents' keys, each once, with the codes of its stored
    vector (blocking: call on a thread)."""
    live = stored(coll)
    index = coll.index
    keys = index.all_keys()
    assert len(keys) == len(set(keys.tolist())) == index.ntotal
    assert sorted(keys.tolist()) == sorted(live)
    assert sorted(keys.tolist()) == sorted(
        np.concatenate([sh.keys() for sh in coll.shards.values()]).tolist())
    want = np.array(sorted(live), dtype=np.int64)
    x = prepare(np.stack([live[k][1] for k in want.tolist()]), coll.spec.metric)
    decoded = index.index.sa_decode(index.index.sa_encode(x))
    assert np.array_equal(index.vectors_of(want), decoded)


async def test_churn_keeps_exactly_the_stored_labels_and_codes(
    tmp_path: Path, blocking: Blocking
) -> None:
    smp = load_sample()
    engine, coll = await load(tmp_path, blocking, "ivf_pq")
    try:
        index = coll.index
        assert isinstance(index.index, faiss.IndexIVFPQFastScan)
        assert index.index.bbs == 32 and smp.dim // 4 == index.index.M
        assert index.index.direct_map.type == faiss.DirectMap.NoMap
        await asyncio.to_thread(check_holds_the_store, coll)
        rng = np.random.default_rng(1)
        live = {str(i) for i in range(len(smp.base))}
        for version in range(2, 6):
            ids = rng.permutation(sorted(live))
            gone, moved = ids[:400].tolist(), ids[400:700].tolist()
            born = [f"n{version}-{j}" for j in range(150)]
            back = [str(i) for i in rng.choice(len(smp.base), 100)
                    if str(i) not in live]  # deleted in an earlier round: written again
            docs = [Incoming(d, None, b"", version, "n") for d in gone]
            for d in [*moved, *born, *back]:
                v = smp.base[int(rng.integers(len(smp.base)))] + rng.normal(0, 0.01, smp.dim)
                docs.append(Incoming(d, v.astype(np.float32),
                                     orjson.dumps(metadata(0, "noun")), version, "n"))
            await coll.write(by_shard(docs))
            live = (live - set(gone)) | set(born) | set(back)
            assert coll.count() == len(live)
            await asyncio.to_thread(check_holds_the_store, coll)
        assert coll.index is index  # no retraining: the same index went through it all
        # Each document's own vector finds it first (re-ranked by the stored vectors).
        held = await asyncio.to_thread(stored, coll)
        some = sorted(held)[::20]
        rows = await coll.search(np.stack([held[k][1] for k in some]), 1, 16)
        assert [r[0].id for r in rows] == [held[k][0] for k in some]
    finally:
        await engine.close()


async def test_a_snapshot_round_trip_serves_the_same_and_takes_writes(
    tmp_path: Path, blocking: Blocking
) -> None:
    smp = load_sample()
    engine, coll = await load(tmp_path, blocking, "ivf_pq")
    try:
        q = smp.queries[:50]
        before = await coll.search(q, 10, 8)
        n = coll.index.ntotal
        await coll.snapshot()
    finally:
        await engine.close()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        index = coll.index
        assert isinstance(index.index, faiss.IndexIVFPQFastScan) and index.ntotal == n
        # Per vector its code (dim/8 bytes), id and list entry; per list its centroid and
        # the rest of its last block of 32 codes.
        code, centroids = smp.dim // 8, index.nlist * smp.dim * 4
        assert n * (code + 10) + centroids <= index.memory_bytes() <= (
            n * (code + 10) + centroids + index.nlist * 31 * code)
        after = await coll.search(q, 10, 8)
        assert [[(h.id, h.score) for h in r] for r in after] == [
            [(h.id, h.score) for h in r] for r in before]
        await asyncio.to_thread(check_holds_the_store, coll)  # decodes: the loaded index too
        gone = [Incoming(str(i), None, b"", 2, "n") for i in range(0, 600, 3)]
        new = [Incoming(f"x{i}", smp.base[i], orjson.dumps(metadata(i, "noun")), 2, "n")
               for i in range(300)]
        await coll.write(by_shard([*gone, *new]))
        await asyncio.to_thread(check_holds_the_store, coll)
    finally:
        await engine.close()


@pytest.mark.parametrize("path", [None, *PATHS])
async def test_filtered_and_shard_subset_searches_answer_only_what_they_admit(
    tmp_path: Path, blocking: Blocking, path: str | None
) -> None:
    smp = load_sample()
    engine, coll = await load(tmp_path, blocking, "ivf_pq", path)
    try:
        q = smp.queries[:40]
        for name, spec in FILTERS.items():
            flt = parse_filter(spec)
            assert flt is not None
            for shards in (None, [0, 2], [3]):
                rows = await coll.search(q, 10, 8, flt, shards=shards)
                for row in rows:
                    assert all(flt(orjson.loads(h.metadata)) for h in row), name
                    assert shards is None or all(h.shard in shards for h in row)
                if name == "noun (70%)":  # plenty match: a full answer from every shard set
                    assert all(len(r) == 10 for r in rows)
        rows = await coll.search(q, 10, 8, None, shards=[1])
        assert all(len(r) == 10 and all(h.shard == 1 for h in r) for r in rows)
    finally:
        await engine.close()


async def test_an_old_ivfpq_snapshot_serves_until_the_next_training(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    smp = load_sample()
    spec = CollectionSpec("c", smp.dim, "cosine", SHARDS, 1, IndexSpec("ivf_pq", None, 8))
    tuning = Tuning(train_min=1000, retrain_quiet_s=0.05)

    def docs(lo: int, hi: int, version: int = 1) -> dict[int, list[Incoming]]:
        return by_shard([Incoming(str(i), smp.base[i], orjson.dumps(metadata(i, "noun")),
                                  version, "n") for i in range(lo, hi)])

    with monkeypatch.context() as m:
        m.setattr(VectorIndex, "new_ivf", staticmethod(VectorIndex.new_ivfpq8))
        engine = Engine(tmp_path, blocking, tuning, fsync=False)
        await engine.start()
        try:
            coll = await engine.ensure(spec, range(SHARDS), "u")
            await coll.write(docs(0, 1500))
            await settled(coll)
            assert type(coll.index.index) is faiss.IndexIVFPQ
            await coll.snapshot()
        finally:
            await engine.close()
    engine = Engine(tmp_path, blocking, tuning, fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        assert type(coll.index.index) is faiss.IndexIVFPQ  # loaded, not retrained
        await asyncio.to_thread(check_holds_the_store, coll)
        # Deletes and upserts on the old index.
        await coll.write(by_shard([Incoming(str(i), None, b"", 2, "n")
                                   for i in range(0, 300, 2)]))
        await coll.write(docs(1, 300, 3))
        await asyncio.to_thread(check_holds_the_store, coll)
        rows = await coll.search(smp.base[1000:1100], 1, 16)
        assert [r[0].id for r in rows] == [str(i) for i in range(1000, 1100)]
        # Twice the documents it was trained on: the next training makes the fast scan.
        await coll.write(docs(1500, 3200))
        await wait_for(lambda: isinstance(coll.index.index, faiss.IndexIVFPQFastScan)
                       and not coll.training, 60, what="the retraining")
        await asyncio.to_thread(check_holds_the_store, coll)
        # Re-ranked recall@10 against the exact answers over the documents held (1-3199).
        rows = await coll.search(smp.queries, 10, 64)
        truth = 1 + np.argsort(-(smp.queries @ smp.base[1:3200].T), axis=1)[:, :10]
        got = recall_at_k([[int(h.id) for h in r] for r in rows], truth, 10)
        assert got >= 0.95, got
    finally:
        await engine.close()


def test_removal_leaves_no_codes_for_faiss_to_or_into() -> None:
    """The slots a removal vacates in a list's last block are zeroed: FAISS's own add (which
    ORs a code into its slot) then still writes true codes after it."""
    rng = np.random.default_rng(2)
    dim = 16
    spec = CollectionSpec("c", dim, "l2", 1, 1, IndexSpec("ivf_pq", nlist=4))
    index = VectorIndex.new_ivf(spec, 4, 2000)
    x = rng.standard_normal((3000, dim)).astype(np.float32)
    index.index.train(x[:2000])
    keys = np.arange(1, 2001, dtype=np.int64)
    index.add(x[:2000], keys)
    index.remove(rng.choice(keys, 700, replace=False))
    ids = np.arange(5000, 6000, dtype=np.int64)
    index.index.add_with_ids(x[2000:], ids)
    inv, packed = index.index.invlists, PackedLists(index.index, faiss)
    for no in range(4):
        n = inv.list_size(no)
        held = faiss.rev_swig_ptr(inv.get_ids(no), n)
        new = np.flatnonzero(held >= 5000)
        assert len(new)
        want = index.index.sa_encode(x[2000 + held[new] - 5000])[:, 1:]
        assert np.array_equal(packed.read(no, new), want)


# The snapshot magic every release before the fast scan reads (and none other).
OLDER_MAGIC = b"AQIX3\n"


def test_a_fast_scan_snapshot_is_one_older_code_refuses(tmp_path: Path) -> None:
    """Older code takes a snapshot with its magic for an index it may add to with FAISS's
    add_core, which writes codes unpacked into the fast scan's block-packed lists (a node
    rolled back crashed in malloc at its first write, or served garbage): a fast-scan
    snapshot carries another magic, so that older code rebuilds from the store. ivf_sq8's
    (no change of format) still carries the old one; both load here."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    keys = global_key(0, 1) + np.arange(len(x), dtype=np.int64)
    for kind, older_reads in (("ivf_pq", False), ("ivf_sq8", True)):
        spec = CollectionSpec("c", 16, "l2", 1, 1, IndexSpec(kind, nlist=8))
        index = VectorIndex.new_ivf(spec, 8, len(x))
        index.index.train(x)
        index.add(x, keys)
        path = tmp_path / f"{kind}.aqix"
        index.save(path, {0: 7})
        assert path.read_bytes().startswith(OLDER_MAGIC) == older_reads, kind
        loaded = VectorIndex.load(path, 1)
        assert loaded is not None and loaded[1] == {0: 7}, kind
        np.testing.assert_array_equal(loaded[0].vectors_of(keys), index.vectors_of(keys))
