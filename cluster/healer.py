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

from cluster.antientropy import sync_node_shards
from cluster.coordinator import Coordinator
from cluster.membership import State
from cluster.rebalance import Rebalancer, plan_moves
from cluster.rebalance_plan import Move

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


class Healer:
    def __init__(self, coord: Coordinator, rebalancer: Rebalancer, config: HealerConfig) -> None:
        self.coord = coord
        self.rebalancer = rebalancer
        self.config = config
        self._task: asyncio.Task[None] | None = None
        self._last_ae = 0.0
        self._last_orphans = 0.0
        self._orphans: dict[tuple[str, str, int], int] = {}

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def is_leader(self) -> bool:
        alive = [m.id for m in self.coord.view.members() if m.state == State.ALIVE]
        return bool(alive) and min(alive) == self.coord.node_id

    async def _loop(self) -> None:
        clock = self.coord.clock
        while True:
            await clock.sleep(self.config.interval_s)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("healer round failed")

    async def round(self) -> None:
        coord, clock = self.coord, self.coord.clock
        alive = {m.id for m in coord.view.members() if m.state == State.ALIVE}
        for node in coord.hints.nodes():
            if node in alive:
                await coord.replay_hints(node)
        await self.rebalancer.clear_abandoned(alive | {coord.node_id}, self.is_leader())
        if clock.now() - self._last_ae >= self.config.anti_entropy_interval_s:
            self._last_ae = clock.now()
            await sync_node_shards(coord, self.config.tombstone_grace_s)
        if self.is_leader() and not self.rebalancer.busy and not self.rebalancer.moves_in_map():
            await self.heal()
            if clock.now() - self._last_orphans >= self.config.orphan_interval_s:
                self._last_orphans = clock.now()
                await self.collect_orphans()

    def expired_dead(self) -> set[str]:
        if self.config.dead_grace_s <= 0:
            return set()
        now = self.coord.clock.now()
        return {
            m.id for m in self.coord.view.members()
            if m.state in (State.DEAD, State.LEFT)
            and now - m.state_change_time >= self.config.dead_grace_s
        }

    async def heal(self) -> None:
        """Restore the replication factor of shards that had a replica on a long-dead node."""
        gone = self.expired_dead()
        if not gone:
            return
        held = {n for e in self.coord.runtime.state.live().values() for r in e.replicas for n in r}
        if not gone & held:
            return
        live = sorted(m.id for m in self.coord.view.members() if m.state == State.ALIVE)
        state = self.coord.runtime.state
        alive = set(live)

        def copyable(m: Move) -> bool:
            # A shard whose every replica is gone has nothing to copy from: it waits for a
            # replica to come back instead of failing the same move every round.
            entry = state.get(m.collection)
            return entry is not None and bool(set(entry.replicas[m.shard]) & alive)

        moves = [m for m in plan_moves(self.coord, live)
                 if (m.from_node is None or m.from_node in gone) and copyable(m)]
        if moves:
            log.info("self-healing: %d replica move(s) away from %s", len(moves), sorted(gone))
            stats = await self.rebalancer.run(moves)
            failed = [t for t in stats.transfers if t.error]
            if failed:
                log.warning("self-healing: %d move(s) failed", len(failed))

    async def collect_orphans(self) -> None:
        """Drop shard copies no longer in the map, once seen orphaned on two rounds in a row
        (so every node has had time to learn the map that moved them)."""
        coord = self.coord
        seen: dict[tuple[str, str, int], int] = {}
        alive = sorted(m.id for m in coord.view.members() if m.state == State.ALIVE)
        for name, entry in coord.runtime.state.live().items():
            for node in alive:
                try:
                    local = await coord.node_stats(node, name)
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
                    await coord.drop_shard(node, name, shard)
                    log.info("dropped orphaned copy of %s/%d on %s", name, shard, node)
                    seen.pop(key, None)
                except Exception as exc:
                    log.debug("orphan %s/%d on %s: %s", name, shard, node, exc)
        self._orphans = {k: v for k, v in seen.items() if v < 2}
