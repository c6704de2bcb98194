"""A fast path for a search with many query vectors (`"vectors": [[...], ...]`): simdjson
reads them straight into one numpy buffer, without the tens of thousands of Python floats a
general JSON parser makes and numpy then converts back (for 100 vectors of dim 384, twice the
time of the rest of the request but FAISS).

It accepts only what the general path (`node.http.parse.parse_search`) accepts, with the
same result: the other fields go through `parse_search` itself; anything unusual about the
vectors — a row of another length, a non-number, a value out of bounds, another way of
giving queries besides — returns None, and the caller takes the general path, which says
precisely what is wrong.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import simdjson

from aquila.cluster.model.bounds import MAX_QUERIES, MAX_QUERY_RESULTS, vectors_within
from aquila.cluster.model.errors import AquilaError
from aquila.cluster.model.operations import SearchRequest
from aquila.node.blocking import Blocking
from aquila.node.http.parse import parse_search

# Below this a body is small enough that the general path costs no more.
FAST_SEARCH_BYTES = 32 << 10
# The other ways of giving queries: with "vectors" besides, the general path refuses.
_OTHER_QUERIES = ("vector", "id", "ids")


async def parse_search_fast(blocking: Blocking, raw: bytes, dim: int) -> SearchRequest | None:
    """The search in `raw` when it is a large well-formed one (parsed on a parse thread), or
    None: the general path must look at it."""
    if len(raw) < FAST_SEARCH_BYTES or b'"vectors"' not in raw:
        return None
    return await blocking.parse(search_from_json, raw, dim)


def search_from_json(raw: bytes, dim: int) -> SearchRequest | None:
    try:
        root = simdjson.Parser().parse(raw)
    except (ValueError, TypeError, RuntimeError):
        return None
    if not isinstance(root, simdjson.Object):
        return None
    keys = list(root.keys())
    if len(set(keys)) != len(keys) or any(k in root for k in _OTHER_QUERIES):
        return None  # a key given twice: the general parser's (last one wins) decides
    rows = root.get("vectors")
    if not isinstance(rows, simdjson.Array) or not 0 < len(rows) <= MAX_QUERIES:
        return None
    n = len(rows)
    try:
        if not all(isinstance(r, simdjson.Array) and len(r) == dim for r in rows):
            return None
        flat = np.frombuffer(rows.as_buffer(of_type="d"), dtype=np.float64)
        minis = {k: _mini(v) if isinstance(v, simdjson.Object | simdjson.Array) else None
                 for k in keys if k != "vectors" for v in (root[k],)}
        rest = {k: root[k] if m is None else orjson.loads(m) for k, m in minis.items()}
    except (ValueError, TypeError, orjson.JSONDecodeError):
        return None  # a non-number in a vector, a number simdjson refuses, too deep
    # as_buffer flattens nested arrays: n rows of dim numbers and nothing deeper, that is
    # no "[" in the body but the n + 1 of the vectors and those of the other fields (a "["
    # in a string is in its field's minified form too; there is none in a vector).
    brackets = n + 1 + sum(m.count(b"[") for m in minis.values() if m is not None)
    if len(flat) != n * dim or raw.count(b"[") != brackets:
        return None
    arr = flat.reshape(n, dim)
    if not vectors_within(arr).all():  # as sent, before float32 rounds them
        return None
    # Every other field checked by the general path, with one stand-in query.
    rest["vector"] = [0.0] * dim
    try:
        req = parse_search(rest, dim)
    except AquilaError:
        return None
    if n * req.k > MAX_QUERY_RESULTS:
        return None
    return dataclasses.replace(req, vectors=arr.astype(np.float32))


def _mini(node: simdjson.Object | simdjson.Array) -> bytes:
    """Minified JSON of a node (bytes here; some versions of the stubs say str)."""
    out: bytes | str = node.mini
    return out.encode() if isinstance(out, str) else out
