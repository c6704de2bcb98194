"""An IVF index keeps no FAISS direct map: `remove` and `vectors_of` find a key's list through
the node's label → list map. Checked against FAISS's own indexes given the same operations:
one with the hash table direct map the node had before (same ids per list, same search
results, same reconstructions) and one without a map removing by selector (the very same
order within each list)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np
import pytest

from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.storage.index import LABEL_BITS, VectorIndex, global_keys, shard_bits
from aquila.node.storage.packed_lists import PackedLists, is_packed
from aquila.node.storage.training import compacted

faiss: Any = _faiss
SHARDS = 4
DIM = 16


def spec(kind: str) -> CollectionSpec:
    return CollectionSpec("c", DIM, "l2", SHARDS, 1, IndexSpec(kind, nlist=16))


def keys_of(rng: np.random.Generator, n: int, below: int) -> np.ndarray:
    """`n` distinct global keys over the shards, labels below `below`."""
    flat = rng.choice(SHARDS * below, n, replace=False)
    return global_keys(0, flat % below) + ((flat // below) << LABEL_BITS)


def lists(index: Any) -> list[np.ndarray]:
    inv = index.invlists
    return [faiss.rev_swig_ptr(inv.get_ids(no), inv.list_size(no)).copy()
            for no in range(index.nlist)]


def codes(index: Any) -> list[bytes]:
    """Each list's codes, unpacked (a fast-scan index's are packed in blocks)."""
    inv = index.invlists
    if is_packed(index, faiss):
        packed = PackedLists(index, faiss)
        return [packed.read(no, np.arange(inv.list_size(no))).tobytes()
                for no in range(index.nlist)]
    return [bytes(faiss.rev_swig_ptr(inv.get_codes(no), inv.list_size(no) * inv.code_size))
            for no in range(index.nlist)]


# ivf_pq as the node made it before the fast scan: FAISS's IndexIVFPQ, 8-bit codes in plain
# lists. Its snapshots still load and serve until the next training.
OLD_PQ = "ivf_pq8"


def old_pq() -> VectorIndex:
    index = faiss.IndexIVFPQ(faiss.IndexFlat(DIM, faiss.METRIC_L2), DIM, 16, 4, 8,
                             faiss.METRIC_L2)
    index.cp.min_points_per_centroid = 5
    index.set_direct_map_type(faiss.DirectMap.NoMap)
    return VectorIndex(index, True, 2000, shard_bits(SHARDS))


class Twins:
    """A VectorIndex and two FAISS references given the same operations."""

    def __init__(self, kind: str, rng: np.random.Generator) -> None:
        self.rng = rng
        train = rng.standard_normal((2000, DIM)).astype(np.float32)
        self.ours = old_pq() if kind == OLD_PQ else VectorIndex.new_ivf(spec(kind), 16, 2000)
        self.ours.index.train(train)
        self.hashed = faiss.clone_index(self.ours.index)
        # FAISS removes nothing from packed lists (ivf_pq's fast scan) under a hash table:
        # that reference keeps none, and the vectors it held are checked by decoding.
        self.packed = is_packed(self.ours.index, faiss)
        if not self.packed:
            self.hashed.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.plain = faiss.clone_index(self.ours.index)
        self.vectors: dict[int, np.ndarray] = {}

    def add(self, keys: np.ndarray) -> None:
        x = self.rng.standard_normal((len(keys), DIM)).astype(np.float32)
        self.ours.add(x, keys)
        ids = self.ours.ids(keys)
        self.hashed.add_with_ids(x, ids)
        self.plain.add_with_ids(x, ids)
        self.vectors.update(zip(keys.tolist(), x, strict=True))

    def remove(self, keys: np.ndarray) -> None:
        self.ours.remove(keys)
        held = np.array([k for k in keys.tolist() if k in self.vectors], dtype=np.int64)
        self.hashed.remove_ids(self.ours.ids(held))
        self.plain.remove_ids(faiss.IDSelectorBatch(self.ours.ids(keys)))
        for k in keys.tolist():
            self.vectors.pop(k, None)

    def rebuilt(self, held: list[np.ndarray]) -> Any:
        """A FAISS index of our type given these lists' entries, list by list, from empty."""
        out = faiss.clone_index(self.ours.index)
        out.reset()
        ids = np.concatenate(held)
        if len(ids):
            x = np.stack([self.vectors[k] for k in self.ours.keys(ids).tolist()])
            out.add_with_ids(x, ids)
        assert all(np.array_equal(a, b) for a, b in zip(lists(out), held, strict=True))
        return out

    def check(self) -> None:
        ours = lists(self.ours.index)
        assert self.ours.ntotal == self.hashed.ntotal == self.plain.ntotal == len(self.vectors)
        for a, b, c in zip(ours, lists(self.hashed), lists(self.plain), strict=True):
            assert np.array_equal(np.sort(a), np.sort(b))
            assert np.array_equal(a, c)  # the same order as FAISS's own remove
        # Packed lists: FAISS 1.15.1's own remove leaves the codes of the entries cut off in
        # their last block, and its add ORs new codes into them: its references go wrong once
        # an entry is added after a removal. The reference is then a FAISS index given the
        # same entries in the same order from empty.
        ref = self.rebuilt(ours) if self.packed else self.plain
        assert codes(self.ours.index) == codes(ref)
        q = self.rng.standard_normal((20, DIM)).astype(np.float32)
        d1, k1 = self.ours.search(q, 10, 4)
        k = min(10, max(1, self.hashed.ntotal))
        params = faiss.SearchParametersIVF(nprobe=4)
        d2, _ = (ref if self.packed else self.hashed).search(q, k, params=params)
        d3, i3 = ref.search(q, k, params=params)
        # The same scores as with the hash table (which ids come first among equal scores,
        # frequent with ivf_pq's codes, follows the order in the lists: that of FAISS's
        # remove without a map).
        assert np.array_equal(d1, d2)
        assert np.array_equal(d1, d3)
        assert np.array_equal(k1, self.ours.keys(i3))
        held = np.array(sorted(self.vectors), dtype=np.int64)
        if len(held):
            pick = self.rng.permutation(held)[:200]
            if self.packed:
                x = np.stack([self.vectors[k] for k in pick.tolist()])
                want = self.ours.index.sa_decode(self.ours.index.sa_encode(x))
            else:
                want = self.hashed.reconstruct_batch(self.ours.ids(pick))
            assert np.array_equal(self.ours.vectors_of(pick), want)
        for no in range(self.ours.nlist):  # the map agrees with the lists
            for key in self.ours.keys(ours[no]).tolist():
                assert self.ours.lists_of(key >> LABEL_BITS)[key & ((1 << LABEL_BITS) - 1)] == no


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_sq8", "ivf_pq", OLD_PQ])
def test_add_remove_readd_matches_faiss_with_and_without_its_direct_map(kind: str) -> None:
    rng = np.random.default_rng(7)
    t = Twins(kind, rng)
    assert t.ours.index.direct_map.type == faiss.DirectMap.NoMap
    t.add(keys_of(rng, 1500, 1000))
    t.check()
    for _ in range(12):
        held = np.array(sorted(t.vectors), dtype=np.int64)
        gone = rng.choice(held, int(rng.integers(1, 400)), replace=False)
        absent = keys_of(rng, 50, 3000)  # some held, most not, some beyond the map
        t.remove(np.concatenate([gone, absent, gone[:5]]))  # repeated keys too
        t.check()
        # One key from a list: in the middle, then its last entry.
        t.remove(rng.choice(np.array(sorted(t.vectors), dtype=np.int64), 1))
        t.check()
        full = [ids for ids in lists(t.ours.index) if len(ids)]
        t.remove(t.ours.keys(full[int(rng.integers(len(full)))][-1:]))
        t.check()
        again = np.setdiff1d(keys_of(rng, 300, 1200), np.array(sorted(t.vectors)))
        t.add(again)
        t.check()
    everything = np.array(sorted(t.vectors), dtype=np.int64)
    t.remove(everything)
    t.check()
    assert t.ours.ntotal == 0


