"""The fast path of searches with many vectors (`node.http.fastsearch`) answers exactly as the
general path (`parse_search` over orjson) does, or steps aside (None) for it."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from aquila.cluster.model.errors import AquilaError
from aquila.cluster.model.operations import SearchRequest
from aquila.node.blocking import Blocking
from aquila.node.http.api import decode_body
from aquila.node.http.fastsearch import FAST_SEARCH_BYTES, parse_search_fast, search_from_json
from aquila.node.http.parse import parse_search

DIM = 8


def general(raw: bytes) -> SearchRequest | None:
    try:
        return parse_search(decode_body(raw, 1 << 30), DIM)
    except AquilaError:
        return None


def same(a: SearchRequest, b: SearchRequest) -> None:
    assert a.vectors.dtype == b.vectors.dtype == np.float32
    assert a.vectors.tobytes() == b.vectors.tobytes() and a.vectors.shape == b.vectors.shape
    for f in ("k", "nprobe", "filter", "include_metadata", "include_vector", "allow_partial",
              "timeout_ms", "explain", "query_ids", "recall"):
        assert getattr(a, f) == getattr(b, f), f
    assert (a.predicate is None) == (b.predicate is None)


def check(raw: bytes) -> SearchRequest | None:
    """The fast path gives what the general one does, or None; None whenever the general
    path refuses the body."""
    fast = search_from_json(raw, DIM)
    slow = general(raw)
    if slow is None:
        assert fast is None, raw[:200]
    if fast is not None:
        assert slow is not None
        same(fast, slow)
    return fast


def test_well_formed_bodies_parse_as_the_general_path_does() -> None:
    rng = np.random.default_rng(7)
    extras: list[dict[str, Any]] = [
        {}, {"k": 3}, {"nprobe": 17, "include": ["vector"]}, {"recall": 0.9, "k": 100},
        {"filter": {"must": [{"key": "a.b", "match": 3}]}, "include": []},
        {"filter": {"should": [{"key": "x[", "in": ["[", "]]"]}]}},  # brackets in strings
        {"allow_partial": False, "timeout_ms": 250, "explain": True, "include": ["metadata"]},
    ]
    for extra in extras:
        for n in (1, 5, 300):
            vecs = (rng.standard_normal((n, DIM)) * 10.0 ** rng.integers(-20, 14, (n, 1)))
            raw = orjson.dumps({"vectors": vecs.tolist(), **extra})
            fast = check(raw)
            assert fast is not None and len(fast.vectors) == n
    # Integers and exponents are numbers too; the last value just within the bound.
    raw = b'{"vectors": [[1, 2, -3, 0, 1e3, 2.5E-3, 1e15, -1e15]], "k": 2}'
    assert check(raw) is not None


@pytest.mark.parametrize("body", [
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7]]}',  # a short row
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8, 9]]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7]]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]}',  # lengths that sum right
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, [8]]]}',  # nested deeper
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, []], [1, 2, 3, 4, 5, 6, 7, [8, 9]]]}',  # 16 in all
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, "8"]]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, true]]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, null]]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 1.0000001e15]]}',  # beyond the bound
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 1e400]]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 123456789012345678901234567890]]}',
    b'{"vectors": []}', b'{"vectors": [1, 2]}', b'{"vectors": {"a": 1}}', b'[1, 2]',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]], "vector": [1, 2, 3, 4, 5, 6, 7, 8]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]], "ids": ["a"]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]], "k": 0}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]], "k": 10, "k": 11}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]], "nprobe": 4, "recall": 0.9}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]], "bogus": 1}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]], "filter": {"must": [{"key": 1}]}}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]], "include": ["everything"]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]]',  # truncated
    b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]]} x',
])
def test_anything_unusual_is_left_to_the_general_path(body: bytes) -> None:
    got = check(body)
    if body.count(b'"k"') == 2:
        assert got is None  # a key twice: not the fast path's to decide


def test_too_many_queries_or_results_go_the_general_way() -> None:
    row = [0.5] * DIM
    assert check(orjson.dumps({"vectors": [row] * 1001})) is None
    assert check(orjson.dumps({"vectors": [row] * 200, "k": 600})) is None
    assert check(orjson.dumps({"vectors": [row] * 100, "k": 1000})) is not None


async def test_only_large_bodies_take_the_fast_path() -> None:
    blocking = Blocking(1)
    try:
        small = orjson.dumps({"vectors": [[0.5] * DIM] * 3})
        assert await parse_search_fast(blocking, small, DIM) is None
        dim = 384
        large = orjson.dumps({"vectors": [[0.25] * dim] * 100})
        assert len(large) >= FAST_SEARCH_BYTES
        got = await parse_search_fast(blocking, large, dim)
        assert got is not None and got.vectors.shape == (100, dim)
    finally:
        blocking.close()
