"""Staging a batch of upserts (no delete, no id twice: a bulk import's batches) column by
column: the records, keys, digests and index changes that `Shard._prepare_distinct` makes one
document at a time, made with numpy over the whole batch and handed to the write batch with
`map` (no bytecode per put). The stored bytes are the same to the byte (tests compare them).

What stays per document is what has no array form: the two BLAKE2b digests (the shard's
anti-entropy digests are pinned by their golden values), each record's bytes and RocksDB's
own puts.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from aquila.cluster.model.digests import BUCKETS
from aquila.cluster.model.documents import Incoming
from aquila.node.storage.index import LABEL_BITS
from aquila.node.storage.store import _HEADER, Record, WriteBatch, change_key, doc_key, label_key

if TYPE_CHECKING:
    from aquila.node.storage.shard import IndexOps

# `store._HEADER` (">QqQBIH": version, label, seq, flags, dim, writer length) as a packed
# record dtype: a whole batch's headers in one array.
_HEADER_DTYPE = np.dtype([("version", ">u8"), ("label", ">i8"), ("seq", ">u8"), ("flags", "u1"),
                          ("dim", ">u4"), ("wlen", ">u2")])
assert _HEADER_DTYPE.itemsize == _HEADER.size


def be64_keys(prefix: bytes, values: np.ndarray) -> list[bytes]:
    """`prefix` + each value as 8 big-endian bytes (`store.label_key`, `store.change_key`)."""
    n, p = len(values), len(prefix)
    width = p + 8
    buf = np.empty((n, width), np.uint8)
    buf[:, :p] = np.frombuffer(prefix, np.uint8)
    buf[:, p:] = values.astype(">u8").view(np.uint8).reshape(n, 8)
    raw = buf.tobytes()
    return [raw[i : i + width] for i in range(0, n * width, width)]


def _consume(it: object) -> None:
    deque(it, maxlen=0)  # type: ignore[call-overload]


def stage_upserts(ops: IndexOps, shard: int, dim: int, next_seq: int, next_label: int,
                  docs: list[Incoming], olds: list[Record | None], batch: WriteBatch
                  ) -> tuple[int, int]:
    """Stage `docs` (upserts only, distinct ids; `olds` their stored records) into `batch`,
    last writer wins; fill `ops`. The shard's (next seq, next label) after them."""
    if any(o is not None for o in olds):  # a stale write changes nothing
        kept = [(d, o) for d, o in zip(docs, olds, strict=True)
                if o is None or (d.version, d.writer) > (o.version, o.writer)]
        docs, olds = [d for d, _ in kept], [o for _, o in kept]
        updates = [i for i, o in enumerate(olds) if o is not None]
    else:
        updates = []
    n = len(docs)
    if n == 0:
        ops.last_seq = next_seq - 1
        return next_seq, next_label
    try:
        vectors = np.stack([d.vector for d in docs])  # type: ignore[misc]
    except ValueError:
        raise ValueError("a vector of the batch has the wrong dimension") from None
    if vectors.shape != (n, dim):
        raise ValueError("a vector of the batch has the wrong dimension")
    flat = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    row = 4 * dim
    vbs = [flat[i : i + row] for i in range(0, n * row, row)]

    ids = [d.id.encode() for d in docs]
    versions = [d.version for d in docs]
    names = {w: w.encode() for w in {d.writer for d in docs}}
    wbs = [names[d.writer] for d in docs]
    metas = [d.metadata for d in docs]

    labels = np.empty(n, np.int64)
    fresh = n - len(updates)
    if updates:
        is_new = np.ones(n, bool)
        is_new[updates] = False
        labels[is_new] = np.arange(next_label, next_label + fresh)
        labels[updates] = [olds[i].label for i in updates]  # type: ignore[union-attr]
        new_at = np.flatnonzero(is_new).tolist()
    else:
        labels[:] = np.arange(next_label, next_label + n)
        new_at = None
    seqs = np.arange(next_seq, next_seq + n, dtype=np.int64)

    head = np.zeros(n, _HEADER_DTYPE)
    head["version"] = versions
    head["label"] = labels
    head["seq"] = seqs
    head["dim"] = dim
    head["wlen"] = [len(w) for w in wbs]
    hb = head.tobytes()
    hs = _HEADER.size
    join = b"".join
    values = [join((hb[j : j + hs], w, v, m))
              for j, w, v, m in zip(range(0, n * hs, hs), wbs, vbs, metas, strict=True)]

    put = batch.raw_put
    label_keys = be64_keys(label_key(shard, 0)[:3], labels if new_at is None
                           else labels[new_at])
    _consume(map(put, label_keys, ids if new_at is None else [ids[i] for i in new_at]))
    doc_prefix = doc_key(shard, "")
    _consume(map(put, [doc_prefix + i for i in ids], values))
    change_prefix = change_key(shard, 0)[:3]
    if updates:
        _consume(map(batch.raw_delete, be64_keys(change_prefix, np.array(
            [olds[i].seq for i in updates], np.int64))))  # type: ignore[union-attr]
    _consume(map(put, be64_keys(change_prefix, seqs), ids))

    # Digests: each record's hash XOR-ed into its bucket (the replaced record's too), as
    # `digests.record_hash` and `digests.bucket_of` compute them.
    blake2b = hashlib.blake2b
    hashes = [blake2b(b"%b\x00%d\x00%b" % (i, v, w), digest_size=16).digest()
              for i, v, w in zip(ids, versions, wbs, strict=True)]
    in_bucket = [blake2b(i, digest_size=8, person=b"aq-ae").digest() for i in ids]
    live_before = []
    for i in updates:
        old = olds[i]
        assert old is not None
        hashes.append(blake2b(b"%b\x00%d\x00%b" % (ids[i], old.version, old.writer.encode()),
                              digest_size=16).digest())
        in_bucket.append(in_bucket[i])
        if not old.tombstone:
            live_before.append(i)
            ops.old_meta[old.label] = old.metadata
    h = np.frombuffer(join(hashes), ">u8").reshape(-1, 2).astype(np.uint64)
    buckets = (np.frombuffer(join(in_bucket), ">u8") % BUCKETS).astype(np.intp)
    acc = np.zeros((BUCKETS, 2), np.uint64)
    np.bitwise_xor.at(acc, buckets, h)
    for b in np.unique(buckets).tolist():
        ops.digest_delta[b] = int(acc[b, 0]) << 64 | int(acc[b, 1])

    keys = labels | (shard << LABEL_BITS)
    ops.remove = keys[live_before].tolist() if live_before else []
    ops.add_keys = keys.tolist()
    ops.add_vectors = [flat]  # the rows of add_keys, in order, as one piece
    ops.add_meta = metas
    ops.count_delta = n - len(live_before)
    ops.applied = n
    ops.last_seq = next_seq + n - 1
    return next_seq + n, next_label + fresh
