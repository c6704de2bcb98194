"""Wires the cluster layer into a node: the engine as its storage, the peer client over HTTP
(push-pull too, like memberlist's TCP), gossip over UDP, the cluster state persisted on disk,
and the peers remembered across restarts."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from aquila.cluster.clock import Clock, SystemClock
from aquila.cluster.membership.gossip import GossipConfig
from aquila.cluster.membership.table import Member, State
from aquila.cluster.membership.transport import Transport
from aquila.cluster.membership.udp import UdpTransport
from aquila.cluster.movement.healer import HealerConfig
from aquila.cluster.peers.client import PUSH_PULL_PATH, PeerClient
from aquila.cluster.peers.http import Peers
from aquila.cluster.service import ClusterService, ClusterSettings
from aquila.cluster.state.entries import ClusterState
from aquila.node.blocking import Blocking
from aquila.node.config import NodeConfig
from aquila.node.files import write_atomic
from aquila.node.storage.backend import EngineBackend
from aquila.node.storage.engine import Engine

log = logging.getLogger(__name__)


class HttpPushPull:
    """Gossip's push-pull over the peers' HTTP route (TCP, like memberlist's)."""

    def __init__(self, peers: PeerClient) -> None:
        self._peers = peers

    async def exchange(self, addr: str, payload: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        # Addressed to whoever answers: a seed's node id is not known before the exchange.
        out = await self._peers.request(addr, "POST", PUSH_PULL_PATH, raw=payload,
                                        to=None, timeout=timeout)
        if not isinstance(out, bytes):
            raise OSError(f"{addr}: unexpected push-pull answer")
        return out


def cluster_settings(config: NodeConfig) -> ClusterSettings:
    return ClusterSettings(
        search_timeout_s=config.search_timeout_ms / 1000,
        peer_timeout_s=config.peer_timeout_s,
        moves_per_node=config.moves_per_node,
        transfer_docs_per_s=config.transfer_docs_per_s,
        healer=HealerConfig(
            dead_grace_s=config.dead_grace_s,
            anti_entropy_interval_s=config.anti_entropy_interval_s,
            tombstone_grace_s=config.tombstone_grace_s,
        ),
        gossip=GossipConfig(
            probe_interval=config.probe_interval_s,
            probe_timeout=config.probe_timeout_s,
            gossip_interval=config.gossip_interval_s,
            push_pull_interval=config.push_pull_interval_s,
            suspicion_mult=config.suspicion_mult,
        ),
        # The API key when there is no secret: never unkeyed gossip.
        cluster_secret=config.peer_secret,
    )


@dataclass
class ClusterNode:
    node_id: str
    config: NodeConfig
    engine: Engine
    peers: PeerClient
    service: ClusterService
    _blocking: Blocking
    # The HTTP client this node made (and so starts and closes); given peers are the giver's.
    _own_client: Peers | None = None
    _remembered: list[str] = field(default_factory=list)

    @staticmethod
    def build(
        node_id: str,
        config: NodeConfig,
        engine: Engine,
        blocking: Blocking,
        *,
        clock: Clock | None = None,
        transport: Transport | None = None,
        peers: PeerClient | None = None,
    ) -> ClusterNode:
        """The real transports (UDP, HTTP) and the system clock unless others are given."""
        state_path = Path(config.data_dir) / "cluster_state.json"

        async def persist(raw: bytes) -> None:
            await blocking.write(write_atomic, state_path, raw)

        initial = ClusterState()
        if state_path.exists():
            initial.merge(ClusterState.decode_entries(state_path.read_bytes()))
        clock = clock or SystemClock()
        own = None if peers is not None else Peers(config.peer_secret, config.peer_timeout_s,
                                                   sender=node_id, wall=clock.wall)
        client: PeerClient = peers if peers is not None else own  # type: ignore[assignment]
        service = ClusterService.build(
            node_id,
            config.addr,
            EngineBackend(engine),
            persist,
            client,
            transport or UdpTransport(config.host, config.port),
            HttpPushPull(client),
            clock,
            rng=random.Random(),
            settings=cluster_settings(config),
            initial=initial,
        )
        # Rebalance plans at a thousand nodes take seconds: not on the event loop.
        service.rebalancer.offload = blocking.parse
        service.reads.offload = blocking.parse
        node = ClusterNode(node_id, config, engine, client, service, blocking,
                           _own_client=own)
        service.runtime.member_listeners.append(node.remember_peers)
        return node

    def metrics_snapshot(self) -> dict[str, Any]:
        """Figures for /metrics (read on scrape)."""
        gossip = self.service.gossip
        members: dict[str, int] = {}
        for m in gossip.members():
            members[m.state.value] = members.get(m.state.value, 0) + 1
        service = self.service
        hints = service.writes.hints
        writes = service.writes.stats
        stages: dict[str, int] = {}
        for t in service.rebalancer.active.values():
            stages[t.stage.value] = stages.get(t.stage.value, 0) + 1
        return {
            "gossip": dataclasses.asdict(gossip.stats),
            "members": members,
            "health": gossip.health_score,
            "hints_pending": hints.pending(),
            "hints_dropped": hints.dropped,
            "hints_added": hints.added,
            "hints_replayed": hints.replayed,
            "epoch": service.runtime.state.epoch,
            "reads": dataclasses.asdict(service.reads.stats),
            "writes": {"refused": dict(writes.refused), "short": dict(writes.short),
                       "degraded": writes.degraded},
            "repair": dataclasses.asdict(service.repair.stats),
            "moves": dataclasses.asdict(service.rebalancer.stats),
            "moves_active": stages,
            "healer": dataclasses.asdict(service.healer.stats),
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

    def remember_peers(self, _member: Member | None = None) -> None:
        """Called on membership changes: keep the alive peers' addresses for a restart."""
        peers = sorted(m.addr for m in self.service.gossip.members()
                       if m.state == State.ALIVE and m.id != self.node_id)
        if peers != self._remembered:
            self._remembered = peers
            self.service.spawn(self._blocking.write(write_atomic,
                                                    Path(self.config.data_dir) / "peers.json",
                                                    orjson.dumps(peers)))

    async def start(self) -> None:
        if self._own_client is not None:
            await self._own_client.start()
        await self.service.start()

    async def stop(self) -> None:
        await self.service.stop()
        if self._own_client is not None:
            await self._own_client.close()
