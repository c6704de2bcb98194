"""A shard's payload index: for each metadata key a filter has used, the live documents'
values as columns over labels (a value code and a number per label). Built the first time a
key is filtered on, then kept current write by write, so a filtered search combines masks
over labels instead of parsing every document's metadata. The semantics are those of `cluster.model.filters` (tested
against it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import orjson

from aquila.cluster.model.filters import Cond, Filter
from aquila.node.storage.label_arrays import capacity, widened

Path = tuple[str, ...]
_MISSING = object()


class MetaSource(Protocol):
    """The live documents' metadata by label: a dict, or a shard's view of its store
    (`shard.ShardMeta`), which iterates the live labels and reads `items` from the store."""

    def __iter__(self) -> Iterator[int]: ...

    def items(self) -> Iterable[tuple[int, bytes]]: ...


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
    """One metadata key, columnar: per label, the code of its scalar value (an int32 array,
    -1 for none) and its number (a float64 array, NaN for none, made at the key's first
    number); codes name the distinct values the live documents hold. A value that is a list
    (it matches when any element does) keeps its codes in a small dict by label: the only
    per-document objects, for list values only."""

    def __init__(self) -> None:
        self.codes: dict[tuple[str, Any], int] = {}
        self.code = np.full(0, -1, np.int32)
        self.num = np.full(0, np.nan, np.float64)
        self.lists: dict[int, np.ndarray] = {}
        # Per code, its value and the labels holding it (scalar or in a list): a value no live
        # document holds leaves `codes` and its code is given again, so that churn through
        # distinct values (an id or a timestamp in the metadata) keeps nothing per deleted
        # document.
        self._values: list[tuple[str, Any] | None] = []
        self._refs: list[int] = []
        self._free: list[int] = []

    def _fit(self, label: int) -> None:
        if label >= len(self.code):
            self.code = widened(self.code, capacity(label + 1, len(self.code)), -1)
            if len(self.num):
                self._fit_numbers()

    def _fit_numbers(self) -> None:
        """The numbers' column, as long as the codes': made at the key's first number only,
        so that a key of strings costs 4 bytes a label, not 12."""
        if len(self.num) < len(self.code):
            self.num = widened(self.num, len(self.code), np.nan)

    def _code(self, key: tuple[str, Any]) -> int:
        """The code of `key`, with one more holder."""
        c = self.codes.get(key)
        if c is None:
            if self._free:
                c = self._free.pop()
                self._values[c] = key
            else:
                c = len(self._values)
                self._values.append(key)
                self._refs.append(0)
            self.codes[key] = c
        self._refs[c] += 1
        return c

    def _release(self, c: int) -> None:
        """One holder fewer of code `c`; the code is freed with its last."""
        self._refs[c] -= 1
        if self._refs[c] == 0:
            key = self._values[c]
            self._values[c] = None
            if key is not None:
                del self.codes[key]
            self._free.append(c)

    def _clear(self, label: int) -> None:
        """Forget what `label` holds (its codes released)."""
        c = int(self.code[label])
        if c >= 0:
            self._release(c)
        for c in self.lists.pop(label, np.zeros(0, np.int32)).tolist():
            self._release(c)
        self.code[label] = -1
        if label < len(self.num):
            self.num[label] = np.nan

    def add(self, label: int, value: Any) -> None:
        if value is _MISSING:
            return
        self._fit(label)
        self._clear(label)  # a label holds one value: a rewrite without remove replaces it
        if isinstance(value, list):
            keys: set[tuple[str, Any]] = set()
            _eq_keys(value, keys)
            if keys:
                self.lists[label] = np.fromiter((self._code(k) for k in keys), np.int32)
        elif value is None or isinstance(value, str | int | float | bool):
            self.code[label] = self._code(_norm(value))
        if isinstance(value, int | float) and not isinstance(value, bool):
            self._fit_numbers()
            self.num[label] = float(value)

    def remove(self, label: int, value: Any) -> None:
        if value is _MISSING or label >= len(self.code):
            return
        self._clear(label)

    def numbers(self) -> int:
        """Labels that have a number (for tests and figures)."""
        return int(np.count_nonzero(~np.isnan(self.num)))

    def match(self, values: Iterable[Any], mask: np.ndarray) -> None:
        """Set the labels whose value equals one of `values` in `mask`."""
        wanted = {c for c in (self.codes.get(_norm(w)) for w in values) if c is not None}
        if not wanted:
            return
        n = min(len(mask), len(self.code))
        want = np.fromiter(wanted, np.int32)
        mask[:n] |= np.isin(self.code[:n], want)
        for label, codes in self.lists.items():
            if label < len(mask) and np.isin(codes, want).any():
                mask[label] = True

    def in_range(self, bounds: Iterable[tuple[str, float]], mask: np.ndarray) -> None:
        """Set the labels whose number lies within `bounds` in `mask`."""
        n = min(len(mask), len(self.num))
        values = self.num[:n]
        inside = ~np.isnan(values)
        for op, b in bounds:
            if op == "gte":
                inside &= values >= b
            elif op == "gt":
                inside &= values > b
            elif op == "lte":
                inside &= values <= b
            else:
                inside &= values < b
        mask[:n] |= inside


class PayloadIndex:
    def __init__(self) -> None:
        self.keys: dict[Path, KeyIndex] = {}

    def ensure(self, paths: Iterable[Path], meta: MetaSource) -> None:
        """Index these keys over the live documents (one pass over their metadata)."""
        missing = [p for p in dict.fromkeys(paths) if p not in self.keys]
        if not missing:
            return
        built = {p: KeyIndex() for p in missing}
        for label, raw in meta.items():
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

    def mask(self, flt: Filter, meta: MetaSource, size: int) -> np.ndarray:
        """A boolean mask over labels 0..size-1 (every label of `meta` below size) of the live
        documents that `flt` admits: numpy operations over label arrays, no per-document
        Python objects."""
        self.ensure((c.path for c in (*flt.must, *flt.should, *flt.must_not)), meta)

        def cond(c: Cond) -> np.ndarray:
            out = np.zeros(size, dtype=bool)
            ki = self.keys[c.path]
            if c.kind == "range":
                ki.in_range(c.bounds, out)
            else:
                ki.match(c.values, out)
            return out

        if flt.must:
            result = cond(flt.must[0])
            for c in flt.must[1:]:
                result &= cond(c)
        else:  # every live document
            result = np.zeros(size, dtype=bool)
            result[np.fromiter(meta, dtype=np.int64)] = True
        if flt.should:
            some = np.zeros(size, dtype=bool)
            for c in flt.should:
                some |= cond(c)
            result &= some
        for c in flt.must_not:
            result &= ~cond(c)
        return result

    def evaluate(self, flt: Filter, meta: MetaSource) -> set[int]:
        """Labels of the live documents that `flt` admits."""
        size = max(meta, default=-1) + 1
        return set(np.flatnonzero(self.mask(flt, meta, size)).tolist())
