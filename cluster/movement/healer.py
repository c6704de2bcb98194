"""Background duties that keep the cluster whole without an operator:

- every node: hand hinted writes to replicas that are back, and run anti-entropy on the
  shards it leads;
- the leader (the alive member with the smallest id, as this node sees it): once a node has
  been dead longer than the grace period, re-replicate its shards from surviving replicas;
  and drop shard copies that the map no longer assigns (a node that came back after its
  shards were re-homed is reconciled, not duplicated).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aquila.cluster.clock import Clock
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.errors import expected
from aquila.cluster.movement.plan import Move
from aquila.cluster.movement.rebalance import Rebalancer
from aquila.cluster.movement.repair import Repair
from aquila.cluster.replication.replica import Replicas
from aquila.cluster.replication.writes import WritePath
from aquila.cluster.state.entries import ClusterState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealerConfig:
    # Seconds between two rounds of the healer's duties.
    interval_s: float = 1.0
    # A node dead this long has its shards re-replicated; <= 0 disables self-healing.
    dead_grace_s: float = 60.0
    # Seconds between anti-entropy passes over the shards this node leads.
    anti_entropy_interval_s: float = 30.0
    # Tombstones older than this are purged once every replica has them; <= 0 keeps them.
    tombstone_grace_s: float = 86400.0
    # Seconds between two looks for shard copies the map no longer assigns (one request per
    # node and collection).
    orphan_interval_s: float = 5.0


@dataclass
class HealerStats:
    """Counters of the healer's work on this node (read by /metrics)."""

    heal_moves: int = 0  # replica moves started to restore a dead node's shards
    orphans_dropped: int = 0  # shard copies dropped because the map no longer assigns them


class Healer:
    def __init__(
        self,
        state: ClusterState,
        view: MemberView,
        replicas: Replicas,
        writes: WritePath,
        repair: Repair,
        rebalancer: Rebalancer,
        clock: Clock,
        config: HealerConfig,
    ) -> None:
        self._state = state
        self._view = view
        self._replicas = replicas
        self._writes = writes
        self._repair = repair
        self.rebalancer = rebalancer
        self._clock = clock
        self.config = config
        self._task: asyncio.Task[None] | None = None
        self._last_ae = 0.0
        self._last_orphans = 0.0
        self._orphans: dict[tuple[str, str, int], int] = {}
        self.stats = HealerStats()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await self._clock.sleep(self.config.interval_s)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a peer gone mid-round is expected; the next round retries
                log.warning("healer round failed: %s", exc, exc_info=not expected(exc))

    async def round(self) -> None:
        clock, view = self._clock, self._view
        for node in self._writes.hints.nodes():
            if view.is_alive(node):
                await self._writes.replay_hints(node)
        await self.rebalancer.clear_abandoned()
        if clock.now() - self._last_ae >= self.config.anti_entropy_interval_s:
            self._last_ae = clock.now()
            await self._repair.sync_led_shards(self.config.tombstone_grace_s)
        if view.is_leader() and not self.rebalancer.busy and not self.rebalancer.moves_in_map():
            await self.heal()
            if clock.now() - self._last_orphans >= self.config.orphan_interval_s:
                self._last_orphans = clock.now()
                await self.collect_orphans()

    def expired_dead(self) -> set[str]:
        if self.config.dead_grace_s <= 0:
            return set()
        return self._view.gone_for(self.config.dead_grace_s)

    async def heal(self) -> None:
        """Restore the replication factor of shards that had a replica on a long-dead node."""
        gone = self.expired_dead()
        if not gone:
            return
        state = self._state
        held = {n for e in state.live().values() for r in e.replicas for n in r}
        if not gone & held:
            return
        live = self._view.alive()
        alive = set(live)

        def copyable(m: Move) -> bool:
            # A shard whose every replica is gone has nothing to copy from: it waits for a
            # replica to come back instead of failing the same move every round.
            entry = state.get(m.collection)
            return entry is not None and bool(set(entry.replicas[m.shard]) & alive)

        planned = await self.rebalancer.plan_moves(live)
        if self.rebalancer.busy or self.rebalancer.moves_in_map():
            return  # a rebalance started while we planned: it will do the healing too
        moves = [m for m in planned
                 if (m.from_node is None or m.from_node in gone) and copyable(m)]
        if moves:
            log.info("self-healing: %d replica move(s) away from %s", len(moves), sorted(gone),
                     extra={"event": "heal", "moves": len(moves), "gone": sorted(gone)})
            self.stats.heal_moves += len(moves)
            stats = await self.rebalancer.run(moves)
            failed = [t for t in stats.transfers if t.error]
            if failed:
                log.warning("self-healing: %d move(s) failed", len(failed))
            else:
                log.info("self-healing: %d replica move(s) done", len(moves))

    async def collect_orphans(self) -> None:
        """Drop shard copies no longer in the map, once seen orphaned on two rounds in a row
        (so every node has had time to learn the map that moved them)."""
        seen: dict[tuple[str, str, int], int] = {}
        alive = self._view.alive()
        for name, entry in self._state.live().items():
            for node in alive:
                try:
                    local = await self._replicas.of(node).stats(name)
                except Exception:
                    continue
                for shard in local:
                    if shard < len(entry.replicas) and shard not in entry.shards_of(node):
                        key = (node, name, shard)
                        seen[key] = self._orphans.get(key, 0) + 1
        for key, strikes in list(seen.items()):
            if strikes >= 2 and not self.rebalancer.busy:
                node, name, shard = key
                try:
                    await self._replicas.of(node).drop_shard(name, shard)
                    self.stats.orphans_dropped += 1
                    log.info("dropped orphaned copy of %s/%d on %s", name, shard, node,
                             extra={"event": "orphan_dropped", "collection": name,
                                    "shard": shard, "peer": node})
                    seen.pop(key, None)
                except Exception as exc:
                    log.debug("orphan %s/%d on %s: %s", name, shard, node, exc)
        self._orphans = {k: v for k, v in seen.items() if v < 2}
