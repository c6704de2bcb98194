"""Metadata filters: parse (pure validation, BadRequest on bad shape) and evaluate.

`{"must": [cond...], "should": [cond...], "must_not": [cond...]}`; a cond is
`{"key": "a.b", "match": v}`, `{"key": ..., "in": [v...]}` or
`{"key": ..., "range": {"gte"|"gt"|"lte"|"lt": number}}`. `should` needs at least one match
when present. A key is a dotted path into the metadata object; a missing key matches nothing.
At most MAX_FILTER_CONDITIONS conditions in all clauses together, and MAX_FILTER_IN_VALUES
values in one `in`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aquila.cluster.model.bounds import MAX_FILTER_CONDITIONS, MAX_FILTER_IN_VALUES
from aquila.cluster.model.errors import BadRequest

Predicate = Callable[[Any], bool]
_MISSING = object()
_RANGE_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "gte": lambda a, b: a >= b,
    "gt": lambda a, b: a > b,
    "lte": lambda a, b: a <= b,
    "lt": lambda a, b: a < b,
}


def _lookup(doc: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(doc, dict) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _equal(value: Any, want: Any) -> bool:
    # A list value matches when any element does (tags: ["a", "b"] matches "a").
    if isinstance(value, list):
        return any(_equal(v, want) for v in value)
    if isinstance(value, bool) or isinstance(want, bool):
        return type(value) is type(want) and value == want
    return bool(value == want)


@dataclass(frozen=True)
class Cond:
    """One condition: the value at `path` matches one of `values` (match, in) or lies within
    `bounds` (range). Callable on a metadata object, and indexable (node/storage/payload_index.py)."""

    path: tuple[str, ...]
    kind: str  # "match" | "in" | "range"
    values: tuple[Any, ...] = ()
    bounds: tuple[tuple[str, float], ...] = ()

    def __call__(self, doc: Any) -> bool:
        v = _lookup(doc, list(self.path))
        if v is _MISSING:
            return False
        if self.kind == "range":
            return _is_number(v) and all(_RANGE_OPS[op](v, b) for op, b in self.bounds)
        return any(_equal(v, w) for w in self.values)


@dataclass(frozen=True)
class Filter:
    """must (all), should (at least one, when any), must_not (none)."""

    must: tuple[Cond, ...]
    should: tuple[Cond, ...]
    must_not: tuple[Cond, ...]

    def __call__(self, doc: Any) -> bool:
        return (
            all(c(doc) for c in self.must)
            and (not self.should or any(c(doc) for c in self.should))
            and not any(c(doc) for c in self.must_not)
        )


def _cond(c: Any, where: str) -> Cond:
    if not isinstance(c, dict) or not isinstance(c.get("key"), str) or not c["key"]:
        raise BadRequest(f"{where}: a condition needs a non-empty string 'key'")
    kinds = [k for k in ("match", "in", "range") if k in c]
    if len(kinds) != 1 or set(c) - {"key", "match", "in", "range"}:
        raise BadRequest(f"{where}: a condition has 'key' and exactly one of match, in, range")
    path = tuple(c["key"].split("."))
    kind = kinds[0]
    if kind == "match":
        want = c["match"]
        if not _scalar(want):
            raise BadRequest(f"{where}: 'match' takes a string, number, boolean or null")
        return Cond(path, "match", (want,))
    if kind == "in":
        values = c["in"]
        if not isinstance(values, list) or not all(_scalar(v) for v in values):
            raise BadRequest(f"{where}: 'in' takes a list of scalars")
        if len(values) > MAX_FILTER_IN_VALUES:
            raise BadRequest(f"{where}: 'in' takes at most {MAX_FILTER_IN_VALUES} values")
        return Cond(path, "in", tuple(values))
    bounds = c["range"]
    if not isinstance(bounds, dict) or not bounds or set(bounds) - set(_RANGE_OPS):
        raise BadRequest(f"{where}: 'range' takes gte, gt, lte, lt")
    if not all(_is_number(b) for b in bounds.values()):
        raise BadRequest(f"{where}: range bounds must be numbers")
    return Cond(path, "range", bounds=tuple(sorted(bounds.items())))


def parse_filter(spec: Any) -> Filter | None:
    """The filter a search asks for (callable on a metadata object), or None for none."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise BadRequest("'filter' must be an object with must, should, must_not")
    unknown = set(spec) - {"must", "should", "must_not"}
    if unknown:
        raise BadRequest(f"unknown filter clause(s): {', '.join(sorted(unknown))}")
    raw: dict[str, list[Any]] = {}
    for clause in ("must", "should", "must_not"):
        conds = spec.get(clause, [])
        if not isinstance(conds, list):
            raise BadRequest(f"filter.{clause} must be a list of conditions")
        raw[clause] = conds
    total = sum(len(c) for c in raw.values())
    if total > MAX_FILTER_CONDITIONS:  # each is evaluated per candidate document
        raise BadRequest(
            f"a filter has at most {MAX_FILTER_CONDITIONS} conditions in all, got {total}"
        )
    clauses = {clause: tuple(_cond(c, f"filter.{clause}[{i}]") for i, c in enumerate(conds))
               for clause, conds in raw.items()}
    return Filter(clauses["must"], clauses["should"], clauses["must_not"])
