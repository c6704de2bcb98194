"""The cluster side of one node, assembled: membership (gossip and the member view), the
replicated state (runtime and publisher), the data path (replicas, collections, writes,
reads, the peer service) and data movement (repair, rebalancer, healer).

Everything it touches from outside comes in as an argument: the storage (`ShardBackend`), the
peer client, the two gossip transports, the clock and the random source. A real node passes the
engine, HTTP, UDP and the system clock (`node.cluster_node`); the in-process cluster passes
`MemoryBackend`, `MemoryPeers`, `memnet` and a `ManualClock`, and runs the same code.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aquila.cluster.clock import Clock, track
from aquila.cluster.membership.gossip import Gossip, GossipConfig, JoinError
from aquila.cluster.membership.transport import PushPullTransport, Transport
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.hlc import HybridClock
from aquila.cluster.movement.healer import Healer, HealerConfig
from aquila.cluster.movement.rebalance import Rebalancer
from aquila.cluster.movement.repair import Repair
from aquila.cluster.peers.client import PeerClient
from aquila.cluster.replication.backend import ShardBackend
from aquila.cluster.replication.lifecycle import Collections
from aquila.cluster.replication.reads import ReadPath
from aquila.cluster.replication.remote import PeerService, RemoteReplica
from aquila.cluster.replication.replica import LocalReplica, Replicas
from aquila.cluster.replication.writes import WritePath
from aquila.cluster.state.entries import ClusterState
from aquila.cluster.state.publish import Publisher
from aquila.cluster.state.runtime import ClusterRuntime, Persist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSettings:
    # A search's deadline when the request gives none.
    search_timeout_s: float = 10.0
    # Deadline of one request to a peer's internal routes.
    peer_timeout_s: float = 10.0
    # Replica moves under way at once on any one node (source or target).
    moves_per_node: int = 2
    # Copy throttle per move in documents per second; 0 copies as fast as the nodes go.
    transfer_docs_per_s: float = 0.0
    healer: HealerConfig = field(default_factory=HealerConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    # Authenticates gossip packets and push-pulls; None: open.
    cluster_secret: str | None = None


@dataclass
class ClusterService:
    node_id: str
    clock: Clock
    runtime: ClusterRuntime
    gossip: Gossip
    view: MemberView
    replicas: Replicas
    publisher: Publisher
    collections: Collections
    writes: WritePath
    reads: ReadPath
    repair: Repair
    rebalancer: Rebalancer
    healer: Healer
    peer_service: PeerService
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @staticmethod
    def build(
        node_id: str,
        addr: str,
        backend: ShardBackend,
        persist: Persist,
        peers: PeerClient,
        transport: Transport,
        push_pull: PushPullTransport,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        settings: ClusterSettings | None = None,
        initial: ClusterState | None = None,
    ) -> ClusterService:
        s = settings or ClusterSettings()
        runtime = ClusterRuntime(node_id, backend, persist, clock, initial)
        gossip = Gossip(node_id, addr, transport, push_pull, clock, rng or random.Random(),
                        s.gossip, runtime.delegate, s.cluster_secret)
        runtime.members_count = gossip.num_alive
        view = MemberView(node_id, gossip, clock)
        runtime.member_listeners.append(view.changed)
        state = runtime.state
        # Versions come from the clock's wall time (shared by every node, unlike `now`).
        hlc = HybridClock(lambda: int(clock.wall() * 1000))
        local = LocalReplica(node_id, backend, state)
        replicas = Replicas(
            node_id, local,
            lambda node: RemoteReplica(node, view.addr_of, peers, s.peer_timeout_s),
        )
        publisher = Publisher(runtime, view, peers, clock)
        writes = WritePath(node_id, state, view, replicas, hlc)
        repair = Repair(state, view, replicas, hlc)
        rebalancer = Rebalancer(node_id, state, view, replicas, publisher, repair, clock,
                                per_node=s.moves_per_node, docs_per_s=s.transfer_docs_per_s)
        return ClusterService(
            node_id=node_id,
            clock=clock,
            runtime=runtime,
            gossip=gossip,
            view=view,
            replicas=replicas,
            publisher=publisher,
            collections=Collections(node_id, runtime, view, replicas, publisher),
            writes=writes,
            reads=ReadPath(view, replicas, clock, s.search_timeout_s),
            repair=repair,
            rebalancer=rebalancer,
            healer=Healer(state, view, replicas, writes, repair, rebalancer, clock, s.healer),
            peer_service=PeerService(node_id, local, state, runtime.merge, hlc),
        )

    async def start(self) -> None:
        await self.runtime.start()
        await self.gossip.start()
        await self.healer.start()

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.healer.stop()
        await self.gossip.stop()
        await self.runtime.stop()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run background work (a rebalance) that outlives the request that started it."""
        track(asyncio.get_running_loop().create_task(coro), self._tasks, log)

    async def join(self, seeds: list[str], deadline_s: float = 120.0) -> int:
        """Join through the seeds, retrying until one answers or the deadline passes."""
        seeds = [s for s in seeds if s != self.gossip.addr]
        if not seeds:
            return 0
        end = self.clock.now() + deadline_s
        delay = 0.2
        while True:
            try:
                n = await self.gossip.join(seeds)
                log.info("joined through %d of %d seed(s)", n, len(seeds))
                return n
            except JoinError as exc:
                if self.clock.now() + delay > end:
                    raise
                log.warning("join failed, retrying: %s", exc)
                await self.clock.sleep(delay)
                delay = min(delay * 2, 5.0)

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
            await self.clock.sleep(delay)
            delay = min(delay * 2, 30.0)
