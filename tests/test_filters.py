"""Metadata filters: cluster/model/filters.py unit tests, and filtered search over HTTP (the k best
MATCHING documents, not the matches among the k best)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.filters import parse_filter
from tests.conftest import Node, brute_force, expect_error

DOC: dict[str, Any] = {
    "color": "red",
    "n": 5,
    "x": 2.5,
    "flag": True,
    "zero": 0,
    "one": 1,
    "none": None,
    "tags": ["a", "b", 3],
    "a": {"b": {"c": "deep"}, "n": 10},
    "dotted.key": "literal",
}


def matches(flt: Any, doc: Any = DOC) -> bool:
    pred = parse_filter(flt)
    assert pred is not None
    return pred(doc)


def must(*conds: dict[str, Any]) -> dict[str, Any]:
    return {"must": list(conds)}


# -- unit: conditions -----------------------------------------------------------------------
def test_no_filter_is_none() -> None:
    assert parse_filter(None) is None


def test_empty_filter_matches_everything() -> None:
    assert matches({}) and matches({}, {})
    assert matches({"must": [], "should": [], "must_not": []})


@pytest.mark.parametrize(
    ("cond", "want"),
    [
        ({"key": "color", "match": "red"}, True),
        ({"key": "color", "match": "blue"}, False),
        ({"key": "color", "match": "RED"}, False),
        ({"key": "n", "match": 5}, True),
        ({"key": "n", "match": 5.0}, True),  # JSON numbers: 5 == 5.0
        ({"key": "n", "match": "5"}, False),
        ({"key": "x", "match": 2.5}, True),
        ({"key": "none", "match": None}, True),
        ({"key": "missing", "match": None}, False),  # a missing key matches nothing
        ({"key": "color", "match": None}, False),
        # bool vs int: true is not 1, false is not 0 (either way round).
        ({"key": "flag", "match": True}, True),
        ({"key": "flag", "match": 1}, False),
        ({"key": "one", "match": True}, False),
        ({"key": "zero", "match": False}, False),
        ({"key": "one", "match": 1}, True),
        # list values: match when any element does.
        ({"key": "tags", "match": "a"}, True),
        ({"key": "tags", "match": 3}, True),
        ({"key": "tags", "match": "c"}, False),
        ({"key": "tags", "match": True}, False),
        # nested keys
        ({"key": "a.b.c", "match": "deep"}, True),
        ({"key": "a.n", "match": 10}, True),
        ({"key": "a.b", "match": "deep"}, False),
        ({"key": "a.b.c.d", "match": "deep"}, False),
        ({"key": "a.x.c", "match": "deep"}, False),
        ({"key": "color.x", "match": "red"}, False),
        # a dotted key is a path, never a literal key with a dot
        ({"key": "dotted.key", "match": "literal"}, False),
    ],
)
def test_match(cond: dict[str, Any], want: bool) -> None:
    assert matches(must(cond)) is want


@pytest.mark.parametrize(
    ("cond", "want"),
    [
        ({"key": "color", "in": ["blue", "red"]}, True),
        ({"key": "color", "in": ["blue"]}, False),
        ({"key": "color", "in": []}, False),
        ({"key": "n", "in": [1, 5]}, True),
        ({"key": "flag", "in": [1, "true"]}, False),
        ({"key": "flag", "in": [False, True]}, True),
        ({"key": "one", "in": [True]}, False),
        ({"key": "tags", "in": ["z", "b"]}, True),
        ({"key": "tags", "in": ["z"]}, False),
        ({"key": "a.b.c", "in": ["deep", "shallow"]}, True),
        ({"key": "missing", "in": [None]}, False),
        ({"key": "none", "in": [None, 1]}, True),
    ],
)
def test_in(cond: dict[str, Any], want: bool) -> None:
    assert matches(must(cond)) is want


@pytest.mark.parametrize(
    ("bounds", "key", "want"),
    [
        ({"gte": 5}, "n", True),
        ({"gt": 5}, "n", False),
        ({"lte": 5}, "n", True),
        ({"lt": 5}, "n", False),
        ({"gt": 4.5, "lt": 5.5}, "n", True),
        ({"gte": 2.5, "lte": 2.5}, "x", True),
        ({"gt": 2, "lt": 3}, "x", True),
        ({"gt": 3}, "x", False),
        ({"gte": 0}, "a.n", True),
        ({"gte": 0}, "color", False),  # a string is not in a numeric range
        ({"gte": 0}, "flag", False),  # nor is a boolean
        ({"gte": 0}, "none", False),
        ({"gte": 0}, "missing", False),
        ({"gte": 0}, "tags", False),  # nor a list
        ({"gte": -1e308}, "zero", True),
    ],
)
def test_range(bounds: dict[str, Any], key: str, want: bool) -> None:
    assert matches(must({"key": key, "range": bounds})) is want


# -- unit: clauses --------------------------------------------------------------------------
RED = {"key": "color", "match": "red"}
BLUE = {"key": "color", "match": "blue"}
FIVE = {"key": "n", "match": 5}


@pytest.mark.parametrize(
    ("flt", "want"),
    [
        ({"must": [RED, FIVE]}, True),
        ({"must": [RED, BLUE]}, False),
        ({"should": [BLUE, FIVE]}, True),
        ({"should": [BLUE]}, False),
        ({"should": [BLUE, {"key": "n", "match": 6}]}, False),
        ({"must_not": [BLUE]}, True),
        ({"must_not": [BLUE, RED]}, False),
        ({"must": [RED], "should": [BLUE], "must_not": []}, False),  # should needs one match
        ({"must": [RED], "should": [BLUE, FIVE], "must_not": [BLUE]}, True),
        ({"must": [RED], "must_not": [FIVE]}, False),
        ({"must_not": [{"key": "missing", "match": 1}]}, True),
    ],
)
def test_clauses(flt: dict[str, Any], want: bool) -> None:
    assert matches(flt) is want


def test_non_object_metadata_matches_no_condition() -> None:
    assert not matches(must(RED), [])
    assert not matches(must(RED), None)
    assert matches({"must_not": [RED]}, "text")


@pytest.mark.parametrize(
    "flt",
    [
        [],
        "color=red",
        1,
        {"must": RED},
        {"must": None},
        {"filter": [RED]},
        {"must": [RED], "and": []},
        {"must": ["color"]},
        {"must": [{}]},
        {"must": [{"key": "color"}]},
        {"must": [{"key": "", "match": 1}]},
        {"must": [{"key": 1, "match": 1}]},
        {"must": [{"key": None, "match": 1}]},
        {"must": [{"match": "red"}]},
        {"must": [{"key": "color", "match": "red", "in": ["red"]}]},
        {"must": [{"key": "color", "match": "red", "extra": 1}]},
        {"must": [{"key": "color", "match": ["red"]}]},
        {"must": [{"key": "color", "match": {"eq": "red"}}]},
        {"must": [{"key": "color", "in": "red"}]},
        {"must": [{"key": "color", "in": [["red"]]}]},
        {"must": [{"key": "color", "in": [{"a": 1}]}]},
        {"must": [{"key": "n", "range": 5}]},
        {"must": [{"key": "n", "range": {}}]},
        {"must": [{"key": "n", "range": {"eq": 5}}]},
        {"must": [{"key": "n", "range": {"gte": "5"}}]},
        {"must": [{"key": "n", "range": {"gte": True}}]},
        {"must": [{"key": "n", "range": {"gte": None}}]},
        {"should": [RED, {"key": "n"}]},
        {"must_not": [RED, "x"]},
    ],
)
def test_bad_shapes(flt: Any) -> None:
    with pytest.raises(BadRequest) as info:
        parse_filter(flt)
    assert info.value.status == 400 and info.value.code == "bad_request"


def test_bad_shape_message_names_the_condition() -> None:
    with pytest.raises(BadRequest, match=r"filter\.should\[1\]"):
        parse_filter({"should": [RED, {"key": "n"}]})


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["a", "b"]))


@settings(max_examples=200, deadline=None)
@given(value=SCALARS, want=SCALARS)
def test_match_is_json_equality_with_bool_apart(value: Any, want: Any) -> None:
    got = matches(must({"key": "k", "match": want}), {"k": value})
    same = type(value) is type(want) or (type(value) in (int, float) and type(want) in (int, float))
    assert got is (same and value == want)
    # `in` with one value is the same as `match`; a list value matches through any element.
    assert matches(must({"key": "k", "in": [want]}), {"k": value}) is got
    assert matches(must({"key": "k", "match": want}), {"k": ["zz", value]}) is got


@settings(max_examples=200, deadline=None)
@given(
    v=st.one_of(st.integers(-10, 10), st.floats(-10, 10, allow_nan=False)),
    lo=st.integers(-10, 10),
    hi=st.integers(-10, 10),
)
def test_range_agrees_with_python(v: float, lo: int, hi: int) -> None:
    flt = must({"key": "v", "range": {"gte": lo, "lt": hi}})
    assert matches(flt, {"v": v}) is (lo <= v < hi)


# -- HTTP -----------------------------------------------------------------------------------
def make_metadata(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    colors = ["red", "green", "blue"]
    return [
        {
            "color": colors[int(rng.integers(3))],
            "n": int(rng.integers(0, 100)),
            "rare": bool(i % 50 == 0),
            "tags": [f"t{int(t)}" for t in rng.integers(0, 5, size=2)],
            "info": {"year": 1990 + int(rng.integers(0, 30))},
        }
        for i in range(n)
    ]


FILTERS: list[dict[str, Any]] = [
    {"must": [{"key": "color", "match": "red"}]},
    {"must": [{"key": "rare", "match": True}]},
    {"must": [{"key": "tags", "match": "t1"}, {"key": "n", "range": {"gte": 20, "lt": 60}}]},
    {
        "should": [{"key": "color", "in": ["green", "blue"]}],
        "must_not": [{"key": "n", "range": {"lt": 50}}],
    },
    {"must": [{"key": "info.year", "range": {"gt": 2015}}]},
    {"must": [{"key": "color", "match": "purple"}]},  # matches nothing
]


async def assert_filtered_equals_brute_force(
    node: Node,
    name: str,
    x: np.ndarray,
    ids: list[str],
    meta: list[dict[str, Any]],
    q: np.ndarray,
    k: int,
    metric: str,
) -> None:
    for flt in FILTERS:
        pred = parse_filter(flt)
        assert pred is not None
        rows = np.flatnonzero([pred(m) for m in meta])
        res = await node.search(name, vectors=q.tolist(), k=k, filter=flt)
        for i, row in enumerate(res["results"]):
            got = [h["id"] for h in row]
            assert all(pred(h["metadata"]) for h in row)
            if len(rows) == 0:
                assert got == []
                continue
            want, want_s = brute_force(x[rows], q[i : i + 1], min(k, len(rows)), metric)
            assert got == [ids[rows[j]] for j in want[0]], (flt, i)
            np.testing.assert_allclose([h["score"] for h in row], want_s[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
async def test_filtered_search_flat(node: Node, metric: str) -> None:
    rng = np.random.default_rng(11)
    dim, n, k = 12, 600, 10
    x = rng.standard_normal((n, dim)).astype(np.float32)
    meta = make_metadata(n, rng)
    await node.create("f", dim=dim, metric=metric, index="flat", shards=3)
    ids = await node.upsert_matrix("f", x, metadata=meta)
    q = rng.standard_normal((5, dim)).astype(np.float32)
    await assert_filtered_equals_brute_force(node, "f", x, ids, meta, q, k, metric)


async def test_filtered_search_on_trained_ivf(node: Node) -> None:
    rng = np.random.default_rng(12)
    dim, n, k = 12, 1200, 10
    x = rng.standard_normal((n, dim)).astype(np.float32)
    meta = make_metadata(n, rng)
    await node.create("fi", dim=dim, metric="l2", index="ivf_flat", shards=2)
    ids = await node.upsert_matrix("fi", x, metadata=meta)
    await node.wait_trained("fi")
    q = rng.standard_normal((5, dim)).astype(np.float32)
    # The filter is applied before ranking: with nprobe=1 an unfiltered IVF search would miss
    # most of a selective filter's matches, but a filtered one still finds its k best.
    await assert_filtered_equals_brute_force(node, "fi", x, ids, meta, q, k, "l2")
    rare = {"must": [{"key": "rare", "match": True}]}
    res = await node.search("fi", vectors=q.tolist(), k=k, filter=rare, nprobe=1)
    n_rare = sum(m["rare"] for m in meta)
    assert all(len(row) == min(k, n_rare) for row in res["results"])

    # Deleted and updated documents are filtered by their current metadata only.
    rare_ids = [ids[i] for i, m in enumerate(meta) if m["rare"]]
    resp = await node.client.post("/v1/collections/fi/documents/delete", json={"ids": rare_ids[:5]})
    assert (await resp.json()) == {"deleted": 5}
    await node.upsert(
        "fi", [{"id": rare_ids[5], "vector": x[0].tolist(), "metadata": {"rare": False}}]
    )
    res = await node.search("fi", vectors=q.tolist(), k=n_rare, filter=rare)
    for row in res["results"]:
        assert {h["id"] for h in row} == set(rare_ids[6:])


async def test_filter_errors_over_http(node: Node) -> None:
    await node.create("fe", dim=2)
    for flt in ({"must": {"key": "a"}}, {"must": [{"key": "a", "range": {"gte": "x"}}]}, "a"):
        resp = await node.client.post(
            "/v1/collections/fe/search", json={"vector": [0, 0], "filter": flt}
        )
        await expect_error(resp, 400, "bad_request")
    res = await node.search("fe", vector=[0, 0], filter=None)
    assert res["results"] == [[]]
