"""Bounds on everything that arrives from the network, in one place.

Nothing a client or a peer sends is trusted to be small, well typed or sane: every number is
checked to be an integer (a float such as `1e300` is not one) within a named range before it
is used, every string and list has a length limit, and every nesting a depth limit. The
ranges leave room for what the node itself derives from them: an incarnation one above an
accusation, an epoch one above the highest seen, versions from a clock that has observed the
highest accepted version; all of them stay encodable by orjson (below 2^64) and by the
store's 64-bit fields.

The checked helpers raise `BoundsError`, a ValueError: the gossip decoder turns it into a
DecodeError, the peer routes into a 400, the cluster-state decoder into an ignored update.
Limits of the public API are answered as 400 `bad_request` by the request parsers, which
take their numbers from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# --- numbers peers send ---------------------------------------------------------------------

# Gossip incarnations. Accusations (suspect, dead) must stay below the maximum so that the
# accused can always refute with one more, and that refutation still decodes everywhere.
MAX_INCARNATION = 2**62
# Cluster-state epochs: every change takes the highest seen + 1.
MAX_EPOCH = 2**62
# Document versions (hybrid logical clock: Unix milliseconds << 16). Stored as unsigned 64
# bits; the clock itself never adopts one above MAX_OBSERVED_VERSION (the year 4199), so the
# versions this node issues stay far from the top however far ahead a peer claims to be.
MAX_VERSION = 2**63 - 1
MAX_OBSERVED_VERSION = 2**62
# Document counts a peer reports (a shard's count, documents written or deleted).
MAX_COUNT = 2**53
# Probe sequence numbers: ours count up from 1; anything the size of an int64 is fine.
MAX_SEQ = 2**62

# --- vectors ---------------------------------------------------------------------------------
# The largest magnitude of a vector's component: beyond it a squared distance or an inner product
# over 65,536 dimensions could overflow float32 (a search would find nothing, or everything at
# infinity). Far above any embedding's values.
MAX_VECTOR_VALUE = 1e15


def vectors_within(x: np.ndarray) -> np.ndarray:
    """Per row: every component finite and within ±MAX_VECTOR_VALUE."""
    # The usual batch is all within: two reductions say so without the temporary arrays of
    # the per-row check (a NaN makes both comparisons false, as an infinity does one).
    if x.size and x.min() >= -MAX_VECTOR_VALUE and x.max() <= MAX_VECTOR_VALUE:
        return np.ones(x.shape[:-1], dtype=bool)
    ok: np.ndarray = (np.abs(x) <= MAX_VECTOR_VALUE).all(axis=-1)
    return ok


def all_within(x: np.ndarray) -> bool:
    """`vectors_within(x).all()`: every component of every row finite and within bounds."""
    return not x.size or bool(x.min() >= -MAX_VECTOR_VALUE and x.max() <= MAX_VECTOR_VALUE)


# --- sizes of what peers send ---------------------------------------------------------------

MAX_NODE_ID_CHARS = 128
MAX_ADDR_CHARS = 300  # a 253-character host name, brackets, colon and port
MAX_UID_CHARS = 64
# Nesting of a member's gossip metadata (nodes send {}): it must still encode where it is
# carried, inside a push-pull row, far below orjson's 255 levels.
MAX_MEMBER_META_DEPTH = 16
# Members in one push-pull, parts in one compound packet.
MAX_MEMBERS = 4096
MAX_COMPOUND_PARTS = 256
# Replicas listed for one shard in the map (replication is at most 16; a move adds one).
MAX_REPLICAS_PER_SHARD = 64
# A peer's request for a page of a shard (transfers ask for 1,000).
MAX_STREAM_LIMIT = 10_000
# Hash buckets of an anti-entropy digest (256 in use).
MAX_DIGEST_BUCKETS = 4096

# --- the public API (400 bad_request beyond) --------------------------------------------------

MAX_QUERIES = 1000  # query vectors in one search
MAX_QUERY_RESULTS = 100_000  # queries × k in one search
# Floats of the vectors an answer returns: queries × k × dim for a search with "vector" in
# its include, limit × dim for a scroll's page (64 MiB as float32, about 200 MiB of JSON).
# 100 queries of k 1,000 with vectors of dim 4,096 would have been 410 million floats: a
# node's memory several times over, asked by anyone who may search.
MAX_ANSWER_FLOATS = 1 << 24
# Bytes of metadata in one search's answer: a document found by every query of a search is
# in the answer once a query.
MAX_ANSWER_METADATA = 256 << 20
# Bytes of one document's metadata (its JSON serialised, minified), checked at every write
# a client sends. Without it a record was bounded only by the body limit (64 MiB), and every
# read that takes records a batch at a time (a search's hits, a scroll's page, a filter's
# candidates) held up to that much a record before it could count. Pinecone allows 40 KB,
# Milvus's JSON fields 64 KiB.
MAX_DOCUMENT_METADATA = 1 << 20
# Bytes of metadata one scroll page gathers, at most about: a shard's part of a page ends
# once its documents reach it (the page then has fewer than `limit` documents and a cursor
# that goes on from there), and the page visits no further shard. 1,000 documents of 1 MiB
# would otherwise be a page of a gigabyte.
MAX_PAGE_METADATA = 32 << 20
MAX_FILTER_CONDITIONS = 100  # conditions of a filter, must + should + must_not
MAX_FILTER_IN_VALUES = 1000  # values of one `in` condition
MAX_DELETE_IDS = 10_000  # ids in one delete
MAX_SEEDS = 32  # seeds of one join (and of --seeds)
MAX_TIMEOUT_MS = 600_000  # a search's timeout_ms
MAX_NPROBE = 1 << 20
# Nesting of a document's metadata: {"a": {"b": 1}} has depth 2, {} depth 1.
MAX_METADATA_DEPTH = 32


class BoundsError(ValueError):
    """A value from the network outside its type or range."""


def checked_int(value: Any, lo: int, hi: int, what: str) -> int:
    """`value` if it is an integer (not a bool, not a float) from `lo` to `hi`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BoundsError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise BoundsError(f"{what} must be from {lo} to {hi}")
    return value


