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
