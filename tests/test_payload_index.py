"""The payload index answers every filter exactly as evaluating the filter on each document
does, while documents are written, rewritten and deleted after the index was built."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.filters import parse_filter
from aquila.node.storage.payload_index import PayloadIndex

KEYS = ["a", "b", "c.d"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.0, 1.0, 2.5, -1.5]),
    st.sampled_from(["x", "y", "1", ""]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.lists(st.lists(scalars, max_size=2), max_size=2))


@st.composite
def docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["a"] = draw(values)
    if draw(st.booleans()):
        doc["b"] = draw(values)
    if draw(st.booleans()):
        doc["c"] = {"d": draw(values)} if draw(st.booleans()) else draw(values)
    return doc


@st.composite
def conds(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(st.sampled_from(KEYS))
    kind = draw(st.sampled_from(["match", "in", "range"]))
    if kind == "match":
        return {"key": key, "match": draw(scalars)}
    if kind == "in":
        return {"key": key, "in": draw(st.lists(scalars, max_size=3))}
    ops = draw(st.lists(st.sampled_from(["gte", "gt", "lte", "lt"]), min_size=1, max_size=2,
                        unique=True))
    return {"key": key, "range": {op: draw(st.integers(-3, 3)) for op in ops}}


filters = st.fixed_dictionaries(
    {}, optional={"must": st.lists(conds(), max_size=2), "should": st.lists(conds(), max_size=2),
                  "must_not": st.lists(conds(), max_size=2)},
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(st.integers(0, 30), docs(), max_size=25), filters,
       st.lists(st.tuples(st.integers(0, 30), st.one_of(st.none(), docs())), max_size=15),
       st.data())
def test_index_matches_evaluation(
    initial: dict[int, dict[str, Any]], spec: dict[str, Any],
    writes: list[tuple[int, dict[str, Any] | None]], data: st.DataObject,
) -> None:
    flt = parse_filter(spec)
    assert flt is not None
    meta = {label: orjson.dumps(doc) for label, doc in initial.items()}
    index = PayloadIndex()
    index.ensure([tuple(k.split(".")) for k in KEYS], meta)
    for label, doc in writes:  # upserts (doc) and deletes (None), kept current by update()
        new = orjson.dumps(doc) if doc is not None else None
        index.update(label, meta.get(label), new)
        if new is None:
            meta.pop(label, None)
        else:
            meta[label] = new
    want = {label for label, raw in meta.items() if flt(orjson.loads(raw))}
    assert index.evaluate(flt, meta) == want
    # A fresh index over the final documents agrees too.
    assert PayloadIndex().evaluate(flt, meta) == want


def test_churn_through_distinct_values_keeps_only_the_live_ones() -> None:
    """Issue 14 (memory bounded by the live documents, whatever the churn): documents whose
    metadata holds a value of their own (an id, a timestamp), written and deleted over and
    over, leave no value codes behind: the index knows the live documents' values, however
    many came and went."""
    pi = PayloadIndex()
    live = {label: orjson.dumps({"a": f"v{label}", "b": [label, "x"]}) for label in range(50)}
    pi.ensure([("a",), ("b",)], live)
    label = 50
    for _ in range(200):  # rounds of 20 new documents written, then deleted
        batch = list(range(label, label + 20))
        label += 20
        for n in batch:
            pi.update(n, None, orjson.dumps({"a": f"v{n}", "b": [n, "x"], "c": n}))
        for n in batch:
            pi.update(n, orjson.dumps({"a": f"v{n}", "b": [n, "x"], "c": n}), None)
    # A rewrite replaces a value (its old one is released), a deleted value is found no more.
    pi.update(3, live[3], orjson.dumps({"a": "w", "b": [3, "x"]}))
    assert len(pi.keys[("a",)].codes) == 50  # v0..v49 but v3, and "w"
    assert len(pi.keys[("b",)].codes) == 51  # 0..49 and "x"
    docs_now = {k: orjson.loads(v) for k, v in live.items()}
    docs_now[3] = {"a": "w", "b": [3, "x"]}
    meta = {k: orjson.dumps(d) for k, d in docs_now.items()}
    for spec in ({"must": [{"key": "a", "match": "v3"}]}, {"must": [{"key": "a", "match": "w"}]},
                 {"must": [{"key": "a", "match": "v1000"}]}, {"must": [{"key": "b", "in": [7, 999]}]},
                 {"must": [{"key": "b", "match": "x"}]}):
        flt = parse_filter(spec)
        assert flt is not None
        assert pi.evaluate(flt, meta) == {k for k, d in docs_now.items() if flt(d)}, spec
    # Codes freed by the churn are given again: the columns' codes stay below the live values.
    assert int(pi.keys[("a",)].code.max()) < 60


def test_a_key_of_strings_keeps_no_numbers_until_one_comes() -> None:
    """A key's numbers (8 bytes a label ever given) are kept from its first number only; the
    labels before it have none, and a range filter finds the numbers after it."""
    pi = PayloadIndex()
    docs_now = {label: {"a": f"s{label % 7}"} for label in range(1000)}
    pi.ensure([("a",)], {k: orjson.dumps(d) for k, d in docs_now.items()})
    ki = pi.keys[("a",)]
    assert len(ki.code) >= 1000 and ki.num.nbytes == 0
    for label in range(1000, 1010):
        docs_now[label] = {"a": label}
        pi.update(label, None, orjson.dumps(docs_now[label]))
    assert len(ki.num) == len(ki.code) and ki.numbers() == 10
    meta = {k: orjson.dumps(d) for k, d in docs_now.items()}
    flt = parse_filter({"must": [{"key": "a", "range": {"gte": 1005}}]})
    assert flt is not None
    assert pi.evaluate(flt, meta) == set(range(1005, 1010))
    pi.update(1005, meta[1005], None)  # a deleted number is found no more
    del docs_now[1005]
    assert pi.evaluate(flt, {k: orjson.dumps(d) for k, d in docs_now.items()}) == set(
        range(1006, 1010))
