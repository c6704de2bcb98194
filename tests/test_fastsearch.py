"""The simdjson fast path of search bodies gives exactly what the general path gives (the same
request, or the same 400), and steps aside (None) for whatever it does not take."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.errors import AquilaError
from aquila.cluster.model.operations import SearchRequest
from aquila.node.http.api import decode_body
from aquila.node.http.fastsearch import parse_search_fast
from aquila.node.http.parse import parse_search

DIM = 4
LIMIT = 1 << 20

numbers = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False), st.integers(-(10**6), 10**6),
    st.floats(-1e6, 1e6, allow_nan=False), st.floats(-1.0, 1.0),
    st.sampled_from([1e15, 1.0000000000000002e15, -1e16, 3.4e38, 2**53 + 1, 2**64 - 1, -0.0,
                     5e-324, 0.1]),
)
items = st.one_of(numbers, numbers, numbers, st.sampled_from(["1", True, False, None, [1.0], {}]))
good_rows = st.lists(numbers, min_size=DIM, max_size=DIM)
rows = st.one_of(
    good_rows, good_rows, good_rows,
    st.lists(items, min_size=DIM - 1, max_size=DIM + 1),
    st.sampled_from(["x", None, {}, [], [[1, 2], [], 3, 4], [[1], [2], [3], [4]]]),
)
scalars = st.one_of(
    st.integers(-5, 2000), st.integers(1, 100), st.integers(1, 100), st.sampled_from([0, 1, 10, 100, 10**19, -(2**63), 2**64 - 1, 1.0,
                                            0.95, 1.5, True, False, None, "10", "", [], {}]),
)
includes = st.one_of(
    st.lists(st.sampled_from(["metadata", "vector"]), max_size=2),
    st.lists(st.sampled_from(["metadata", "vector", "x", "[", 1, None]), max_size=3),
    st.sampled_from(["metadata", {}, None]),
)
options = {
    "k": scalars, "nprobe": scalars, "recall": st.one_of(st.floats(0, 1.5), scalars),
    "include": includes, "allow_partial": scalars, "timeout_ms": scalars, "explain": scalars,
    "filter": st.sampled_from([None, {"a": 1}, {"a": {"$in": [1, 2]}}, "x"]),
    "id": st.sampled_from(["a", "", 5]), "ids": st.sampled_from([["a"], [], "a"]),
    "other": scalars,
}


@st.composite
def bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {}
    query = draw(st.sampled_from(["vector", "vector", "vectors", "vectors", "both", "none"]))
    if query in ("vector", "both"):
        body["vector"] = draw(rows)
    if query in ("vectors", "both"):
        body["vectors"] = draw(st.one_of(st.lists(good_rows, min_size=1, max_size=3),
                                         st.lists(rows, max_size=3), rows))
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        if name in ("k", "nprobe", "include") or draw(st.integers(0, 3)) == 3:
            body[name] = draw(options[name])
    return draw(st.sampled_from([body, body, body, body, body, body, [], 1, "x", None]))


def _outcome(parse: Any) -> Any:
    try:
        return parse()
    except AquilaError as exc:
        return (type(exc), str(exc))


def _general(raw: bytes) -> Any:
    return _outcome(lambda: parse_search(decode_body(raw, LIMIT), DIM))


def _same(fast: Any, general: Any) -> None:
    if not isinstance(general, SearchRequest):
        assert fast == general
        return
    assert isinstance(fast, SearchRequest), fast
    for name, want in vars(general).items():
        got = getattr(fast, name)
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want) and np.array_equal(np.signbit(got), np.signbit(want))
        elif name != "predicate":  # built from `filter`, compared there
            assert got == want, name


def _check(raw: bytes) -> Any:
    fast = _outcome(lambda: parse_search_fast(raw, DIM))
    if fast is not None:
        _same(fast, _general(raw))
    return fast


@settings(max_examples=600, deadline=None)
@given(bodies())
def test_fast_path_agrees_with_the_general_path(body: Any) -> None:
    _check(orjson.dumps(body))


@settings(max_examples=300, deadline=None)
@given(bodies(), st.data())
def test_fast_path_agrees_on_mangled_bytes(body: Any, data: st.DataObject) -> None:
    """Cut, spliced or byte-flipped bodies: never a different answer than the general path."""
    raw = bytearray(orjson.dumps(body))
    for _ in range(data.draw(st.integers(1, 3))):
        if not raw:
            break
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[at] = data.draw(st.sampled_from(b'[]{},:"0-eE. \\\xef'))
        elif op == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.sampled_from([b"[", b"]", b" ", b'"k":1,', b"1e400", b"\n"]))
    _check(bytes(raw))



@pytest.mark.parametrize("raw", [
    b'{"vector":[1,2,3,4],"k":3}',
    b'{"vectors":[[1,2,3,4],[0.5,-0.5,0,1e-3]],"k":2,"nprobe":8,"include":["vector"]}',
    b'{"vector":[1,2,3,4],"recall":0.9,"allow_partial":false,"timeout_ms":50,"explain":true}',
])
def test_common_bodies_take_the_fast_path(raw: bytes) -> None:
    fast = _check(raw)
    assert isinstance(fast, SearchRequest)


@pytest.mark.parametrize("raw", [
    b'{"vector":[1,2,3,[4]]}',  # nested: as_buffer would flatten it
    b'{"vector":[[1],[2],[3],[4]]}',
    b'{"vectors":[[1,2],[3,4],[]],"k":1}',
    b'{"vector":[1,2,3,4],"k":1,"k":2}',  # duplicate key: orjson keeps the last
    b'\xef\xbb\xbf{"vector":[1,2,3,4]}',  # byte-order mark: orjson refuses it
    b' {"vector":[1,2,3,4]}',
    b'{"vector":[1,2,3,1e400]}',
    b'{"vector":[1,2,3,1e16]}',
    b'{"vector":[1,2,3,true]}',
    b'{"vector":[1,2,3,4],"filter":{"a":1}}',
    b'{"vector":[1,2,3,4],"include":["metadata","["]}',
    b'{"vector":[1,2,3,4],"k":"["}',
    b'{"vector":[1,2,3,4]',
    b'{"vector":[1,2,3,4]} x',
])
def test_unusual_bodies_are_left_to_the_general_path(raw: bytes) -> None:
    assert parse_search_fast(raw, DIM) is None


def test_a_wrong_option_is_the_general_paths_400() -> None:
    raw = b'{"vector":[1,2,3,4],"k":0}'
    fast = _check(raw)
    assert isinstance(fast, tuple) and "'k' must be" in fast[1]


def test_large_bodies_count_their_brackets_too() -> None:
    """A batch's body is past the size from which its "[" are counted on an array: a nested
    row there is still left to the general path, and a flat batch still takes the fast one."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((1000, DIM)).round(6).tolist()
    flat = orjson.dumps({"vectors": rows, "k": 5})
    assert len(flat) > 32 << 10
    fast = _check(flat)
    assert isinstance(fast, SearchRequest)
    assert np.array_equal(fast.vectors, np.asarray(rows, np.float32))
    # One component made an array of one: as_buffer would flatten it to the same count.
    nested = flat.replace(b"[%s," % orjson.dumps(rows[500][0]), b"[[%s]," % orjson.dumps(
        rows[500][0]), 1)
    assert nested != flat
    assert parse_search_fast(nested, DIM) is None
    # A "[" inside a string (an include's) among them: the general path's too.
    assert parse_search_fast(flat[:-1] + b',"include":["["]}', DIM) is None
