"""Pure top-k merges of ranked lists: across a node's shards and across nodes alike, one list
at a time (`merge_topk`) or every query of a batch at once on arrays (`merge_columns`)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import TypeVar

import numpy as np

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



def merge_columns(
    scores: np.ndarray, queries: np.ndarray, nq: int, k: int, *, larger_is_better: bool
) -> np.ndarray:
    """The best `k` per query of hits given as columns: `scores[i]` of hit i, which answers
    query `queries[i]`; hits are in list order (each list sorted best-first, lists one after
    the other). The indices of the winners, by query, best first; ties keep list order, then
    position: the same hits in the same order as `merge_topk` of each query's lists."""
    if k <= 0 or not len(scores):
        return np.empty(0, dtype=np.int64)
    key = -scores if larger_is_better else scores
    order = np.lexsort((key, queries))  # by query, then score; stable: ties keep list order
    q = queries[order]
    first = np.searchsorted(q, np.arange(nq))  # where each query's hits begin in `order`
    rank = np.arange(len(order)) - first[q]
    kept: np.ndarray = order[rank < k]
    return kept
