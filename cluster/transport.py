"""I/O boundaries of the gossip layer: a packet transport and a full-state exchange.

Each has a real implementation (`udp.py`; push-pull over HTTP wired in `node/`) and an
in-memory twin (`memnet.py`) so many nodes can run in one process under a fake clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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
