"""An in-memory network twin for running many gossip nodes in one process.

Deliveries are scheduled with `loop.call_soon`, never with real time, so a simulation
driven by a ManualClock is deterministic. Like UDP, a datagram arrives with its sender's own
address (whatever the message inside says) and nothing above 64 KiB is delivered. Faults:
per-link drop probability (seeded RNG), one-way partitions, paused nodes (like SIGSTOP:
nothing in, nothing out) and slow nodes (whatever they receive is handled after a delay on the
clock). Counters of packets, bytes and push-pull exchanges let the simulator report load.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from aquila.cluster.clock import Clock
from aquila.cluster.membership.transport import Receiver

PushPullHandler = Callable[[bytes], bytes]

# The largest UDP payload over IPv4: anything larger is never delivered.
MAX_DATAGRAM = 65_507


class MemNetwork:
    def __init__(self, clock: Clock, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random(0)
        self._receivers: dict[str, Receiver] = {}
        self._push_pull: dict[str, PushPullHandler] = {}
        self._drop: dict[tuple[str, str], float] = {}
        self.default_drop = 0.0
        self._blocked: set[tuple[str, str]] = set()
        self._paused: set[str] = set()
        self._slow: dict[str, tuple[float, float]] = {}
        self.in_flight = 0  # packets queued with call_soon (not the delayed ones)
        self.delayed = 0  # packets held back by a slow receiver
        self.sent = 0
        self.dropped = 0
        self.bytes_sent = 0
        self.push_pulls = 0
        self.push_pull_bytes = 0  # request and reply payloads

    # --- wiring -------------------------------------------------------------------------

    def transport(self, addr: str) -> MemTransport:
        return MemTransport(self, addr)

    def push_pull(self, addr: str) -> MemPushPull:
        return MemPushPull(self, addr)

    def serve_push_pull(self, addr: str, handler: PushPullHandler) -> None:
        self._push_pull[addr] = handler

    # --- faults -------------------------------------------------------------------------

    def set_drop(self, src: str, dst: str, p: float) -> None:
        self._drop[(src, dst)] = p

    def block(self, src: str, dst: str) -> None:
        """Partition: nothing from src reaches dst (one way; block both for a full cut)."""
        self._blocked.add((src, dst))

    def unblock(self, src: str, dst: str) -> None:
        self._blocked.discard((src, dst))

    def pause(self, addr: str) -> None:
        self._paused.add(addr)

    def resume(self, addr: str) -> None:
        self._paused.discard(addr)

    def reachable(self, src: str, dst: str) -> bool:
        """Can a request from src reach dst and its answer come back?"""
        return self._reachable(src, dst) and self._reachable(dst, src)

    def slow_down(self, addr: str, lo: float, hi: float) -> None:
        """`addr` handles each packet (and push-pull) it receives after a delay drawn from
        [lo, hi] seconds of clock time: an overloaded node whose answers come late. A
        delay of 0 makes it normal again."""
        if hi > 0:
            self._slow[addr] = (lo, hi)
        else:
            self._slow.pop(addr, None)

    def _reachable(self, src: str, dst: str) -> bool:
        return (
            src not in self._paused and dst not in self._paused and (src, dst) not in self._blocked
        )

    # --- delivery -----------------------------------------------------------------------

    def _send(self, src: str, dst: str, data: bytes) -> None:
        self.sent += 1
        self.bytes_sent += len(data)
        p = self._drop.get((src, dst), self.default_drop)
        if (
            len(data) > MAX_DATAGRAM  # UDP refuses to send it (EMSGSIZE)
            or not self._reachable(src, dst)
            or dst not in self._receivers
            or (p > 0 and self._rng.random() < p)
        ):
            self.dropped += 1
            return
        slow = self._slow.get(dst)
        if slow is not None:
            self.delayed += 1
            delay = self._rng.uniform(*slow)
            asyncio.get_running_loop().create_task(self._deliver_late(delay, src, dst, data))
            return
        self.in_flight += 1
        asyncio.get_running_loop().call_soon(self._deliver, src, dst, data)

    async def _deliver_late(self, delay: float, src: str, dst: str, data: bytes) -> None:
        await self._clock.sleep(delay)
        self.delayed -= 1
        self.in_flight += 1
        self._deliver(src, dst, data)

    def _deliver(self, src: str, dst: str, data: bytes) -> None:
        self.in_flight -= 1
        # Re-check: the receiver may have paused or closed while the packet was queued.
        receiver = self._receivers.get(dst)
        if receiver is not None and self._reachable(src, dst):
            receiver(data, src)
        else:
            self.dropped += 1

    async def _exchange(self, src: str, dst: str, payload: bytes, limit: float) -> bytes:
        handler = self._push_pull.get(dst)
        if handler is None:
            raise ConnectionRefusedError(f"nothing listening at {dst}")
        if not (self._reachable(src, dst) and self._reachable(dst, src)):
            # A stopped or cut-off peer does not refuse, it hangs until the caller gives up.
            await self._clock.sleep(limit)
            raise TimeoutError(f"push-pull to {dst} timed out")
        await asyncio.sleep(0)  # a real round trip never completes synchronously
        slow = self._slow.get(dst)
        if slow is not None:
            await self._clock.sleep(self._rng.uniform(*slow))
        reply = handler(payload)
        self.push_pulls += 1
        self.push_pull_bytes += len(payload) + len(reply)
        return reply


class MemTransport:
    def __init__(self, net: MemNetwork, addr: str) -> None:
        self._net = net
        self.addr = addr

    async def start(self, receiver: Receiver) -> None:
        self._net._receivers[self.addr] = receiver

    async def send(self, addr: str, data: bytes) -> None:
        self._net._send(self.addr, addr, data)

    async def close(self) -> None:
        # The node is gone: nothing answers its datagrams or its push-pull any more.
        self._net._receivers.pop(self.addr, None)
        self._net._push_pull.pop(self.addr, None)


class MemPushPull:
    def __init__(self, net: MemNetwork, addr: str) -> None:
        self._net = net
        self.addr = addr

    async def exchange(self, addr: str, payload: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        return await self._net._exchange(self.addr, addr, payload, timeout)
