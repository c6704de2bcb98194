"""The columnar upsert: its parser (fast and general paths) against the documents form's, as a
Hypothesis property, every refusal with the documents form's error code and the row named,
and both forms over HTTP storing the same documents."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aquila.cluster.model.bounds import MAX_METADATA_DEPTH
from aquila.cluster.model.errors import AquilaError, BadRequest, DimensionMismatch, InvalidVector
from aquila.cluster.model.operations import DocBatch
from aquila.node.http.columnar import is_columnar, parse_columnar, parse_columnar_fast
from aquila.node.http.fastparse import parse_documents_fast
from aquila.node.http.parse import parse_documents
from tests.conftest import Node, expect_error, ok_json
from tests.datasets import load_sample

DIM = 5


def b64(x: npt.NDArray[np.float32]) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode()


def columnar(ids: list[str] | None, x: npt.NDArray[np.float32],
             metadata: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"vectors_b64": b64(x), **extra}
    if ids is not None:
        body["ids"] = ids
    if metadata is not None:
        body["metadata"] = metadata
    return body


def parse_both(body: dict[str, Any], dim: int = DIM) -> DocBatch:
    """The general parser's batch; the fast one must agree or step aside (None)."""
    general = parse_columnar(orjson.loads(orjson.dumps(body)), dim)
    fast = parse_columnar_fast(orjson.dumps(body), dim)
    if fast is not None:
        assert_same(fast, general)
    return general


def assert_same(a: DocBatch, b: DocBatch) -> None:
    assert a.ids == b.ids
    assert a.vectors.dtype == b.vectors.dtype == np.float32
    assert a.vectors.tobytes() == b.vectors.tobytes()
    assert [orjson.loads(m) for m in a.metadata] == [orjson.loads(m) for m in b.metadata]
    assert a.consistency == b.consistency


# -- the form against the documents form ----------------------------------------------------
json_scalar = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=12) \
    | st.floats(allow_nan=False, allow_infinity=False)
