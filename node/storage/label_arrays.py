"""Arrays indexed by a shard's labels (the live bitmap, a filter key's columns, the IVF
label → list map): grown to fit as labels are given, by a quarter at a time, so that their
size keeps pace with the labels given instead of overshooting them by a doubling."""

from __future__ import annotations

from typing import Any

import numpy as np


def capacity(need: int, have: int) -> int:
    """Slots for an array of `have` that must hold `need`: a quarter more at least, 64 at
    least."""
    return max(need, have * 5 // 4, 64)


def widened(arr: np.ndarray, size: int, fill: Any) -> np.ndarray:
    """A copy of `arr` with `size` slots, those past its end set to `fill`."""
    out = np.full(size, fill, arr.dtype)
    out[: len(arr)] = arr
    return out


class FreeLabels:
    """A shard's labels free to give again (their tombstones purged), as a stack in one
    int64 array: a new document takes the last one put, before any label is minted. `mark`
    and `restore` undo the takes of a write that failed (nothing is put meanwhile: puts and
    takes are both made under the collection's write mutex)."""

    def __init__(self, labels: np.ndarray | None = None) -> None:
        # Ascending labels are taken from the lowest: the stack holds them highest first.
        self._stack = (np.zeros(0, np.int64) if labels is None
                       else np.ascontiguousarray(np.asarray(labels, np.int64)[::-1]))
        self._n = len(self._stack)

    def __len__(self) -> int:
        return self._n

    def take(self) -> int:
        """The next free label (call only when there is one)."""
        self._n -= 1
        return int(self._stack[self._n])

    def put(self, labels: np.ndarray) -> None:
        """Free these labels (the lowest of them taken first)."""
        labels = np.sort(np.asarray(labels, np.int64))[::-1]
        need = self._n + len(labels)
        if need > len(self._stack):
            self._stack = widened(self._stack, capacity(need, len(self._stack)), 0)
        self._stack[self._n:need] = labels
        self._n = need

    def mark(self) -> int:
        return self._n

    def restore(self, mark: int) -> None:
        self._n = mark

    def labels(self) -> np.ndarray:
        """The free labels (a copy), in no particular order."""
        return self._stack[:self._n].copy()
