"""The documents of one shard that a filter admits, as a bitmap over the shard's labels, kept
per shard in a small LRU keyed by the canonical filter: a stream of searches (and counts, and
scrolls) with the same filter evaluates it once. Writes update the bitmaps of the documents
they touch (or, for a batch too big to be worth it, drop them), so a cached bitmap is always
the one a fresh evaluation would give.

Bitmaps are numpy arrays (packed, little-endian bit order: label l is bit l & 7 of byte
l >> 3, FAISS's `IDSelectorBitmap` layout); nothing here holds a Python object per document.
A match set is read and changed under its collection's locks: searches, counts and scrolls
read it under the read lock, writes change it under the write lock.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aquila.cluster.model.filters import Filter

# Stamps are unique across every match set of the process, so that anything derived from a
# match set (a FAISS selector, gathered vectors) and keyed on its stamp can never be mistaken
# for the derivative of another one, even of the same shard after it was reloaded.
_STAMPS = itertools.count(1)

# Filter evaluations a write may spend on keeping one shard's cached match sets current
# (documents touched × filters cached); above it they are dropped and evaluated afresh when
# next asked for, which costs one pass of the payload index per filter.
UPDATE_BUDGET = 4096
DEFAULT_CAPACITY = 32


def canonical(flt: Filter) -> str:
    """A key equal for filters that admit the same documents by construction: the order of
    conditions within a clause does not matter. `repr` keeps types apart (1, 1.0, True and
    "1" are different keys; 1 == True in Python, but not in a filter)."""
    return "|".join(
        name + ":" + ";".join(sorted(repr(c) for c in conds))
        for name, conds in (("must", flt.must), ("should", flt.should),
                            ("must_not", flt.must_not))
    )


def pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask, bitorder="little")


def bits_test(bits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Whether each label's bit is set (False beyond the bitmap)."""
    labels = np.asarray(labels, dtype=np.int64)
    byte = labels >> 3
    inside = (byte < len(bits)) & (labels >= 0)
    out = np.zeros(len(labels), dtype=bool)
    out[inside] = (bits[byte[inside]] >> (labels[inside] & 7).astype(np.uint8)) & 1 == 1
    return out


def bits_labels(bits: np.ndarray) -> np.ndarray:
    """The labels whose bit is set, ascending."""
    return np.flatnonzero(np.unpackbits(bits, bitorder="little")).astype(np.int64)


@dataclass(eq=False)
class MatchSet:
    """A filter's matching labels in one shard. `stamp` changes whenever a write touches a
    matching document (adds, removes or rewrites one), so whatever is derived from the set and
    from those documents' vectors is stale exactly when the stamp moved."""

    bits: np.ndarray  # uint8, packed little-endian
    count: int
    stamp: int

    @staticmethod
    def of_mask(mask: np.ndarray) -> MatchSet:
        return MatchSet(pack(mask), int(np.count_nonzero(mask)), next(_STAMPS))

    def labels(self) -> np.ndarray:
        return bits_labels(self.bits)

    def contains(self, labels: np.ndarray) -> np.ndarray:
        return bits_test(self.bits, labels)

    def _assign(self, labels: np.ndarray, on: np.ndarray) -> None:
        need = (int(labels.max()) >> 3) + 1 if len(labels) else 0
        if need > len(self.bits):
            grown = np.zeros(max(need, 2 * len(self.bits)), dtype=np.uint8)
            grown[: len(self.bits)] = self.bits
            self.bits = grown
        byte, bit = labels >> 3, (np.uint8(1) << (labels & 7).astype(np.uint8))
        np.bitwise_or.at(self.bits, byte[on], bit[on])
        np.bitwise_and.at(self.bits, byte[~on], ~bit[~on])

    def written(self, flt: Filter, gone: np.ndarray, added: np.ndarray,
                docs: Sequence[Any]) -> None:
        """Labels deleted (`gone`) and labels written with these (parsed) documents. A batch
        that names a document twice may delete its label and write it again, or delete it
        twice: each label counts once, as it ends (written, if it is among `added`)."""
        gone = np.setdiff1d(gone, added)
        labels = np.concatenate([gone, added])
        if not len(labels):
            return
        was = self.contains(labels)
        now = np.zeros(len(labels), dtype=bool)
        now[len(gone):] = [bool(flt(d)) for d in docs]
        if not (was | now).any():
            return  # none of them matched before or after: nothing derived can have changed
        self._assign(labels, now)
        self.count += int(now.sum()) - int(was.sum())
        self.stamp = next(_STAMPS)


class ShardFilters:
    """One shard's LRU of match sets by canonical filter. `capacity` 0 caches nothing (every
    call evaluates afresh): the reference the cache is tested against."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[Filter, MatchSet]] = OrderedDict()
        # Searches run on several threads at once (under the collection's read lock); the
        # LRU's bookkeeping is theirs to share.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, flt: Filter, key: str, evaluate: Callable[[], np.ndarray]
            ) -> tuple[MatchSet, bool]:
        """The match set of `flt` (whose canonical key is `key`), and whether it was cached;
        `evaluate` gives the boolean mask over labels when it is not."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[1], True
        ms = MatchSet.of_mask(evaluate())
        if self.capacity > 0:
            with self._lock:
                hit = self._entries.get(key)
                if hit is not None:  # another thread evaluated it meanwhile: one copy
                    return hit[1], True
                self._entries[key] = (flt, ms)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return ms, False

    def written(self, gone: Sequence[int], added: Sequence[int],
                docs: Callable[[], Sequence[Any]]) -> None:
        """A write reached the shard: `gone` labels were deleted, `added` labels written with
        the documents `docs()` gives (parsed metadata, in the same order; called only when
        needed). Runs under the collection's write lock."""
        if not self._entries or not (gone or added):
            return
        if (len(gone) + len(added)) * len(self._entries) > UPDATE_BUDGET:
            self._entries.clear()
            return
        g = np.asarray(gone, dtype=np.int64)
        a = np.asarray(added, dtype=np.int64)
        parsed = docs() if len(a) else []
        for flt, ms in self._entries.values():
            ms.written(flt, g, a, parsed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