def test_removing_absent_keys_changes_nothing() -> None:
    rng = np.random.default_rng(3)
    t = Twins("ivf_sq8", rng)
    t.add(keys_of(rng, 500, 400))
    before, n = lists(t.ours.index), t.ours.ntotal
    held = set(t.vectors)
    absent = np.array([k for k in keys_of(rng, 200, 5000).tolist() if k not in held]
                      + [global_keys(9, np.array([1]))[0]], dtype=np.int64)
    t.ours.remove(absent)
    assert t.ours.ntotal == n
    for a, b in zip(before, lists(t.ours.index), strict=True):
        assert np.array_equal(a, b)
    # Before the map is built too (a loaded index builds it on first use).
    fresh = VectorIndex(faiss.clone_index(t.ours.index), True, 500, t.ours.bits)
    fresh.remove(absent)
    assert fresh.ntotal == n


def test_vectors_of_an_absent_key_raises() -> None:
    rng = np.random.default_rng(4)
    t = Twins("ivf_flat", rng)
    t.add(keys_of(rng, 100, 400))
    absent = next(k for k in keys_of(rng, 200, 400).tolist() if k not in t.vectors)
    with pytest.raises(RuntimeError):
        t.ours.vectors_of(np.array([absent], dtype=np.int64))


@pytest.mark.parametrize("kind", ["ivf_sq8", OLD_PQ])
def test_a_snapshot_with_the_old_hash_table_loads_without_it(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    t = Twins(kind, rng)
    t.add(keys_of(rng, 800, 600))
    t.ours.index.set_direct_map_type(faiss.DirectMap.Hashtable)  # as the old code wrote it
    path = tmp_path / "index.snap"
    t.ours.save(path, {0: 5})
    t.ours.index.set_direct_map_type(faiss.DirectMap.NoMap)
    loaded = VectorIndex.load(path, SHARDS)
    assert loaded is not None
    index, covered = loaded
    assert covered == {0: 5}
    assert index.index.direct_map.type == faiss.DirectMap.NoMap
    t.ours = index  # the map is built from the lists on first use
    t.check()
    held = np.array(sorted(t.vectors), dtype=np.int64)
    t.remove(rng.choice(held, 300, replace=False))
    t.check()
    t.add(np.setdiff1d(keys_of(rng, 200, 700), np.array(sorted(t.vectors))))
    t.check()


def test_removing_only_absent_keys_from_an_empty_map() -> None:
    rng = np.random.default_rng(6)
    t = Twins("ivf_flat", rng)
    t.remove(keys_of(rng, 10, 100))  # nothing held: no list to look in
    t.check()
    t.add(keys_of(rng, 100, 100))
    t.remove(np.array([global_keys(2, np.array([10**6]))[0]], dtype=np.int64))
    t.check()


def test_a_compacted_index_keeps_no_direct_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    t = Twins("ivf_sq8", rng)
    t.add(keys_of(rng, 600, 500))
    t.remove(keys_of(rng, 100, 500))
    t.ours.index.set_direct_map_type(faiss.DirectMap.Hashtable)  # as if one were there
    t.ours = compacted(t.ours, tmp_path / "scratch")
    assert t.ours.index.direct_map.type == faiss.DirectMap.NoMap
    t.check()
    t.remove(np.array(sorted(t.vectors), dtype=np.int64)[::3])
    t.check()
