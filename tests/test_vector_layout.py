"""Layout 5 (issues 9 and 14): a live document's vector under V+shard+label (its seq, then its
float32 bytes), written in its record's batch, the record itself without it. The V keys are
exactly the live documents' vectors by label through puts, overwrites, deletes, labels
released and given again, purges, a shard dropped and a restart; the readers still give whole
records; the re-ranking of a compressed index's candidates from V keys equals scoring the same
candidates' records exactly (the way before); a layout 4 store (vectors in the records) is
split once at its first open, to the same content, also after a split killed midway."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import rocksdict

from aquila.cluster.model.documents import Hit, Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage import search
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import LABEL_BITS, prepare
from aquila.node.storage.search import candidates, exact_scores, resolve
from aquila.node.storage.store import (
    CHANGES_CF,
    LAYOUT,
    NO_LABEL,
    TOMBSTONES_CF,
    VEC_PREFIX,
    VECTORS_CF,
    Record,
    Store,
    doc_key,
    encode_record,
    label_key,
    vec_key,
)
from tests.conftest import settled
from tests.layouts import as_layout_5, killed_after_writes

_U64 = struct.Struct(">Q")
DIM = 8
SHARDS = 2
FLAT = CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec("flat"))


def v_keys(store: Store, s: int) -> dict[int, bytes]:
    prefix = vec_key(s, 0)[:3]
    return {_U64.unpack_from(k, 3)[0]: v for k, v in store._scan(prefix, family=store.vdb)}


def check(coll: Collection, model: dict[int, dict[str, bytes]]) -> None:
    """The V keys of each shard are its live documents' vectors by label (their seq before
    them), nothing else; records hold no vector; the readers join them back."""
    store = coll.store
    for s in range(SHARDS):
        vs = v_keys(store, s)
        if s not in coll.shards:
            assert not vs, f"V keys of dropped shard {s}"
            continue
        recs = dict(store.iter_docs(s, vectors=False))
        assert all(r.vector == b"" for r in recs.values())
        for raw in store.raw_docs([doc_key(s, d) for d in recs]):
            assert raw is not None and struct.unpack_from(">QqQBIH", raw)[4] == 0
        live = {d: r for d, r in recs.items() if not r.tombstone}
        assert set(live) == set(model[s])
        assert sorted(vs) == sorted(r.label for r in live.values())
        assert NO_LABEL not in vs
        for d, r in live.items():
            assert vs[r.label] == _U64.pack(r.seq) + model[s][d], d
        full = dict(store.iter_docs(s))
        assert {d: r.vector for d, r in full.items() if not r.tombstone} == model[s]
        assert all(r.vector == b"" for r in full.values() if r.tombstone)
        ids = sorted(recs) + ["never"]
        for cache in (True, False):
            got = store.get_records(s, ids, cache=cache)
            assert [r.vector if r is not None and not r.tombstone else None for r in got] == [
                model[s].get(d) for d in ids]
        multi = store.get_records_multi([(s, d) for d in ids])
        assert [r.vector if r is not None and not r.tombstone else None for r in multi] == [
            model[s].get(d) for d in ids]
        by_label: dict[int, bytes] = {}
        for rows, labels in store.iter_live_vectors(s, None, 7, DIM):
            by_label.update(zip(labels.tolist(), [r.tobytes() for r in rows], strict=True))
        assert by_label == {r.label: model[s][d] for d, r in live.items()}
        # Only what a snapshot up to half the change log covers.
        half = max((r.seq for r in live.values()), default=0) // 2
        upto = {lab for rows, labels in store.iter_live_vectors(s, half, 5, DIM)
                for lab in labels.tolist()}
        assert upto == {r.label for r in live.values() if r.seq <= half}


async def test_v_keys_follow_the_live_documents(tmp_path: Path, blocking: Blocking) -> None:
    """Random writes (new ids, overwrites, deletes, deletes of unknown ids, revivals, an id
    twice in a batch, stale versions), releases of tombstones' labels, purges, a shard
    dropped and taken again and restarts: after each step, `check`."""
    rng = random.Random(5)
    model: dict[int, dict[str, bytes]] = {s: {} for s in range(SHARDS)}
    version = 1

    def vector() -> np.ndarray:
        return np.asarray([rng.gauss(0, 1) for _ in range(DIM)], np.float32)

    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    coll = await engine.ensure(FLAT, range(SHARDS), "u")
    try:
        for step in range(60):
            op = rng.random()
            if op < 0.6:
                by: dict[int, list[Incoming]] = {}
                staged = {s: dict(model[s]) for s in range(SHARDS)}
                for _ in range(rng.randint(1, 12)):
                    s, d = rng.randrange(SHARDS), f"d{rng.randrange(25)}"
                    version += 1
                    # Now and then a stale version, of a document stored live (it loses).
                    v = 0 if d in staged[s] and rng.random() < 0.1 else version
                    if rng.random() < 0.35:
                        by.setdefault(s, []).append(Incoming(d, None, b"", v, "w"))
                        if v:
                            staged[s].pop(d, None)
                    else:
                        x = vector()
                        by.setdefault(s, []).append(
                            Incoming(d, x, orjson.dumps({"i": step}), v, "w"))
                        if v:
                            staged[s][d] = x.tobytes()
                await coll.write(by)
                model = staged
            elif op < 0.7:
                await coll.snapshot()
                await coll.release_labels()
            elif op < 0.8:
                await coll.snapshot()
                for s in coll.shards:
                    await coll.purge_tombstones(s, version + 1)
            elif op < 0.87:
                s = rng.randrange(SHARDS)
                await coll.drop_shard(s)
                model[s] = {}
                check(coll, model)
                await coll.add_shards([s])
            else:
                await engine.close()
                engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
                await engine.start()
                coll = engine.get("c")
            check(coll, model)
        for s in range(SHARDS):  # the searches find the live documents by their vectors
            for d, raw in list(model[s].items())[:5]:
                q = np.frombuffer(raw, "<f4")[None]
                hits = await coll.search(q, 1, None, with_vectors=True)
                assert (hits[0][0].id, hits[0][0].vector) == (d, raw)
    finally:
        await engine.close()


def _old_way(coll: Collection, q: np.ndarray, scores: np.ndarray, keys: np.ndarray, k: int
             ) -> list[list[tuple[str, float]]]:
    """Before layout 5: every candidate's id and whole record read, the live ones scored
    with their records' vectors, each row sorted by score (stably), the k best kept."""
    out = []
    for r, row in enumerate(keys.tolist()):
        hits: list[tuple[str, float]] = []
        for key in row:
            if key < 0:
                break
            s, label = key >> LABEL_BITS, key & ((1 << LABEL_BITS) - 1)
            if s not in coll.shards:
                continue
            doc_id = coll.store.raw_records([label_key(s, label)])[0]
            if doc_id is None:
                continue
            rec = coll.store.get_records(s, [doc_id.decode()])[0]
            if rec is None or rec.tombstone or rec.label != label:
                continue
            exact = exact_scores(coll.spec.metric, q[r:r + 1], rec.vector_array()[None])
            hits.append((doc_id.decode(), float(exact[0])))
        hits.sort(key=lambda h: h[1], reverse=coll.spec.metric != "l2")
        out.append(hits[:k])
    return out