metadata = st.dictionaries(st.text(max_size=6), st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8), max_size=4)
doc_ids = st.text(min_size=1, max_size=40)
# Within MAX_VECTOR_VALUE (1e15): what a vector may hold.
finite32 = st.floats(-(2.0**46), 2.0**46, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[str], npt.NDArray[np.float32], list[Any], str]:
    n = draw(st.integers(1, 12))
    ids = draw(st.lists(doc_ids, min_size=n, max_size=n))  # duplicates allowed: later wins
    x = np.array(draw(st.lists(st.lists(finite32, min_size=DIM, max_size=DIM),
                               min_size=n, max_size=n)), dtype=np.float32)
    metas = draw(st.lists(st.none() | metadata, min_size=n, max_size=n))
    return ids, x, metas, draw(st.sampled_from(["one", "quorum", "all"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_columnar_and_documents_forms_parse_to_the_same_batch(
    case: tuple[list[str], npt.NDArray[np.float32], list[Any], str],
) -> None:
    ids, x, metas, consistency = case
    col = parse_both(columnar(ids, x, metas, consistency=consistency))
    docs_body = {"documents": [{"id": i, "vector": v.tolist(), "metadata": m}
                               for i, v, m in zip(ids, x, metas, strict=True)],
                 "consistency": consistency}
    docs = parse_documents(orjson.loads(orjson.dumps(docs_body)), DIM)
    assert_same(col, docs)
    fast_docs = parse_documents_fast(orjson.dumps(docs_body), DIM)
    if fast_docs is not None:
        assert_same(col, fast_docs)


def test_the_fast_path_takes_the_usual_body() -> None:
    x = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM)
    body = columnar(["a", "b", "c"], x, [{"pos": "noun"}, None, {"t": [1, {"u": 2}]}])
    fast = parse_columnar_fast(orjson.dumps(body), DIM)
    assert fast is not None
    assert fast.ids == ["a", "b", "c"] and fast.vectors.tobytes() == x.tobytes()
    assert fast.metadata[1] == b"{}" and fast.consistency == "quorum"


def test_without_ids_each_row_gets_a_uuid() -> None:
    batch = parse_both(columnar(None, np.ones((4, DIM), np.float32)))
    assert len(set(batch.ids)) == 4 and all(len(i) == 36 for i in batch.ids)
    assert is_columnar({"vectors_b64": ""}) and is_columnar({"ids": []})
    assert not is_columnar({"documents": [], "ids": []})


# -- refusals ---------------------------------------------------------------------------------
def refusal(body: dict[str, Any], dim: int = DIM) -> AquilaError:
    assert parse_columnar_fast(orjson.dumps(body), dim) is None
    with pytest.raises(AquilaError) as info:
        parse_columnar(orjson.loads(orjson.dumps(body)), dim)
    return info.value


def test_a_wrong_byte_count_is_a_dimension_mismatch() -> None:
    x = np.ones((3, DIM), np.float32)
    for raw in (x.tobytes()[:-4], x.tobytes() + b"\0" * 4, np.ones((3, DIM + 1), "<f4").tobytes()):
        err = refusal({"ids": ["a", "b", "c"], "vectors_b64": base64.b64encode(raw).decode()})
        assert isinstance(err, DimensionMismatch) and "3 ids of dim 5" in err.message
    err = refusal({"vectors_b64": base64.b64encode(b"\0" * 24).decode()})  # no ids: 24 % 20
    assert isinstance(err, DimensionMismatch)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_naming_the_row(bad: float) -> None:
    x = np.ones((5, DIM), np.float32)
    x[3, 2] = bad
    err = refusal(columnar(list("abcde"), x))
    assert isinstance(err, InvalidVector)
    assert "row 3" in err.message and "'d'" in err.message


@pytest.mark.parametrize(("body", "says"), [
    ({"ids": ["a", ""], "vectors_b64": b64(np.ones((2, DIM)))}, "ids[1]"),
    ({"ids": ["a", 7], "vectors_b64": b64(np.ones((2, DIM)))}, "ids[1]"),
    ({"ids": ["a", "x" * 257], "vectors_b64": b64(np.ones((2, DIM)))}, "ids[1]"),
    ({"ids": [], "vectors_b64": ""}, "'ids'"),
    ({"ids": "abc", "vectors_b64": b64(np.ones((3, DIM)))}, "'ids'"),
    ({"ids": ["a"], "vectors_b64": "not base64!"}, "base64"),
    ({"ids": ["a"], "vectors_b64": "é" * 4}, "base64"),
    ({"ids": ["a"], "vectors_b64": 12}, "vectors_b64"),
    ({"ids": ["a"]}, "vectors_b64"),
    ({"ids": ["a"], "vectors_b64": b64(np.ones((1, DIM))), "metadata": [{}, {}]}, "metadata"),
    ({"ids": ["a"], "vectors_b64": b64(np.ones((1, DIM))), "metadata": {"a": 1}}, "metadata"),
    ({"ids": ["a", "b"], "vectors_b64": b64(np.ones((2, DIM))), "metadata": [{}, [1]]},
     "metadata[1]"),
    ({"ids": ["a"], "vectors_b64": b64(np.ones((1, DIM))), "consistency": "most"},
     "consistency"),
    ({"ids": ["a"], "vectors_b64": b64(np.ones((1, DIM))), "vector": [1]}, "unknown"),
])
def test_bad_fields_are_a_bad_request_naming_them(body: dict[str, Any], says: str) -> None:
    err = refusal(body)
    assert isinstance(err, BadRequest) and says in err.message, err.message


def test_metadata_nested_too_deep_is_refused_with_its_row() -> None:
    deep: Any = 1
    for _ in range(MAX_METADATA_DEPTH + 1):
        deep = {"a": deep}
    ok = parse_both(columnar(["a", "b"], np.ones((2, DIM), np.float32), [{}, deep["a"]]))
    assert len(ok.ids) == 2
    err = refusal(columnar(["a", "b"], np.ones((2, DIM), np.float32), [{}, deep]))
    assert isinstance(err, BadRequest) and "metadata[1]" in err.message
    # Brackets inside strings only look deep: the general path measures and takes it.
    text = {"t": "[" * 100}
    assert parse_both(columnar(["a"], np.ones((1, DIM), np.float32), [text])).metadata


# -- over HTTP --------------------------------------------------------------------------------
async def test_both_forms_store_the_same_documents(node: Node) -> None:
    s = load_sample()
    n = 500
    ids = [m["id"] for m in s.base_meta[:n]]
    metas = [{"pos": m["pos"], "text": m["text"]} for m in s.base_meta[:n]]
    for name in ("docs", "cols"):
        await node.create(name, s.dim, metric="cosine", shards=3)
    await node.upsert("docs", [{"id": i, "vector": v.tolist(), "metadata": m}
                               for i, v, m in zip(ids, s.base[:n], metas, strict=True)])
    resp = await node.post_json("/v1/collections/cols/documents",
                                columnar(ids, s.base[:n], metas, consistency="all"))
    assert await ok_json(resp) == {"ids": ids, "upserted": n}
    for name in ("docs", "cols"):
        assert (await node.describe(name))["count"] == n
    for i in (0, 1, 250, n - 1):
        got = []
        for name in ("docs", "cols"):
            resp = await node.client.get(f"/v1/collections/{name}/documents/{ids[i]}?vector=true")
            got.append(await ok_json(resp))
        assert got[0] == got[1]
        assert np.asarray(got[1]["vector"], np.float32).tobytes() == s.base[i].tobytes()
    q = {"vectors": s.queries[:5].tolist(), "k": 10}
    a, b = await node.search("docs", **q), await node.search("cols", **q)
    assert a["results"] == b["results"]


async def test_refusals_over_http_change_nothing(start_node: Any) -> None:
    node = await start_node(max_body_bytes=64 * 1024)
    await node.create("c", DIM)
    url = "/v1/collections/c/documents"
    x = np.ones((4, DIM), np.float32)
    x[2, 0] = np.nan
    msg = await expect_error(await node.post_json(url, columnar(list("abcd"), x)),
                             400, "invalid_vector")
    assert "row 2" in msg
    short = {"ids": ["a"], "vectors_b64": b64(np.ones((1, DIM - 1)))}
    await expect_error(await node.post_json(url, short), 400, "dimension_mismatch")
    # A body past the limit: 413, as for the documents form.
    big = columnar([f"d{i}" for i in range(4000)], np.ones((4000, DIM), np.float32))
    await expect_error(await node.post_json(url, big), 413, "payload_too_large")
    assert (await node.describe("c"))["count"] == 0
    ok = columnar(["a", "b"], np.ones((2, DIM), np.float32), [{"k": 1}, None])
    assert (await ok_json(await node.post_json(url, ok)))["upserted"] == 2


async def test_values_too_large_to_score_are_refused_in_every_form(node: Node) -> None:
    """A finite value so large that a distance over it overflows float32 (a search would then
    find nothing): refused as invalid_vector by the documents form, the columnar form and a
    search, and the collection stays empty."""
    from aquila.cluster.model.bounds import MAX_VECTOR_VALUE

    await node.create("c", DIM)
    url = "/v1/collections/c/documents"
    v = [1.0] * DIM
    v[3] = MAX_VECTOR_VALUE * 10
    await expect_error(await node.post_json(url, {"documents": [{"id": "a", "vector": v}]}),
                       400, "invalid_vector")
    x = np.ones((2, DIM), np.float32)
    x[1, 0] = -1e20
    msg = await expect_error(await node.post_json(url, columnar(["a", "b"], x)), 400,
                             "invalid_vector")
    assert "row 1" in msg
    await expect_error(await node.post_json("/v1/collections/c/search", {"vector": v}), 400,
                       "invalid_vector")
    # Just above the bound: float32 would round it down to the bound, so it is checked as sent.
    above = [1000000000000001.0] * DIM
    await expect_error(await node.post_json(url, {"documents": [{"id": "a", "vector": above}]}),
                       400, "invalid_vector")
    await expect_error(await node.post_json("/v1/collections/c/search", {"vector": above}), 400,
                       "invalid_vector")
    assert (await node.describe("c"))["count"] == 0
    at_bound = [MAX_VECTOR_VALUE] + [1.0] * (DIM - 1)
    await ok_json(await node.post_json(url, {"documents": [{"id": "a", "vector": at_bound}]}))
    hits = await node.search("c", vector=at_bound, k=1)
    assert [h["id"] for h in hits["results"][0]] == ["a"]
