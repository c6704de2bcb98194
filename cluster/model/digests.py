"""Digests of a shard's records for anti-entropy, pure: ids fall into hash buckets, and each
bucket's digest is the XOR of its records' (id, version, writer) hashes, so replicas compare
256 short strings instead of their documents, and a replica keeps its digests current write by
write (node storage) without rescanning. Last-writer-wins order lives here too.

Golden values are pinned by tests: replicas running different versions of the code must agree
on every bucket and every digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from aquila.cluster.model.documents import Incoming

BUCKETS = 256


def bucket_of(doc_id: str, buckets: int = BUCKETS) -> int:
    d = hashlib.blake2b(doc_id.encode(), digest_size=8, person=b"aq-ae").digest()
    return int.from_bytes(d, "big") % buckets


def record_hash(doc_id: str, version: int, writer: str) -> int:
    """A record's share of its bucket's digest (XOR-ed in, so order does not matter and a
    replica can keep its digests up to date write by write)."""
    h = hashlib.blake2b(f"{doc_id}\x00{version}\x00{writer}".encode(), digest_size=16)
    return int.from_bytes(h.digest(), "big")


def digests(records: Iterable[tuple[str, int, str]], buckets: int = BUCKETS) -> list[str]:
    """Per bucket, an order-independent digest of (id, version, writer) of its records."""
    acc = [0] * buckets
    for doc_id, version, writer in records:
        acc[bucket_of(doc_id, buckets)] ^= record_hash(doc_id, version, writer)
    return format_digests(acc)


def format_digests(acc: list[int]) -> list[str]:
    return [format(a, "032x") for a in acc]


def newer(a: Incoming, b: Incoming | None) -> bool:
    """Does write `a` win over `b` (last writer wins: version, then writer id)?"""
    return b is None or (a.version, a.writer) > (b.version, b.writer)