@pytest.mark.parametrize("itype", ["ivf_sq8", "ivf_pq"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
async def test_reranking_equals_exact_rescoring_of_the_same_candidates(
    tmp_path: Path, blocking: Blocking, itype: str, metric: str
) -> None:
    """Random data, a trained compressed index, some documents deleted or overwritten since
    the training: the re-ranked hits (ids, scores, order, vectors) of one query and of a
    batch (both resolve paths) equal the old way's on the same candidates."""
    dim = 16
    rng = np.random.default_rng(3)
    base = rng.standard_normal((1500, dim)).astype(np.float32)
    spec = CollectionSpec("c", dim, metric, 3, 1, IndexSpec(itype, nlist=8))
    engine = Engine(tmp_path, blocking, Tuning(train_min=500), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(spec, range(3), "u")
        await coll.write({s: [Incoming(str(i), base[i], b'{"i":%d}' % i, 1, "w")
                              for i in range(s, len(base), 3)] for s in range(3)})
        await settled(coll)
        await coll.write({s: [Incoming(str(i), None if i % 2 else rng.standard_normal(dim)
                                       .astype(np.float32), b"{}", 2, "w")
                              for i in range(s, 300, 3)] for s in range(3)})
        k = 10
        want = candidates(coll, k)
        assert want > k
        queries = rng.standard_normal((40, dim)).astype(np.float32)
        q = prepare(queries, metric)
        for batch in (q[:1], q):
            scores, keys = coll.index.search(batch, want, 4)
            old = _old_way(coll, batch, scores, keys, k)
            for vectors in (False, True):
                got = resolve(coll, scores, keys, vectors, rescore=(batch, k))
                assert [[h.id for h in row] for row in got] == [[i for i, _ in row]
                                                                for row in old]
                for row, ref in zip(got, old, strict=True):
                    assert np.allclose([h.score for h in row], [s for _, s in ref], atol=1e-6)
                    stored = coll.store.get_records_multi([(h.shard, h.id) for h in row])
                    assert [h.metadata for h in row] == [r.metadata for r in stored if r]
                    assert [h.vector for h in row] == (
                        [r.vector for r in stored if r] if vectors else [b""] * len(row))
        # The collection's own search: the same hits as re-ranking its candidates.
        hits = await coll.search(queries[:5], k, 4)
        scores, keys = coll.index.search(q[:5], want, 4)
        assert [[h.id for h in row] for row in hits] == [
            [i for i, _ in row] for row in _old_way(coll, q[:5], scores, keys, k)]
    finally:
        await engine.close()


def _as_layout_4(path: Path) -> dict[int, dict[str, Record]]:
    """The store rewritten as layout 4 left it (each live record holding its vector, no V
    keys): returns its documents as the readers gave them before."""
    store = Store(path, fsync=False)
    store.open()
    try:
        before = {s: dict(store.iter_docs(s)) for s in range(SHARDS)}
        wb = store.batch()
        for s, docs in before.items():
            for d, r in docs.items():
                wb.raw_put(doc_key(s, d), encode_record(
                    r.version, r.label, r.seq, r.tombstone, r.writer.encode(), r.vector,
                    r.metadata))
        store.write(wb)
        assert any(r.vector for docs in before.values() for r in docs.values())
    finally:
        store.close()
    # No column family of vectors: layout 4 had none.
    as_layout_5(path)  # the change log back in the default column family
    opts = rocksdict.Options(raw_mode=True)
    db = rocksdict.Rdict(str(path), opts, column_families={"default": opts, VECTORS_CF: opts})
    db.put(b"F", struct.pack(">H", 4))
    db.drop_column_family(VECTORS_CF)
    db.close()
    assert VECTORS_CF not in rocksdict.Rdict.list_cf(str(path), opts)
    return before


async def _layout_4_store(tmp_path: Path, blocking: Blocking) -> dict[int, dict[str, Record]]:
    rng = np.random.default_rng(1)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(FLAT, range(SHARDS), "u")
        for s in range(SHARDS):
            await coll.write({s: [Incoming(f"d{i}", rng.standard_normal(DIM).astype(np.float32),
                                           b'{"i":%d}' % i, 1, "w") for i in range(40)]})
            await coll.write({s: [Incoming(f"d{i}", None, b"", 2, "w") for i in range(0, 40, 4)]
                              + [Incoming("gone", None, b"", 2, "w")]})
        await coll.snapshot()
        await coll.release_labels()
        await coll.write({0: [Incoming("d0", rng.standard_normal(DIM).astype(np.float32),
                                       b"{}", 3, "w")]})  # revived: a free label
    finally:
        await engine.close()
    return _as_layout_4(tmp_path / "collections" / "c" / "db")


async def _reopened(tmp_path: Path, blocking: Blocking,
                    before: dict[int, dict[str, Record]]) -> None:
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = engine.get("c")
        assert coll.store.layout() == LAYOUT == 7
        assert {s: dict(coll.store.iter_docs(s)) for s in range(SHARDS)} == before
        check(coll, {s: {d: r.vector for d, r in docs.items() if not r.tombstone}
                     for s, docs in before.items()})
        for d, r in list(before[1].items())[:8]:
            if not r.tombstone:
                hits = await coll.search(r.vector_array()[None], 1, None, with_vectors=True)
                assert (hits[0][0].id, hits[0][0].vector) == (d, r.vector)
    finally:
        await engine.close()


async def test_a_store_of_a_newer_layout_is_refused_and_left_as_it_is(
    tmp_path: Path, blocking: Blocking
) -> None:
    """A node downgraded onto a store of a later layout refuses to open it (it would read and
    write it as its own), and changes nothing in it."""
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(FLAT, range(SHARDS), "u")
        await coll.write({0: [Incoming(f"d{i}", np.full(DIM, i, np.float32), b"{}", 1, "w")
                              for i in range(10)]})
    finally:
        await engine.close()
    store = Store(tmp_path / "collections" / "c" / "db", fsync=False)
    store.open()
    store.put_layout(LAYOUT + 1)
    store.close()

    def content() -> dict[str, dict[bytes, bytes]]:
        store.open()
        try:
            return {"default": dict(store.db.items()), VECTORS_CF: dict(store.vdb.items()),
                    CHANGES_CF: dict(store.cdb.items()), TOMBSTONES_CF: dict(store.tdb.items())}
        finally:
            store.close()

    before = content()
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    with pytest.raises(RuntimeError, match=f"layout is {LAYOUT + 1}"):
        await engine.start()
    await engine.close()
    assert content() == before


async def test_a_layout_4_store_is_split_at_its_first_open(
    tmp_path: Path, blocking: Blocking
) -> None:
    before = await _layout_4_store(tmp_path, blocking)
    await _reopened(tmp_path, blocking, before)


async def test_a_split_killed_midway_is_finished_by_the_next_open(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The split of a shard stops after its second batch of 7 records (as a kill would): the
    store is part split, part not, still layout 4; the next open finishes it, and rewrites
    only what was left."""
    before = await _layout_4_store(tmp_path, blocking)
    store = Store(tmp_path / "collections" / "c" / "db", fsync=False)
    store.open()
    with killed_after_writes(monkeypatch, 2):
        store.split_vectors(0, chunk=7)
    assert store.layout() == 4 and len(v_keys(store, 0)) == 14  # 2 batches of live ones
    store.close()
    split: list[int] = []
    real_split = Store.split_vectors

    def counted(self: Store, shard: int, chunk: int = 20_000) -> int:
        split.append(real_split(self, shard, chunk))
        return split[-1]

    monkeypatch.setattr(Store, "split_vectors", counted)
    await _reopened(tmp_path, blocking, before)
    live = sum(1 for docs in before.values() for r in docs.values() if not r.tombstone)
    assert sum(split) == live - 14


def _hit_rows(rows: list[list[Hit]]) -> list[list[tuple[Any, ...]]]:
    return [[(h.id, h.metadata, h.vector, h.shard) for h in row] for row in rows]


async def test_hits_read_vectors_by_label_only_when_asked(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search without vectors reads no V key; with them, its hits' V keys (both resolve
    paths), and the vectors are the stored ones."""
    rng = np.random.default_rng(2)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(FLAT, range(SHARDS), "u")
        base = rng.standard_normal((200, DIM)).astype(np.float32)
        await coll.write({s: [Incoming(f"d{i}", base[i], b"{}", 1, "w")
                              for i in range(s, 200, SHARDS)] for s in range(SHARDS)})
        read: list[bytes] = []
        raw, vectors_of = coll.store.raw_records, coll.store.vectors

        def spy(keys: list[bytes]) -> list[bytes | None]:
            read.extend(keys)
            return raw(keys)

        def spy_v(keys: list[bytes]) -> list[bytes | None]:
            read.extend(keys)
            return vectors_of(keys)

        monkeypatch.setattr(coll.store, "raw_records", spy)
        monkeypatch.setattr(coll.store, "vectors", spy_v)
        for few in (0, 1 << 30):
            monkeypatch.setattr(search, "FEW_HITS", few)
            for vectors in (False, True):
                read.clear()
                q = prepare(base[:20], "l2")
                rows = resolve(coll, *coll.index.search(q, 10, 1), vectors)
                assert any(k[:1] == b"V" for k in read) == vectors
                for row in rows:
                    for h in row:
                        want = base[int(h.id[1:])].tobytes() if vectors else b""
                        assert h.vector == want
                        if vectors:
                            assert len(h.vector) == 4 * DIM != VEC_PREFIX
    finally:
        await engine.close()


class _Racing:
    """A column family of vectors whose next read first lets a write land (between a
    reader's record read and its vector read)."""

    def __init__(self, real: Any, write: Any) -> None:
        self.real, self.write = real, write

    def get(self, *args: Any, **kwargs: Any) -> Any:
        if self.write is not None:
            write, self.write = self.write, None
            write()
        return self.real.get(*args, **kwargs)


def _put(store: Store, doc_id: str, rec: Record, old: Record | None) -> None:
    wb = store.batch()
    wb.put_doc(0, doc_id, rec, old)
    store.write(wb)


@pytest.mark.parametrize("change", ["overwrite", "delete"])
def test_a_write_between_a_record_and_its_vector_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """get_records, get_records_multi and iter_docs read a record, then its vector: a write
    of the document landing in between is read as it is now (never the old record with the
    new vector, nor a live record without one)."""
    store = Store(tmp_path / "db", fsync=False)
    store.open()
    try:
        v1, v2 = (np.full(DIM, x, np.float32).tobytes() for x in (1.0, 2.0))
        first = Record(1, 5, 1, False, "w", v1, b'{"a":1}')
        _put(store, "a", first, None)
        after = (Record(2, 5, 2, False, "w", v2, b'{"a":2}') if change == "overwrite"
                 else Record(2, 5, 2, True, "w", b"", b""))
        reads = [lambda: store.get_records(0, ["a"])[0],
                 lambda: store.get_records(0, ["a"], cache=False)[0],
                 lambda: store.get_records_multi([(0, "a")])[0],
                 lambda: dict(store.iter_docs(0))["a"]]
        for read in reads:
            _put(store, "a", first, store.get_records(0, ["a"], vectors=False)[0])
            real = store._vdb
            racing = _Racing(real, lambda: _put(store, "a", after, first))
            monkeypatch.setattr(store, "_vdb", racing)
            got = read()
            monkeypatch.setattr(store, "_vdb", real)
            assert racing.write is None, "the write did not land between the reads"
            assert got == after
    finally:
        store.close()


@pytest.mark.parametrize("change", ["overwrite", "delete"])
async def test_a_hit_written_between_its_record_and_vector_reads_is_read_again(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A search with vectors reads its hits' records, then their vectors: a hit written
    again in between is kept, with its metadata and vector as they are now (a live document
    is never missed for a concurrent overwrite); one deleted in between is left out (as one
    whose record is gone), on both resolve paths; the others carry their own vectors."""
    rng = np.random.default_rng(4)
    engine = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(FLAT, range(SHARDS), "u")
        base = rng.standard_normal((50, DIM)).astype(np.float32)
        await coll.write({0: [Incoming(f"d{i}", base[i], b"{}", 1, "w") for i in range(50)]})
        q = prepare(base[:1], "l2")
        for few in (0, 1 << 30):
            monkeypatch.setattr(search, "FEW_HITS", few)
            scores, keys = coll.index.search(q, 5, 1)
            victim = coll.store.get_records(0, ["d0"])[0]
            assert victim is not None and not victim.tombstone
            real = coll.store.vectors
            seq = victim.seq + 1000 + few % 7
            changed = (Record(victim.version + 1, victim.label, seq, False, "w",
                              (base[0] + 1).tobytes(), b'{"v":2}') if change == "overwrite"
                       else Record(victim.version + 1, victim.label, seq, True, "w", b"", b""))

            def racing(vkeys: list[bytes], victim: Record = victim, changed: Record = changed,
                       real: Any = real) -> list[bytes | None]:
                _put(coll.store, "d0", changed, victim)
                return real(vkeys)

            monkeypatch.setattr(coll.store, "vectors", racing)
            rows = resolve(coll, scores, keys, True)
            monkeypatch.setattr(coll.store, "vectors", real)
            ids = [h.id for h in rows[0]]
            assert len(ids) >= 4
            if change == "delete":
                assert "d0" not in ids
            else:
                d0 = rows[0][ids.index("d0")]
                assert (d0.metadata, d0.vector) == (b'{"v":2}', (base[0] + 1).tobytes())
            assert all(h.vector == base[int(h.id[1:])].tobytes() for h in rows[0]
                       if h.id != "d0")
            _put(coll.store, "d0", victim, None)  # back as it was, for the other path
        # A live record whose vector is missing (a damaged store): its hit is left out, the
        # search does not fail.
        monkeypatch.setattr(search, "FEW_HITS", 1 << 30)
        victim = coll.store.get_records(0, ["d0"])[0]
        assert victim is not None
        wb = coll.store.batch()
        wb.vec_delete(vec_key(0, victim.label))
        coll.store.write(wb)
        scores, keys = coll.index.search(q, 5, 1)
        rows = resolve(coll, scores, keys, True)
        assert "d0" not in [h.id for h in rows[0]] and len(rows[0]) == 4
    finally:
        await engine.close()
