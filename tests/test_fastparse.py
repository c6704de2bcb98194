"""The simdjson fast path accepts exactly what the general parser accepts, with the same
result, and steps aside (None) for everything the general parser refuses."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.errors import AquilaError
from aquila.node.http.fastparse import parse_documents_fast
from aquila.node.http.parse import parse_documents

DIM = 4
numbers = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False), st.integers(-(10**6), 10**6),
    st.sampled_from([3.4e38, 1e39, -1e39, 2**64, 0.1]),
)
vector_items = st.one_of(numbers, numbers, numbers, st.sampled_from(["1", True, None, [1.0]]))
vectors = st.one_of(
    st.lists(numbers, min_size=DIM, max_size=DIM),
    st.lists(vector_items, min_size=DIM - 1, max_size=DIM + 1),
    st.sampled_from(["x", None, {}, [[1, 2], [], 3, 4], [[1, 2, 3, 4]]]),
)
metadata = st.one_of(
    st.dictionaries(st.text(max_size=3), st.one_of(st.integers(), st.text(max_size=3), st.none(),
                                                   st.lists(st.booleans(), max_size=2)),
                    max_size=3),
    st.sampled_from([None, [1], "m", 3]),
)
ids = st.one_of(st.text(min_size=1, max_size=5), st.sampled_from(["", "z" * 257, 5, None]))


@st.composite
def documents(draw: st.DrawFn) -> Any:
    doc: dict[str, Any] = {"vector": draw(vectors)}
    if draw(st.booleans()):
        doc["id"] = draw(ids)
    if draw(st.booleans()):
        doc["metadata"] = draw(metadata)
    if draw(st.integers(0, 20)) == 0:
        doc["extra"] = 1
    if draw(st.integers(0, 30)) == 0:
        del doc["vector"]
    return doc


bodies = st.one_of(
    st.fixed_dictionaries(
        {"documents": st.lists(documents(), max_size=4)},
        optional={"consistency": st.sampled_from(["one", "quorum", "all", "most", 1])},
    ),
    st.sampled_from([[], {}, {"documents": {}}, {"documents": []}, {"documents": [1]},
                     {"documents": [], "x": 1}]),
)


def general(body: Any) -> Any:
    try:
        return parse_documents(body, DIM)
    except AquilaError:
        return None


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(bodies)
def test_fast_path_agrees_with_the_general_parser(body: Any) -> None:
    raw = json.dumps(body).encode()
    fast = parse_documents_fast(raw, DIM)
    slow = general(orjson.loads(raw))
    if slow is None:
        assert fast is None
        return
    if fast is None:
        return  # stepping aside is always allowed; the general path then answers
    assert fast.consistency == slow.consistency
    assert len(fast.ids) == len(slow.ids)
    for doc, a, b in zip(body["documents"], fast.ids, slow.ids, strict=True):
        if doc.get("id") is not None:  # absent or null: generated on both sides
            assert a == b
    np.testing.assert_array_equal(fast.vectors, slow.vectors)
    assert [orjson.loads(m) for m in fast.metadata] == [orjson.loads(m) for m in slow.metadata]


def test_the_usual_batch_takes_the_fast_path() -> None:
    rng = np.random.default_rng(0)
    docs = [{"id": f"d{i}", "vector": rng.standard_normal(DIM).tolist(),
             "metadata": {"i": i, "tags": ["a", "é"]}} for i in range(50)]
    batch = parse_documents_fast(json.dumps({"documents": docs}).encode(), DIM)
    assert batch is not None and batch.ids == [f"d{i}" for i in range(50)]
    assert orjson.loads(batch.metadata[3]) == {"i": 3, "tags": ["a", "é"]}


@pytest.mark.parametrize("raw", [b"", b"nope", b'{"documents": [', b"\xff\xfe"])
def test_malformed_bodies_step_aside(raw: bytes) -> None:
    assert parse_documents_fast(raw, DIM) is None


valid_bodies = st.fixed_dictionaries(
    {"documents": st.lists(
        st.fixed_dictionaries(
            {"vector": st.lists(st.one_of(st.floats(-1e15, 1e15, allow_nan=False),
                                          st.integers(-(10**12), 10**12)),
                                min_size=DIM, max_size=DIM)},
            optional={"id": st.text(min_size=1, max_size=8),
                      "metadata": st.one_of(st.none(), st.dictionaries(
                          st.text(max_size=4), st.one_of(st.integers(-(10**9), 10**9),
                                                         st.text(max_size=4), st.booleans()),
                          max_size=3))},
        ),
        min_size=1, max_size=5)},
    optional={"consistency": st.sampled_from(["one", "quorum", "all"])},
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(valid_bodies)
def test_valid_batches_take_the_fast_path_with_the_same_result(body: Any) -> None:
    raw = json.dumps(body).encode()
    fast = parse_documents_fast(raw, DIM)
    slow = parse_documents(orjson.loads(raw), DIM)
    assert fast is not None
    np.testing.assert_array_equal(fast.vectors, slow.vectors)
    assert fast.consistency == slow.consistency
    assert [orjson.loads(m) for m in fast.metadata] == [orjson.loads(m) for m in slow.metadata]
    assert [i for d, i in zip(body["documents"], fast.ids, strict=True) if "id" in d] == [
        d["id"] for d in body["documents"] if "id" in d
    ]
