"""An `ivf_flat` snapshot without its vectors (AQIX5, `VectorIndex.stage`): the quantizer and
each label's list; a start puts the store's vectors (V keys) back into those lists, then
replays the change log's tail.

- After random writes, overwrites and deletes, labels released and given again, before and
  after the snapshot, a restart (after a close, or a stop with no snapshot, or from an older
  snapshot put back) holds exactly the live stored vectors, bit for bit, each in the list the
  quantizer gives it, and its exhaustive search is the exact one over the stored vectors.
- A damaged snapshot, or one that does not place a stored vector, is rebuilt from the store.
- A snapshot of the older format (AQIX3, the vectors in it) still loads; the next is AQIX5.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage import index as index_module
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import VectorIndex, global_keys, prepare
from aquila.node.storage.store import VEC_PREFIX, vec_key
from tests.conftest import settled
from tests.test_index_compaction import stored as stored_raw

DIM = 8
NLIST = 8
SPEC = CollectionSpec("f", DIM, "l2", 2, 1, IndexSpec("ivf_flat", nlist=NLIST))
# One training (on the first documents), then none and no compaction: the lists a restart
# refills are the ones the snapshot recorded.
TUNING = Tuning(train_min=100, retrain_growth=100, retrain_quiet_s=3600, compact_min=10**9,
                compact_quiet_s=3600)
SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
UNIVERSE = 400  # document ids d0 .. d399, even on shard 0, odd on shard 1


class Writer:
    """Random upserts (new documents, overwrites, revivals) and deletes, each batch one
    version above the last."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.version = 0

    async def first(self, coll: Collection, n: int) -> None:
        self.version += 1
        await coll.write(self._batch(np.arange(n), np.zeros(n, bool)))

    async def churn(self, coll: Collection, rounds: int, per: int = 40) -> None:
        for _ in range(rounds):
            self.version += 1
            ids = self.rng.choice(UNIVERSE, per, replace=False)
            await coll.write(self._batch(ids, self.rng.random(per) < 0.35))

    def _batch(self, ids: np.ndarray, delete: np.ndarray) -> dict[int, list[Incoming]]:
        out: dict[int, list[Incoming]] = {0: [], 1: []}
        for i, gone in zip(ids.tolist(), delete.tolist(), strict=True):
            if gone:
                out[i % 2].append(Incoming(f"d{i}", None, b"", self.version, "n1"))
            else:
                vec = self.rng.standard_normal(DIM).astype(np.float32)
                out[i % 2].append(Incoming(f"d{i}", vec, b"{}", self.version, "n1"))
        return {s: ds for s, ds in out.items() if ds}


def stored(coll: Collection) -> tuple[np.ndarray, np.ndarray]:
    """The global keys and prepared vectors of every live stored document, by key (what a
    rebuild from the store reads)."""
    keys, vectors = stored_raw(coll)
    return keys, prepare(vectors, coll.spec.metric)


def labels_of(coll: Collection) -> dict[tuple[int, int], str]:
    """(shard, label) → the id of the document holding it (live or tombstone)."""
    return {(s, rec.label): doc_id for s in sorted(coll.shards)
            for doc_id, rec in coll.store.iter_docs(s, vectors=False) if rec.label}


