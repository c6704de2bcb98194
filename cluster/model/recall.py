"""Search by target recall (contract v2, `"recall"`): the bounds of the target, the nprobe a
calibration curve gives for it, and the checks on a curve a peer reports.

A curve is measured when an IVF index is trained (`node.storage.calibrate`): recall@k against
exact search, for a ladder of nprobe values, made non-decreasing (a larger nprobe scans a
superset of lists; for a compressed index the measured value may dip by noise, and a target
must never be met by fewer probes than a smaller target)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from aquila.cluster.model.bounds import MAX_NPROBE, BoundsError
from aquila.cluster.model.errors import BadRequest

MIN_RECALL = 0.5
MAX_RECALL = 0.999
# Points a curve may have (a ladder of powers of two up to MAX_NPROBE has 21).
MAX_CURVE_POINTS = 64

Curve = list[tuple[int, float]]
# Per nprobe, the share of calibration queries whose r-th nearest neighbour was found, for r =
# 1, 2, ... CALIBRATION_K: recall@m for any m up to it is the mean of the first m.
RankCurve = list[tuple[int, list[float]]]


def check_target(raw: Any, field: str = "recall") -> float:
    """A client's (or peer's) target recall, as a float in MIN_RECALL..MAX_RECALL."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) \
            or not MIN_RECALL <= raw <= MAX_RECALL:
        raise BadRequest(f"'{field}' must be a number from {MIN_RECALL} to {MAX_RECALL}")
    return float(raw)


def ladder(nlist: int) -> list[int]:
    """nprobe values to measure: 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and one and a
    half times them: a target is met with at most a third more probes than it needs) below
    nlist, then nlist (every list)."""
    out, p = [], 1
    while p < nlist:
        out.append(p)
        if p >= 2 and p * 3 // 2 < nlist:
            out.append(p * 3 // 2)
        p *= 2
    out.append(max(1, nlist))
    return out


def monotone(points: Sequence[tuple[int, float]]) -> Curve:
    """The curve by nprobe, each recall at least the one before it."""
    out: Curve = []
    best = 0.0
    for n, r in sorted(points):
        best = max(best, r)
        out.append((int(n), round(best, 4)))
    return out


def nprobe_for(curve: Sequence[tuple[int, float]], target: float) -> int:
    """The smallest nprobe whose measured recall reached `target`; the largest measured when
    none did (all lists: the best the index can do); 1 without a curve (an exact index)."""
    if not curve:
        return 1
    for n, r in curve:
        if r >= target:
            return n
    return curve[-1][0]


def curve_at(by_rank: Sequence[tuple[int, Sequence[float]]], top: int) -> Curve:
    """recall@top by nprobe from a curve by rank (made non-decreasing as every curve is)."""
    return monotone([(n, sum(p[:top]) / len(p[:top])) for n, p in by_rank if p])


def share_top(k: int, held: int, shards: int) -> int:
    """Of a search's k best over the whole collection, about how many rank among a node's
    own best when its index holds `held` of the collection's `shards` (ids hash evenly over
    shards): the global k best are each node's own best, k·held/shards of them. A node that
    meets a target recall@k·held/shards over its own data meets the target recall@k of the
    whole, where recall@k of its own data would ask for more than that (it holds the k best of
    the collection only in part; its k-th best is far down the collection's ranking)."""
    return max(1, math.ceil(k * held / max(1, shards)))


def checked_rank_curve(raw: Any, k: int) -> RankCurve:
    """A curve by rank as a snapshot keeps it: bounded, nprobe ascending, k shares each."""
    if not isinstance(raw, list) or len(raw) > MAX_CURVE_POINTS:
        raise BoundsError(f"a rank curve is a list of at most {MAX_CURVE_POINTS} points")
    out: RankCurve = []
    for p in raw:
        if not isinstance(p, list | tuple) or len(p) != 2 or not isinstance(p[1], list) \
                or len(p[1]) != k:
            raise BoundsError(f"a rank curve's point is [nprobe, [{k} shares]]")
        n = p[0]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NPROBE:
            raise BoundsError("a rank curve's nprobe is an integer")
        if not all(isinstance(r, int | float) and not isinstance(r, bool) and 0 <= r <= 1
                   for r in p[1]):
            raise BoundsError("a rank curve's share is a number from 0 to 1")
        out.append((n, [float(r) for r in p[1]]))
    return sorted(out)


def checked_curve(raw: Any) -> Curve:
    """A curve as a peer reports it (it reaches the client's answer): bounded, sorted."""
    if not isinstance(raw, list) or len(raw) > MAX_CURVE_POINTS:
        raise BoundsError(f"a recall curve is a list of at most {MAX_CURVE_POINTS} points")
    points: Curve = []
    for p in raw:
        if not isinstance(p, list | tuple) or len(p) != 2:
            raise BoundsError("a recall curve's point is [nprobe, recall]")
        n, r = p
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NPROBE:
            raise BoundsError("a recall curve's nprobe is an integer")
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r <= 1:
            raise BoundsError("a recall curve's recall is a number from 0 to 1")
        points.append((n, float(r)))
    return monotone(points)
