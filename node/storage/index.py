"""The FAISS index of a collection's local shards on this node, over numpy arrays: exact
(flat) while small, IVF once trained.

One index serves every local shard of the collection, so a search costs one FAISS call and
one coarse quantisation instead of one per shard. Its labels are global keys
`shard << 40 | label` (the document's stable label within its shard), so a shard's vectors can
be removed when it moves away and a search can be restricted to some shards (`shard_selector`).
Cosine collections store unit vectors and search by inner product; callers normalise
(see `prepare`).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np
import orjson

from aquila.cluster.model.spec import CollectionSpec, pq_m
from aquila.node.files import write_atomic

# FAISS's bundled stubs lag its API (SearchParametersIVF keywords, DirectMap, ...).
faiss: Any = _faiss

_SNAP_MAGIC = b"AQIX2\n"
# trained-at count, kind (0 flat, 1 ivf), crc32 of meta + payload, meta length, payload length
_SNAP_HEADER = struct.Struct(">QBIQQ")
LABEL_BITS = 40


def global_key(shard: int, label: int) -> int:
    return (shard << LABEL_BITS) | label


def global_keys(shard: int, labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64) + np.int64(shard << LABEL_BITS)


def shard_selector(shards: list[int]) -> Any:
    """A FAISS selector admitting only these shards' keys (ranges, so no per-id table)."""
    sel: Any = None
    for s in shards:
        r = faiss.IDSelectorRange(s << LABEL_BITS, (s + 1) << LABEL_BITS)
        sel = r if sel is None else faiss.IDSelectorOr(sel, r)
        sel.keep = r  # keep the child alive: FAISS holds it by raw pointer
    return sel


def faiss_metric(metric: str) -> int:
    return int(faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)


def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, unit length for cosine."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        x = x / norms
    return np.ascontiguousarray(x)


def choose_nlist(n: int, configured: int | None) -> int:
    """About 4·√n lists, never more than n/8 (each list needs points to train on)."""
    if configured is not None:
        return max(1, min(configured, n))
    return max(1, min(int(round(4 * math.sqrt(n))), n // 8))


@dataclass
class VectorIndex:
    index: Any  # faiss.Index
    trained: bool  # an IVF index (False: exact flat)
    trained_at: int  # vectors it was trained on (0 for flat)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @staticmethod
    def flat(dim: int, metric: str) -> VectorIndex:
        base = faiss.IndexFlat(dim, faiss_metric(metric))
        return VectorIndex(faiss.IndexIDMap2(base), False, 0)

    @staticmethod
    def train_ivf(spec: CollectionSpec, vectors: np.ndarray, labels: np.ndarray) -> VectorIndex:
        """Train an IVF index of the collection's type on `vectors` and add them. Slow: call
        from a background thread; FAISS releases the GIL."""
        n, dim = vectors.shape
        nlist = choose_nlist(n, spec.index.nlist)
        metric = faiss_metric(spec.metric)
        quantizer = faiss.IndexFlat(dim, metric)
        kind = spec.index.type
        if kind == "ivf_sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, metric
            )
        elif kind == "ivf_pq":
            m = pq_m(dim) or 1
            nbits = 8 if n >= 256 * 16 else max(4, int(math.log2(max(16, n // 16))))
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, min(nbits, 8), metric)
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        index.cp.min_points_per_centroid = 5  # small indexes train without FAISS's warnings
        # 64 points per list and 10 k-means rounds: on the WordNet set a third of the time of
        # FAISS's defaults (256, 25) for 0.002 less recall@10, which keeps retraining a large
        # index in the background affordable.
        index.cp.niter = 10
        sample = vectors
        max_train = 64 * nlist
        if n > max_train:
            rng = np.random.default_rng(0)
            sample = vectors[rng.choice(n, max_train, replace=False)]
        index.train(sample)
        # A hash table from label to list position makes remove_ids and reconstruct O(1).
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.add_with_ids(vectors, labels)
        return VectorIndex(index, True, n)

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        if len(labels):
            self.index.add_with_ids(vectors, labels)

    def remove(self, labels: np.ndarray) -> None:
        if len(labels):
            self.index.remove_ids(np.ascontiguousarray(labels, dtype=np.int64))

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int,
        allowed: np.ndarray | None = None,
        selector: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys), each nq × k; key -1 where fewer than k were found.

        `allowed`: only these keys may be returned (a filter); `selector`: a FAISS selector
        (some shards). None for all.
        """
        k = max(1, min(k, max(1, self.ntotal)))
        sel = faiss.IDSelectorBatch(allowed) if allowed is not None else selector
        if self.trained:
            params = faiss.SearchParametersIVF(
                nprobe=max(1, min(nprobe, self.index.nlist)), sel=sel
            )
            return self.index.search(queries, k, params=params)  # type: ignore[no-any-return]
        if sel is not None:
            return self.index.search(  # type: ignore[no-any-return]
                queries, k, params=faiss.SearchParameters(sel=sel)
            )
        return self.index.search(queries, k)  # type: ignore[no-any-return]

    def memory_bytes(self) -> int:
        """An estimate of the memory the index holds (for /metrics): per vector its code and
        its 64-bit id, and the id map's hash entry; an IVF index's centroids too."""
        n, d = self.ntotal, int(self.index.d)
        if self.trained:
            code = int(faiss.extract_index_ivf(self.index).code_size)
            return n * (code + 8 + 16) + int(self.index.nlist) * d * 4
        return n * (d * 4 + 8 + 16)

    # -- snapshots ------------------------------------------------------------------------
    def serialize(self) -> bytes:
        """The index as bytes (quick; call while mutations are excluded)."""
        return bytes(faiss.serialize_index(self.index).tobytes())

    def save(self, path: Path, covered: dict[int, int], payload: bytes | None = None) -> None:
        """Write atomically with the change-log position each shard's part covers: a crash
        mid-write leaves the previous snapshot in place."""
        payload = self.serialize() if payload is None else payload
        meta = orjson.dumps({str(s): q for s, q in covered.items()})
        head = _SNAP_HEADER.pack(
            self.trained_at, int(self.trained), zlib.crc32(meta + payload), len(meta), len(payload)
        )
        write_atomic(path, _SNAP_MAGIC + head, meta, payload)

    @staticmethod
    def load(path: Path) -> tuple[VectorIndex, dict[int, int]] | None:
        """(index, covered seq per shard), or None when missing or damaged (the caller
        rebuilds from the store)."""
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        n0 = len(_SNAP_MAGIC)
        if len(raw) < n0 + _SNAP_HEADER.size or raw[:n0] != _SNAP_MAGIC:
            return None
        trained_at, kind, crc, meta_len, length = _SNAP_HEADER.unpack_from(raw, n0)
        body = raw[n0 + _SNAP_HEADER.size :]
        if len(body) != meta_len + length or zlib.crc32(body) != crc:
            return None
        covered = {int(s): int(q) for s, q in orjson.loads(body[:meta_len]).items()}
        payload = body[meta_len:]
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except RuntimeError:
            return None
        if kind:
            faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.Hashtable)
        return VectorIndex(index, bool(kind), int(trained_at)), covered
