"""Pure timeout math for SWIM + Lifeguard (memberlist `suspicion.go`, `util.go`, `awareness.go`).

Nothing here reads a clock: callers pass `now`, so the same code runs under the simulator's
ManualClock and under the real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def suspicion_timeout(mult: float, n: int, interval: float) -> float:
    """The minimum suspicion timeout: mult × max(1, log10 n) × probe interval.

    Scaling with log10(n) gives gossip about the suspicion time to reach the suspect (so it
    can refute) in a bigger cluster, where dissemination takes O(log n) rounds.
    """
    node_scale = max(1.0, math.log10(max(1, n)))
    return mult * node_scale * interval


def retransmit_limit(mult: int, n: int) -> int:
    """How many times one update is piggybacked: mult × ceil(log10(n + 1)).

    Infection-style dissemination reaches everyone w.h.p. in O(log n) rounds, so a fixed
    multiple of log n transmissions per update is enough and bounds the queue.
    """
    node_scale = math.ceil(math.log10(n + 1))
    return mult * node_scale


def remaining_suspicion_time(n: int, k: int, elapsed: float, lo: float, hi: float) -> float:
    """Lifeguard's shrinking suspicion timeout (memberlist `remainingSuspicionTime`).

    Starts at `hi` with no independent confirmations and falls logarithmically to `lo` once
    `k` distinct nodes have confirmed; returns what is left after `elapsed` (may be negative).
    With k < 1 no confirmations are expected, so the timeout is `lo` from the start.
    """
    if k < 1:
        return lo - elapsed
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = hi - frac * (hi - lo)
    # memberlist truncates to whole milliseconds; keep that so both agree to the ms.
    timeout = math.floor(1000.0 * raw) / 1000.0
    timeout = max(timeout, lo)
    return timeout - elapsed


@dataclass
class Suspicion:
    """One open suspicion about a member, started at `start` by `first_from`.

    `k` is how many independent confirmations we hope for; each distinct confirmer shortens
    the deadline. The accuser that started it never counts twice.
    """

    start: float
    k: int
    lo: float
    hi: float
    confirmations: set[str] = field(default_factory=set)
    first_from: str = ""

    def __post_init__(self) -> None:
        if self.first_from:
            # The node whose message started the suspicion is excluded from confirmations.
            self.confirmations.add(self.first_from)

    @property
    def num_confirmations(self) -> int:
        return len(self.confirmations) - (1 if self.first_from else 0)

    def confirm(self, from_id: str) -> bool:
        """Record a confirmation; True if it was new (and so worth re-gossiping)."""
        if self.num_confirmations >= self.k or from_id in self.confirmations:
            return False
        self.confirmations.add(from_id)
        return True

    def deadline(self) -> float:
        """Absolute time at which the suspect is declared dead."""
        return self.start + remaining_suspicion_time(
            self.num_confirmations, self.k, 0.0, self.lo, self.hi
        )


class Awareness:
    """Lifeguard local health awareness (memberlist `awareness.go`).

    A score in [0, max_multiplier - 1]; missed nacks and refutations raise it, successful
    probes lower it. While it is high this node is probably the slow one, so it probes less
    often and waits longer before blaming others.
    """

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        return self._score

    def apply_delta(self, delta: int) -> None:
        self._score = min(max(self._score + delta, 0), self._max - 1)

    def scale(self, timeout: float) -> float:
        return timeout * (self._score + 1)


def push_pull_scale(interval: float, n: int) -> float:
    """Stretch the full-state sync interval in big clusters (memberlist `pushPullScale`).

    Up to 32 nodes the interval stands; beyond, it grows with log2(n / 32) so the total
    TCP sync load stays roughly flat as the cluster grows.
    """
    threshold = 32
    if n <= threshold:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(threshold)) + 1
    return multiplier * interval