_ASCII_DIGITS = frozenset(b"0123456789")


def parse_uint(text: str | bytes, hi: int, what: str) -> int:
    """The integer 0 to `hi` that `text` writes in plain ASCII digits, no longer than `hi`
    written out: what a peer or client sends as a number in text (a header, a JSON object's
    key). `int()` alone also takes signs, underscores, surrounding whitespace and every
    script's digits ("²", "١٠"), and spends quadratic time on thousands of digits."""
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    if not 0 < len(raw) <= len(str(hi)) or not _ASCII_DIGITS.issuperset(raw):
        raise BoundsError(f"{what} must be an integer from 0 to {hi} in ASCII digits")
    value = int(raw)
    if value > hi:
        raise BoundsError(f"{what} must be from 0 to {hi}")
    return value


def checked_str(value: Any, max_chars: int, what: str, *, min_chars: int = 0) -> str:
    """`value` if it is a string of `min_chars` to `max_chars` characters."""
    if not isinstance(value, str):
        raise BoundsError(f"{what} must be a string, got {type(value).__name__}")
    if not min_chars <= len(value) <= max_chars:
        raise BoundsError(f"{what} must have {min_chars} to {max_chars} characters")
    return value


def checked_list(value: Any, max_len: int, what: str) -> list[Any]:
    """`value` if it is a list of at most `max_len` items."""
    if not isinstance(value, list):
        raise BoundsError(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > max_len:
        raise BoundsError(f"{what} may hold at most {max_len} items, got {len(value)}")
    return value


def depth_exceeds(value: Any, limit: int) -> bool:
    """Does `value` (decoded JSON) nest objects and arrays more than `limit` deep? Iterative,
    so that no nesting, however deep, reaches Python's recursion limit."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False
