"""Hypothesis strategies for fuzzing what arrives from the network: junk JSON values, the
edge values a forger tries on a field, and mutations of a valid message."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from aquila.cluster.model.bounds import MAX_INCARNATION

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8,
)

# Values a forger tries on a field: the edges of every bound (half of the draws are those
# that once got through and broke something), the wrong types, deep nesting.
tricky = st.sampled_from([
    2**64, 2**70, 1e300, -(2**64), 2**64 - 1, MAX_INCARNATION, MAX_INCARNATION + 1, -1,
]) | st.sampled_from([
    2**63, MAX_INCARNATION - 1, 0, 1.0, True, None, "1", "", [], {}, "10.0.0.1:1/x", "a" * 300,
    "..", "/tmp/x", "a\n", "AAAA", "%%%",
]) | st.integers(1, 400).map(lambda n: json.loads("[" * n + "]" * n))


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _is_int(obj: Any, path: tuple[Any, ...]) -> bool:
    for key in path:
        obj = obj[key]
    return isinstance(obj, int) and not isinstance(obj, bool)


def mutate(draw: st.DrawFn, obj: Any, *, skip: tuple[str, ...] = ()) -> Any:
    """`obj` (a decoded JSON value, changed in place) with up to two fields replaced by a
    tricky value or junk, or deleted; numbers are picked more often (keys in `skip` never)."""
    for _ in range(draw(st.integers(0, 2))):
        paths = [p for p in _paths(obj) if not (p and p[-1] in skip)]
        numbers = [p for p in paths if p and _is_int(obj, p)]
        if numbers and draw(st.booleans()):  # the fields a forger most likes to push
            paths = numbers
        path = draw(st.sampled_from(paths))
        value = draw(tricky | junk)
        if not path:
            obj = value
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.integers(0, 5)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return obj


def dumps(obj: Any) -> bytes:
    """JSON as a forger writes it: Python's json, which writes any integer (2^64 too)."""
    return json.dumps(obj).encode()
