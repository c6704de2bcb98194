"""Document versions: a hybrid logical clock, so a later write gets a larger version even when
it reaches another coordinator, and versions still order writes from one node strictly.
Ties between nodes are broken by node id (last writer wins)."""

from __future__ import annotations

import time
from collections.abc import Callable

from aquila.cluster.model.bounds import MAX_OBSERVED_VERSION


class HybridClock:
    def __init__(self, wall_ms: Callable[[], int] | None = None) -> None:
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._last = 0

    def next(self) -> int:
        """A version above every version this clock has issued or observed."""
        self._last = max(self._wall_ms() << 16, self._last + 1)
        return self._last

    def next_many(self, n: int) -> int:
        """The first of `n` consecutive versions (the same as `n` calls of `next`)."""
        first = self.next()
        self._last = first + max(n, 1) - 1
        return first

    def version_before(self, seconds: float) -> int:
        """The smallest version a write made `seconds` ago could carry."""
        return max(0, self._wall_ms() - int(seconds * 1000)) << 16

    def observe(self, version: int) -> None:
        """Issue versions above `version` from now on, unless it lies beyond any plausible
        clock (MAX_OBSERVED_VERSION, the year 4199): adopting a forged or corrupt version
        near 2^63 would leave no room for the versions this node issues next."""
        if version <= MAX_OBSERVED_VERSION:
            self._last = max(self._last, version)
