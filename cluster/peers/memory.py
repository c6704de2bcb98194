"""The peer client's in-process twin: requests to other nodes' internal routes go, through
JSON as on the wire (or the binary frames of the hot paths, as bytes), straight to the
target's handler (`remote.PeerService`), so the whole replica
protocol (codecs included) runs between many nodes in one process. The in-memory network's
faults apply: a paused or cut-off node hangs until the caller's timeout (on the injected
clock), a stopped one refuses at once. Gossip's push-pull travels by `memnet`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import orjson

from aquila.cluster.clock import Clock
from aquila.cluster.membership.memnet import MemNetwork
from aquila.cluster.model.errors import (
    AquilaError,
    BadRequest,
    Unauthorized,
    Unavailable,
    from_code,
)
from aquila.cluster.peers.client import PUSH_PULL_PATH, PeerError


class PeerHandler(Protocol):
    """A node's internal routes (`remote.PeerService`)."""

    node_id: str

    async def handle(self, method: str, path: str, body: Any, raw: bytes | None = None
                     ) -> Any: ...


class MemoryPeerNet:
    """Where each node's internal routes are served, by address."""

    def __init__(self, net: MemNetwork, clock: Clock) -> None:
        self.net = net
        self.clock = clock
        self.services: dict[str, PeerHandler] = {}
        self.requests = 0

    def serve(self, addr: str, service: PeerHandler) -> None:
        self.services[addr] = service

    def stop(self, addr: str) -> None:
        self.services.pop(addr, None)

    def client(self, addr: str) -> MemoryPeers:
        return MemoryPeers(self, addr)


class MemoryPeers:
    def __init__(self, hub: MemoryPeerNet, addr: str) -> None:
        self._hub = hub
        self.addr = addr

    async def request(
        self, addr: str, method: str, path: str, body: Any = None, *, to: str | None,
        timeout: float | None = None, raw: bytes | None = None,  # noqa: ASYNC109
        max_answer: int | None = None,
    ) -> Any:
        hub = self._hub
        hub.requests += 1
        if raw is not None and path == PUSH_PULL_PATH:  # gossip's push-pull: memnet carries it
            return await hub.net.push_pull(self.addr).exchange(addr, raw, timeout or 10.0)
        if not hub.net.reachable(self.addr, addr):
            await hub.clock.sleep(timeout or 10.0)
            raise PeerError(f"node {addr} did not answer: TimeoutError")
        await asyncio.sleep(0)  # a real round trip never completes synchronously
        service = hub.services.get(addr)
        if service is None:
            raise PeerError(f"node {addr} did not answer: ConnectionRefusedError")
        if to != service.node_id:  # as a signature names its recipient
            raise Unauthorized(f"{addr}: peer request refused: addressed to {to!r}")
        wire = orjson.loads(orjson.dumps(body)) if body is not None else None
        try:
            # A frame (`raw`) goes as its bytes, through the same codecs as over HTTP.
            answer = await service.handle(method, path, wire, None if raw is None else bytes(raw))
        except AquilaError as exc:
            err = from_code(exc.code, f"{addr}: {exc.message}")
            if exc.status >= 500 and not isinstance(err, Unavailable):
                raise PeerError(err.message) from None
            raise err from None
        except (KeyError, ValueError, TypeError) as exc:  # as node.internal_api answers
            raise BadRequest(f"{addr}: malformed peer request: {type(exc).__name__}: {exc}") from None
        if isinstance(answer, bytes):
            if max_answer is not None and len(answer) > max_answer:  # as the lean client
                raise PeerError(f"node {addr} did not answer: its answer is too long")
            return bytes(answer)
        return orjson.loads(orjson.dumps(answer))
