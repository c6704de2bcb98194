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
