"""Pure top-k merge of ranked lists: across a node's shards and across nodes alike."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def merge_topk(
    lists: Iterable[Sequence[tuple[float, T]]], k: int, *, larger_is_better: bool
) -> list[tuple[float, T]]:
    """Merge lists already sorted best-first into the best `k` overall, best first.

    Ties keep the order of `lists` (then position), so the result is deterministic.
    """
    if k <= 0:
        return []
    sign = -1.0 if larger_is_better else 1.0
    heap: list[tuple[float, int, int, Sequence[tuple[float, T]]]] = []
    for li, lst in enumerate(lists):
        if lst:
            heap.append((sign * lst[0][0], li, 0, lst))
    heapq.heapify(heap)
    out: list[tuple[float, T]] = []
    while heap and len(out) < k:
        _, li, pos, lst = heapq.heappop(heap)
        out.append(lst[pos])
        if pos + 1 < len(lst):
            heapq.heappush(heap, (sign * lst[pos + 1][0], li, pos + 1, lst))
    return out

