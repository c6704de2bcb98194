"""Wires the cluster layer into a node: gossip over UDP with push-pull over HTTP, the
replicated cluster state persisted on disk, and the coordinator that serves the public API."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from cluster.clock import SystemClock
from cluster.coordinator import Coordinator
from cluster.gossip import Gossip, GossipConfig, JoinError
from cluster.healer import Healer, HealerConfig
from cluster.membership import State
from cluster.peers import Peers
from cluster.rebalance import Rebalancer
from cluster.runtime import ClusterRuntime
from cluster.state import ClusterState
from cluster.udp import UdpTransport
from node.backend import EngineBackend
from node.blocking import Blocking
from node.config import NodeConfig
from node.engine import Engine
from node.files import write_atomic

log = logging.getLogger(__name__)


class HttpPushPull:
    """Gossip's push-pull over the peers' HTTP route (TCP, like memberlist's)."""

    def __init__(self, peers: Peers) -> None:
        self._peers = peers

    async def exchange(self, addr: str, payload: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        # Addressed to whoever answers: a seed's node id is not known before the exchange.
        out = await self._peers.request(addr, "POST", "/internal/v1/pushpull", raw=payload,
                                        to=None, timeout=timeout)
        if not isinstance(out, bytes):
            raise OSError(f"{addr}: unexpected push-pull answer")
        return out


@dataclass
class ClusterNode:
    node_id: str
    config: NodeConfig
    engine: Engine
    backend: EngineBackend
    peers: Peers
    runtime: ClusterRuntime
    gossip: Gossip
    coordinator: Coordinator
    rebalancer: Rebalancer
    healer: Healer
    _blocking: Blocking
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _remembered: list[str] = field(default_factory=list)

    @staticmethod
    def build(node_id: str, config: NodeConfig, engine: Engine, blocking: Blocking) -> ClusterNode:
        state_path = Path(config.data_dir) / "cluster_state.json"

        async def persist(raw: bytes) -> None:
            await blocking.write(write_atomic, state_path, raw)

        initial = ClusterState()
        if state_path.exists():
            initial.merge(ClusterState.decode_entries(state_path.read_bytes()))
        backend = EngineBackend(engine)
        peers = Peers(config.peer_secret, config.peer_timeout_s, sender=node_id)
        runtime = ClusterRuntime(node_id, backend, persist, initial)
        clock = SystemClock()
        gossip = Gossip(
            node_id,
            config.addr,
            UdpTransport(config.host, config.port),
            HttpPushPull(peers),
            clock,
            random.Random(),
            GossipConfig(
                probe_interval=config.probe_interval_s,
                probe_timeout=config.probe_timeout_s,
                gossip_interval=config.gossip_interval_s,
                push_pull_interval=config.push_pull_interval_s,
                suspicion_mult=config.suspicion_mult,
            ),
            runtime.delegate,
            config.peer_secret,  # the API key when there is no secret: never unkeyed gossip
        )
        runtime.members_count = gossip.num_alive
        coordinator = Coordinator(
            node_id, runtime, backend, peers, gossip, clock,
            search_timeout_s=config.search_timeout_ms / 1000,
            peer_timeout_s=config.peer_timeout_s,
        )
        coordinator.offload = blocking.parse
        rebalancer = Rebalancer(coordinator, per_node=config.moves_per_node,
                                docs_per_s=config.transfer_docs_per_s)
        healer = Healer(coordinator, rebalancer, HealerConfig(
            dead_grace_s=config.dead_grace_s,
            anti_entropy_interval_s=config.anti_entropy_interval_s,
            tombstone_grace_s=config.tombstone_grace_s,
        ))
        node = ClusterNode(node_id, config, engine, backend, peers, runtime, gossip,
                           coordinator, rebalancer, healer, blocking)
        runtime.member_listeners.append(lambda _member: node.remember_peers())
        return node

    def metrics_snapshot(self) -> dict[str, Any]:
        """Figures for /metrics (read on scrape)."""
        members: dict[str, int] = {}
        for m in self.gossip.members():
            members[m.state.value] = members.get(m.state.value, 0) + 1
        return {
            "gossip": dataclasses.asdict(self.gossip.stats),
            "members": members,
            "health": self.gossip.health_score,
            "hints_pending": self.coordinator.hints.pending(),
            "hints_dropped": self.coordinator.hints.dropped,
            "epoch": self.runtime.state.epoch,
        }

    async def known_peers(self) -> list[str]:
        """Addresses of the other members last seen alive (kept across restarts)."""
        path = Path(self.config.data_dir) / "peers.json"
        if not path.exists():
            return []
        try:
            peers = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            return []
        return [p for p in peers if isinstance(p, str) and p != self.config.addr]

    def remember_peers(self) -> None:
        """Called on membership changes: keep the alive peers' addresses for a restart."""
        peers = sorted(m.addr for m in self.gossip.members()
                       if m.state == State.ALIVE and m.id != self.node_id)
        if peers != self._remembered:
            self._remembered = peers
            self.spawn(self._blocking.write(write_atomic,
                                            Path(self.config.data_dir) / "peers.json",
                                            orjson.dumps(peers)))

    async def try_join(self, peers: list[str]) -> bool:
        try:
            n = await self.gossip.join(peers)
        except JoinError:
            return False
        log.info("rejoined through %d remembered peer(s)", n)
        return True

    async def rejoin(self, peers: list[str]) -> None:
        """Keep trying remembered peers until one answers or someone else finds us."""
        delay = 1.0
        while self.gossip.num_alive() <= 1 and not await self.try_join(peers):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run background work (a rebalance) that outlives the request that started it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        await self.peers.start()
        await self.runtime.start()
        await self.gossip.start()
        await self.healer.start()

    async def join(self, seeds: list[str], deadline_s: float = 120.0) -> int:
        """Join through the seeds, retrying until one answers or the deadline passes."""
        seeds = [s for s in seeds if s != self.config.addr]
        if not seeds:
            return 0
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        delay = 0.2
        while True:
            try:
                n = await self.gossip.join(seeds)
                log.info("joined through %d of %d seed(s)", n, len(seeds))
                return n
            except JoinError as exc:
                if loop.time() + delay > end:
                    raise
                log.warning("join failed, retrying: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.healer.stop()
        await self.gossip.stop()
        await self.runtime.stop()
        await self.peers.close()
