"""A shard's payload index: for each metadata key a filter has used, the labels of the live
documents by value (and by number, for ranges). Built the first time a key is filtered on,
then kept current write by write, so a filtered search combines sets instead of parsing every
document's metadata. The semantics are those of `cluster.model.filters` (tested against it)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.filters import Cond, Filter

Path = tuple[str, ...]
_MISSING = object()


def _lookup(doc: Any, path: Path) -> Any:
    for part in path:
        if not isinstance(doc, dict) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


def _norm(x: Any) -> tuple[str, Any]:
    # True == 1 in Python, but not in a filter: booleans get a tag of their own. Other
    # scalars keep Python's equality (1 == 1.0; strings never equal numbers).
    return ("b", x) if isinstance(x, bool) else ("x", x)


def _eq_keys(v: Any, out: set[tuple[str, Any]]) -> None:
    if isinstance(v, list):  # a list matches when any element does, at any depth
        for x in v:
            _eq_keys(x, out)
    elif v is None or isinstance(v, str | int | float | bool):
        out.add(_norm(v))


class KeyIndex:
    def __init__(self) -> None:
        self.eq: dict[tuple[str, Any], set[int]] = {}
        self.num: dict[int, float] = {}  # label → value, for numbers that are not in lists
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, label: int, value: Any) -> None:
        if value is _MISSING:
            return
        keys: set[tuple[str, Any]] = set()
        _eq_keys(value, keys)
        for k in keys:
            self.eq.setdefault(k, set()).add(label)
        if isinstance(value, int | float) and not isinstance(value, bool):
            self.num[label] = float(value)
            self._sorted = None

    def remove(self, label: int, value: Any) -> None:
        if value is _MISSING:
            return
        keys: set[tuple[str, Any]] = set()
        _eq_keys(value, keys)
        for k in keys:
            labels = self.eq.get(k)
            if labels is not None:
                labels.discard(label)
                if not labels:
                    del self.eq[k]
        if self.num.pop(label, None) is not None:
            self._sorted = None

    def match(self, values: Iterable[Any]) -> set[int]:
        out: set[int] = set()
        for w in values:
            out |= self.eq.get(_norm(w), set())
        return out

    def in_range(self, bounds: Iterable[tuple[str, float]]) -> set[int]:
        if self._sorted is None:
            labels = np.fromiter(self.num.keys(), dtype=np.int64, count=len(self.num))
            values = np.fromiter(self.num.values(), dtype=np.float64, count=len(self.num))
            self._sorted = (values, labels)
        values, labels = self._sorted
        mask = np.ones(len(values), dtype=bool)
        for op, b in bounds:
            if op == "gte":
                mask &= values >= b
            elif op == "gt":
                mask &= values > b
            elif op == "lte":
                mask &= values <= b
            else:
                mask &= values < b
        return set(labels[mask].tolist())


class PayloadIndex:
    def __init__(self) -> None:
        self.keys: dict[Path, KeyIndex] = {}

    def ensure(self, paths: Iterable[Path], meta: dict[int, bytes]) -> None:
        """Index these keys over the live documents (one pass over their metadata)."""
        missing = [p for p in dict.fromkeys(paths) if p not in self.keys]
        if not missing:
            return
        built = {p: KeyIndex() for p in missing}
        for label, raw in list(meta.items()):
            doc = orjson.loads(raw) if raw else {}
            for p, ki in built.items():
                ki.add(label, _lookup(doc, p))
        self.keys.update(built)

    def update(self, label: int, old: bytes | None, new: bytes | None) -> None:
        """A document's metadata changed (None: it was not live / is no longer)."""
        if not self.keys:
            return
        old_doc = orjson.loads(old) if old else None
        new_doc = orjson.loads(new) if new else None
        for p, ki in self.keys.items():
            if old is not None:
                ki.remove(label, _lookup(old_doc or {}, p))
            if new is not None:
                ki.add(label, _lookup(new_doc or {}, p))

    def evaluate(self, flt: Filter, meta: dict[int, bytes]) -> set[int]:
        """Labels of the live documents that `flt` admits."""
        self.ensure((c.path for c in (*flt.must, *flt.should, *flt.must_not)), meta)

        def cond(c: Cond) -> set[int]:
            ki = self.keys[c.path]
            return ki.in_range(c.bounds) if c.kind == "range" else ki.match(c.values)

        result = set.intersection(*(cond(c) for c in flt.must)) if flt.must else set(meta)
        if flt.should:
            result &= set().union(*(cond(c) for c in flt.should))
        if flt.must_not:
            result -= set().union(*(cond(c) for c in flt.must_not))
        return result
