"""Freshness and replay checks for authenticated peer messages (HTTP requests and gossip
packets alike).

Every authenticated message carries the sender's wall-clock timestamp and a random nonce,
both covered by its MAC. A message is accepted once: its timestamp must be within
`WINDOW_S` of ours, and its nonce must not have been seen. Nonces are remembered only as
long as their message could still be fresh, and at most `MAX_NONCES` of them: when the
memory is full the oldest is forgotten and its timestamp becomes a floor below which
everything is refused, so a forgotten nonce can never be replayed either. Only messages
whose MAC has been verified may be passed here, so only key holders can fill the memory.
"""

from __future__ import annotations

import heapq
import math

# How far (seconds) a message's timestamp may be from the receiver's clock, either way.
# Nodes' clocks must agree this well (NTP keeps them within milliseconds); a captured
# message cannot be replayed once this has passed, and within it its nonce is remembered.
WINDOW_S = 30.0
# Nonces remembered at most (about 100 bytes each): far above what a node receives in two
# windows (a busy node takes a few hundred peer requests and packets a second).
MAX_NONCES = 65_536


class NotFresh(ValueError):
    """An authentic message that is stale, from the future, or already seen."""


class ReplayGuard:
    def __init__(self, window_s: float = WINDOW_S, max_nonces: int = MAX_NONCES) -> None:
        self._window = window_s
        self._max = max_nonces
        self._seen: set[bytes] = set()
        self._by_time: list[tuple[float, bytes]] = []  # heap: oldest timestamp first
        # Timestamps at or below this are refused: nonces this old may have been forgotten.
        self._floor = -math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, ts: float, nonce: bytes, now: float) -> None:
        """Accept (and remember) the message, or raise NotFresh."""
        if not math.isfinite(ts) or ts < now - self._window:
            raise NotFresh(f"stale timestamp ({now - ts:.0f} s old; at most {self._window:g})")
        if ts > now + self._window:
            raise NotFresh(f"timestamp {ts - now:.0f} s in the future (at most {self._window:g})")
        self._forget(now)
        if ts <= self._floor:
            raise NotFresh("timestamp older than the replay memory")
        if nonce in self._seen:
            raise NotFresh("replayed (nonce already seen)")
        self._seen.add(nonce)
        heapq.heappush(self._by_time, (ts, nonce))
        while len(self._seen) > self._max:
            old_ts, old = heapq.heappop(self._by_time)
            self._seen.discard(old)
            self._floor = max(self._floor, old_ts)

    def _forget(self, now: float) -> None:
        """Drop nonces whose messages would be refused as stale anyway."""
        while self._by_time and self._by_time[0][0] < now - self._window:
            _, old = heapq.heappop(self._by_time)
            self._seen.discard(old)
