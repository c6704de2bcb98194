"""Many cluster nodes in one process: each a real `ClusterService` (gossip, state, data path,
rebalance, healing, repair) over `MemoryBackend` storage, the in-memory network (`memnet` for
gossip, `mempeers` for the internal routes, through their JSON codecs) and one ManualClock.

Nothing waits on real time: `until` and `run` jump the clock to the next wake-up whenever the
nodes have nothing else to do. Faults: `pause` (nothing in, nothing out; unlike a SIGSTOPped
process, the node's own timers keep running, so it suspects the others too), `cut` (a
partition), `kill` (SIGKILL: the process goes, its storage and state file stay) and `boot`
again (a restart).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from aquila.cluster.clock import ManualClock
from aquila.cluster.membership.gossip import GossipConfig
from aquila.cluster.membership.memnet import MemNetwork
from aquila.cluster.membership.table import State
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.operations import DocBatch
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.cluster.movement.healer import HealerConfig
from aquila.cluster.peers.memory import MemoryPeerNet
from aquila.cluster.replication.backend import ShardBackend
from aquila.cluster.replication.membackend import MemoryBackend
from aquila.cluster.service import ClusterService, ClusterSettings
from aquila.cluster.state.entries import ClusterState, CollectionEntry

T = TypeVar("T")

POLL_S = 0.05

FAST_GOSSIP = GossipConfig(probe_interval=0.5, probe_timeout=0.25, gossip_interval=0.1,
                           push_pull_interval=5.0, suspicion_mult=3)


@dataclass
class SimNode:
    id: str
    addr: str
    backend: MemoryBackend = field(default_factory=MemoryBackend)
    # In place of `backend` when set: other storage (a real engine, for what FAISS decides).
    storage: ShardBackend | None = None
    state_file: bytes = b""  # what the runtime persisted last (survives a kill)
    service: ClusterService | None = None

    @property
    def svc(self) -> ClusterService:
        assert self.service is not None, f"{self.id} is not running"
        return self.service

    @property
    def running(self) -> bool:
        return self.service is not None


class SimCluster:
    def __init__(self, n: int, seed: int = 1, **settings: Any) -> None:
        self.clock = ManualClock()
        self.net = MemNetwork(self.clock, random.Random(seed))
        self.hub = MemoryPeerNet(self.net, self.clock)
        self.seed = seed
        healer = settings.pop("healer", HealerConfig(dead_grace_s=600.0))
        self.settings = ClusterSettings(healer=healer, gossip=FAST_GOSSIP, **settings)
        self.nodes = {f"n{i + 1}": SimNode(f"n{i + 1}", f"10.0.0.{i + 1}:8470")
                      for i in range(n)}

    # -- lifecycle --------------------------------------------------------------------------
    def node(self, node_id: str) -> SimNode:
        return self.nodes[node_id]

    def add_node(self) -> SimNode:
        i = len(self.nodes) + 1
        node = self.nodes[f"n{i}"] = SimNode(f"n{i}", f"10.0.0.{i}:8470")
        return node

    async def start(self) -> SimCluster:
        first, *rest = self.nodes.values()
        await self.boot(first)
        for node in rest:
            await self.boot(node, join=first.id)
        await self.until(lambda: all(self.sees_all_alive(n) for n in self.running()),
                         what="every node alive everywhere")
        return self

    async def boot(self, node: SimNode, join: str | None = None) -> None:
        """Start (or restart) a node with its storage and state file; join through `join`."""
        initial = ClusterState()
        if node.state_file:
            initial.merge(ClusterState.decode_entries(node.state_file))

        async def persist(raw: bytes) -> None:
            node.state_file = raw

        index = int(node.id[1:])
        svc = ClusterService.build(
            node.id, node.addr, node.storage or node.backend, persist, self.hub.client(node.addr),
            self.net.transport(node.addr), self.net.push_pull(node.addr), self.clock,
            rng=random.Random(self.seed * 1000 + index), settings=self.settings,
            initial=initial,
        )
        node.service = svc
        self.hub.serve(node.addr, svc.peer_service)
        self.net.serve_push_pull(node.addr, svc.gossip.handle_push_pull)
        await svc.start()
        if join is not None:
            await self.run(svc.join([self.nodes[join].addr], deadline_s=60))

    async def kill(self, node_id: str) -> None:
        """SIGKILL: everything in flight is lost; storage and the state file stay."""
        node = self.nodes[node_id]
        self.net.pause(node.addr)  # from this instant nothing leaves or reaches it
        await node.svc.stop()
        node.service = None
        self.hub.stop(node.addr)
        self.net.resume(node.addr)

    async def stop(self) -> None:
        for node in self.nodes.values():
            if node.service is not None:
                await node.service.stop()
                node.service = None

    def running(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.running]

    # -- faults -----------------------------------------------------------------------------
    def pause(self, node_id: str) -> None:
        self.net.pause(self.nodes[node_id].addr)

    def resume(self, node_id: str) -> None:
        self.net.resume(self.nodes[node_id].addr)

    def cut(self, a: str, b: str) -> None:
        self.net.block(self.nodes[a].addr, self.nodes[b].addr)
        self.net.block(self.nodes[b].addr, self.nodes[a].addr)

    def heal(self, a: str, b: str) -> None:
        self.net.unblock(self.nodes[a].addr, self.nodes[b].addr)
        self.net.unblock(self.nodes[b].addr, self.nodes[a].addr)

    # -- time -------------------------------------------------------------------------------
    async def run(self, aw: Awaitable[T], limit_s: float = 600.0) -> T:
        """Await `aw` with the cluster running (the clock jumps whenever all is idle)."""
        return await self.clock.run(aw, limit_s=limit_s)

    async def until(self, pred: Callable[[], Any], limit_s: float = 300.0,
                    what: str = "condition") -> Any:
        """Run the cluster until `pred()` (sync or async) is truthy; its value."""

        async def poll() -> Any:
            while True:
                value = pred()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value
                await self.clock.sleep(POLL_S)

        try:
            return await self.run(poll(), limit_s)
        except TimeoutError:
            raise AssertionError(f"timed out after {limit_s} clock seconds waiting for "
                                 f"{what}") from None

    async def wait(self, seconds: float) -> None:
        """Let `seconds` of clock time pass with the cluster running."""
        await self.run(self.clock.sleep(seconds), limit_s=seconds + 1)

    # -- views ------------------------------------------------------------------------------
    def states(self, observer: str) -> dict[str, State]:
        return {m.id: m.state for m in self.nodes[observer].svc.gossip.members()}

    def sees_all_alive(self, node: SimNode) -> bool:
        states = self.states(node.id)
        return all(states.get(n.id) == State.ALIVE for n in self.running())

    def entry(self, observer: str, name: str) -> CollectionEntry | None:
        return self.nodes[observer].svc.runtime.state.get(name)

    def maps_agree(self, name: str) -> bool:
        """Every running node has the same version of the collection's entry."""
        versions = {(e.version if (e := self.entry(n.id, name)) else None)
                    for n in self.running()}
        return len(versions) == 1

    def moving(self, observer: str, name: str) -> bool:
        e = self.entry(observer, name)
        return e is not None and any(e.move_of(s) is not None for s in range(len(e.replicas)))


# -- data ------------------------------------------------------------------------------------
def spec(name: str = "c", dim: int = 4, shards: int = 6, replication: int = 1,
         metric: str = "l2") -> CollectionSpec:
    return CollectionSpec(name, dim, metric, shards, replication, IndexSpec("flat"))


def batch(ids: list[str], dim: int = 4, seed: int = 0, consistency: str = "all") -> DocBatch:
    rng = np.random.default_rng(seed)
    return DocBatch(ids, rng.standard_normal((len(ids), dim)).astype(np.float32),
                    [b'{"n":%d}' % i for i in range(len(ids))], consistency)


def records(node: SimNode, name: str, shard: int) -> dict[str, Incoming]:
    coll = node.backend.collections.get(name)
    return dict(coll.shards.get(shard, {})) if coll is not None else {}
