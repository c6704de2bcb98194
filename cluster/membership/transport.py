"""Boundaries of the gossip layer: a packet transport, a full-state exchange, and the
Delegate through which the layer above rides on gossip.

The two transports each have a real implementation (`udp.py`; push-pull over HTTP wired in
`node/`) and an in-memory twin (`memnet.py`), so many nodes can run in one process under a
fake clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aquila.cluster.membership.table import Member

# Called with (packet, sender "host:port") for every datagram received. Must not block.
Receiver = Callable[[bytes, str], None]


class Transport(Protocol):
    """Unreliable, unordered datagrams (UDP semantics): sends may be lost silently."""

    async def start(self, receiver: Receiver) -> None:
        """Bind and begin delivering packets to `receiver`."""
        ...

    async def send(self, addr: str, data: bytes) -> None:
        """Best effort; never raises for an unreachable peer."""
        ...

    async def close(self) -> None: ...


class PushPullTransport(Protocol):
    """Reliable request/response with a peer, used for join and periodic full-state sync.

    The serving side calls `Gossip.handle_push_pull(payload)` and returns its result.
    """

    # The timeout is a parameter (not asyncio.timeout) because it is measured on the
    # injected Clock and the real implementation hands it to its HTTP client.
    async def exchange(self, addr: str, payload: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        """Send our state, return theirs; raise (OSError, TimeoutError, ...) on failure."""
        ...


class Delegate(Protocol):
    """Hooks for the layer that rides on gossip (memberlist's Delegate + EventDelegate)."""

    def local_state(self) -> bytes:
        """Our full application state, sent in every push-pull."""
        ...

    def merge_remote_state(self, data: bytes) -> None:
        """A peer's `local_state` from a push-pull."""
        ...

    def get_broadcasts(self, limit_bytes: int) -> list[bytes]:
        """User messages to piggyback; their total size must stay within `limit_bytes`."""
        ...

    def notify_msg(self, data: bytes) -> None:
        """A user message received from a peer."""
        ...

    def notify_change(self, member: Member) -> None:
        """A member joined or changed state, incarnation or metadata."""
        ...