def holds_exactly_the_stored(coll: Collection) -> None:
    """Call on a thread with no write running."""
    keys, vectors = stored(coll)
    index = coll.index
    assert index.trained and index.nlist == NLIST
    assert np.sort(index.all_keys()).tolist() == keys.tolist()
    assert index.ntotal == coll.count() == len(keys)
    np.testing.assert_array_equal(index.vectors_of(keys), vectors)
    # Each in the list the quantizer gives it (as a write would have put it).
    _, nearest = index.index.quantizer.search(vectors, 1)
    for s in sorted(coll.shards):
        pick = (keys >> index_module.LABEL_BITS) == s
        lists = index.lists_of(s)
        labels = keys[pick] & ((1 << index_module.LABEL_BITS) - 1)
        assert lists[labels].tolist() == nearest[pick, 0].tolist()
        assert int((lists >= 0).sum()) == int(pick.sum())
    # Its exhaustive search is the exact search of the stored vectors.
    q = np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32)
    _, found = index.search(prepare(q, coll.spec.metric), 10, NLIST)
    if coll.spec.metric == "l2":
        far = ((q[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2)
    else:  # unit vectors, by inner product
        far = -(prepare(q, coll.spec.metric) @ vectors.T)
    exact = far.argsort(axis=1)[:, :10]
    assert found.tolist() == keys[exact].tolist()


def scans_agree(coll: Collection) -> None:
    """The scan of V keys a refill and a training read (`Store.iter_live_vectors`, read in
    batches as arrays, put in chunks) gives what the keys hold, read one by one, whatever
    the chunk, the batch and the seq bound: every chunk full but the last."""
    store = coll.store
    for s in sorted(coll.shards):
        top = coll.shards[s].next_seq
        stored = [(int.from_bytes(k[3:], "big"), int.from_bytes(v[:VEC_PREFIX], "big"),
                   v[VEC_PREFIX:])
                  for k, v in store.vdb.items(from_key=vec_key(s, 0))
                  if k[:3] == vec_key(s, 0)[:3]]
        for max_seq, chunk, batch in ((None, 1000, 4096), (top // 2, 7, 3), (top // 3, 1, 2),
                                      (None, 5, 1), (0, 5, 4096)):
            want = [(label, vec) for label, seq, vec in stored
                    if max_seq is None or seq <= max_seq]
            got = [(r.copy(), lab.copy())
                   for r, lab in store.iter_live_vectors(s, max_seq, chunk, DIM, batch)]
            assert all(len(lab) == chunk for _, lab in got[:-1])
            assert all(0 < len(lab) <= chunk for _, lab in got)
            labels = np.concatenate([lab for _, lab in got]) if got else np.zeros(0)
            rows = np.concatenate([r for r, _ in got]) if got else np.zeros((0, DIM))
            assert labels.tolist() == [label for label, _ in want]
            np.testing.assert_array_equal(
                rows, np.frombuffer(b"".join(v for _, v in want), np.float32).reshape(-1, DIM))
            assert (max_seq == 0) == (not got)


async def killed(engine: Engine) -> None:
    """As a SIGKILL leaves the data: no snapshot at the stop (the store closed, durable)."""
    for coll in list(engine.collections.values()):
        await coll.close(snapshot=False)
    engine.collections.clear()


async def restarted(tmp_path: Path, blocking: Blocking) -> Engine:
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    return engine


def magic(coll: Collection) -> bytes:
    return coll.snap_path.read_bytes()[:6]


@pytest.mark.parametrize(("stop", "metric"), [("close", "l2"), ("kill", "l2"), ("stale", "l2"),
                                              ("kill", "cosine")])
async def test_a_restart_holds_exactly_the_stored_vectors(
        stop: str, metric: str, tmp_path: Path, blocking: Blocking,
        caplog: pytest.LogCaptureFixture) -> None:
    w = Writer(7)
    engine = await restarted(tmp_path, blocking)
    coll = await engine.ensure(dataclasses.replace(SPEC, metric=metric), [0, 1], "u")
    await w.first(coll, 300)
    await settled(coll)
    await w.churn(coll, 6)
    await coll.snapshot()  # and the labels of the deletes it covers released
    first = coll.snap_path.read_bytes()
    await w.churn(coll, 6)  # overwrites, deletes, revivals after that snapshot
    before = labels_of(coll)
    await coll.snapshot()  # releases the deletes made since the first
    assert magic(coll) == b"AQIX5\n"
    # No vector in it: the quantizer, the label → list maps (2 bytes a label), the meta.
    assert coll.snap_path.stat().st_size < coll.count() * DIM * 4 // 3
    await w.churn(coll, 6)  # after the last snapshot: released labels given again
    after = labels_of(coll)
    assert any(before[k] != doc for k, doc in after.items() if k in before), "no label reused"
    await blocking.write(holds_exactly_the_stored, coll)
    await blocking.write(scans_agree, coll)
    if stop == "close":
        await engine.close()
    else:
        await killed(engine)
    if stop == "stale":  # an older snapshot back in place (labels released and reused since)
        (tmp_path / "collections" / "f" / "index.faiss").write_bytes(first)
    caplog.set_level(logging.INFO)
    again = await restarted(tmp_path, blocking)
    try:
        coll = again.get("f")
        assert "rebuilding" not in caplog.text
        assert "into the snapshot's lists" in caplog.text  # loaded, not rebuilt
        await blocking.write(holds_exactly_the_stored, coll)
        # Writes go on from there, and the next restart finds them too.
        await w.churn(coll, 4)
        await coll.snapshot()
        await w.churn(coll, 2)
        await killed(again)
        again = await restarted(tmp_path, blocking)
        await blocking.write(holds_exactly_the_stored, again.get("f"))
    finally:
        await again.close()


@pytest.mark.parametrize("damage", ["flipped", "cut", "stray"])
async def test_a_snapshot_that_does_not_fit_is_rebuilt_from_the_store(
        damage: str, tmp_path: Path, blocking: Blocking, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = Writer(8)
    engine = await restarted(tmp_path, blocking)
    coll = await engine.ensure(SPEC, [0, 1], "u")
    await w.first(coll, 300)
    await settled(coll)
    await w.churn(coll, 4)
    await coll.snapshot()
    await w.churn(coll, 4)
    await killed(engine)
    path = tmp_path / "collections" / "f" / "index.faiss"
    raw = bytearray(path.read_bytes())
    if damage == "flipped":  # a byte of the label → list maps, at the end
        raw[-3] ^= 0x10
        path.write_bytes(bytes(raw))
    elif damage == "cut":
        path.write_bytes(bytes(raw[:-5]))
    else:  # a snapshot that leaves out a label the store holds unchanged since
        refill = VectorIndex.refill

        def forgetful(self: VectorIndex, chunks: object) -> int:
            assert self.pending is not None
            arr = self.pending[0]
            arr[int(np.flatnonzero(arr >= 0)[0])] = -1
            return refill(self, chunks)  # type: ignore[arg-type]

        monkeypatch.setattr(VectorIndex, "refill", forgetful)
    caplog.set_level(logging.INFO)
    again = await restarted(tmp_path, blocking)
    try:
        coll = again.get("f")
        assert ("does not place" if damage == "stray" else "rebuilding") in caplog.text
        await settled(coll)  # rebuilt exact, then trained again
        await blocking.write(holds_exactly_the_stored, coll)
    finally:
        await again.close()


async def test_an_older_snapshot_with_the_vectors_still_loads(
        tmp_path: Path, blocking: Blocking, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = Writer(9)
    with monkeypatch.context() as m:  # as the code before AQIX5 wrote it
        m.setattr(index_module, "_without_vectors", lambda index: False)
        engine = await restarted(tmp_path, blocking)
        coll = await engine.ensure(SPEC, [0, 1], "u")
        await w.first(coll, 300)
        await settled(coll)
        await w.churn(coll, 4)
        await coll.snapshot()
        assert magic(coll) == b"AQIX3\n"
        await w.churn(coll, 4)
        await killed(engine)
    caplog.set_level(logging.INFO)
    again = await restarted(tmp_path, blocking)
    try:
        coll = again.get("f")
        assert "rebuilding" not in caplog.text and "into the snapshot's lists" not in caplog.text
        await blocking.write(holds_exactly_the_stored, coll)
        await w.churn(coll, 2)
        await coll.snapshot()
        assert magic(coll) == b"AQIX5\n"
    finally:
        await again.close()


def test_refill_places_what_the_map_records_and_counts_the_rest() -> None:
    """`refill` at the index's level: vectors the map places go to their recorded lists;
    keys it does not place (absent, -1, beyond the array) are counted, not added."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, DIM)).astype(np.float32)
    keys = global_keys(1, np.arange(1, 501))
    index = VectorIndex.new_ivf(SPEC, NLIST, len(x))
    index.index.train(x)
    index.add(x[:400], keys[:400])
    lists = index.lists_of(1).copy()
    blank = VectorIndex.new_ivf(SPEC, NLIST, len(x))
    blank.index.train(x)
    blank.pending = {1: lists}
    strays = blank.refill(iter([(x[:250], keys[:250]), (x[250:], keys[250:])]))
    assert strays == 100 and blank.ntotal == 400
    labels = np.arange(1, 401)
    assert blank.lists_of(1)[labels].tolist() == lists[labels].tolist()
    np.testing.assert_array_equal(blank.vectors_of(keys[:400]), x[:400])
    assert blank.added == 0 and blank.pending is None


async def test_a_benchmark_reads_the_snapshot_beside_the_running_node(
        tmp_path: Path, blocking: Blocking) -> None:
    """`scripts/snapshot_index.py` refills an AQIX5 snapshot from the store of a node that
    still runs (the store opened read-only, beside its lock): the index the snapshot covers."""
    sys.path.insert(0, SCRIPTS)
    from snapshot_index import snapshot_index

    w = Writer(11)
    engine = await restarted(tmp_path, blocking)
    try:
        coll = await engine.ensure(SPEC, [0, 1], "u")
        await w.first(coll, 300)
        await settled(coll)
        await coll.snapshot()
        assert magic(coll) == b"AQIX5\n"
        got = snapshot_index(coll.snap_path, SPEC.shards, read_only=True)
        assert got is not None and got.trained
        assert got.ntotal == coll.index.ntotal == coll.count()
        assert np.array_equal(np.sort(got.all_keys()), np.sort(coll.index.all_keys()))
        with pytest.raises(Exception, match="lock"):  # noqa: B017  # read-write: the node's lock
            snapshot_index(coll.snap_path, SPEC.shards)
    finally:
        await engine.close()
