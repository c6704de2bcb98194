"""Carries replica moves through explicit stages (qdrant's `TransferStage`):

1. ANNOUNCE: the shard map marks the move (`moving: {from, to}`) and is pushed to every live
   node, so from then on every coordinator also sends the shard's writes to the target;
2. COPY: the shard's documents (tombstones included, versions kept) are streamed page by page
   from a live replica to the target; writes that arrive meanwhile reach the target directly,
   and last-writer-wins by version makes the order of the two irrelevant;
3. SWITCH: once the copy is complete the target has caught up, so the map replaces the source
   with the target (or adds it) and is pushed to every live node;
4. DROP: only after every live node has acknowledged the new map is the old copy dropped.

Moves run concurrently, at most `per_node` at a time on any node (source or target).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aquila.cluster.clock import Clock
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.errors import Unavailable, expected
from aquila.cluster.model.offload import Offload, inline
from aquila.cluster.model.placement import ShardMap
from aquila.cluster.movement.plan import Move, plan
from aquila.cluster.movement.repair import Repair
from aquila.cluster.replication.replica import Replicas
from aquila.cluster.state.entries import ClusterState, CollectionEntry, Moving
from aquila.cluster.state.publish import Publisher

log = logging.getLogger(__name__)

PAGE = 1000

# Runs a function off the event loop and awaits its result (the node's `Blocking.parse`).
class Stage(enum.StrEnum):
    PENDING = "pending"
    """Planned, waiting for a free slot on its nodes."""
    ANNOUNCE = "announce"
    """The map marks the move; writes start reaching the target."""
    COPY = "copy"
    """Streaming the shard from a live replica to the target."""
    SWITCH = "switch"
    """The target replaces the source in the map."""
    DROP = "drop"
    """Every node has the new map; the old copy is being dropped."""
    DONE = "done"
    """Finished."""
    FAILED = "failed"
    """Gave up; the map still lists the source, nothing was lost."""


@dataclass
class Transfer:
    move: Move
    stage: Stage = Stage.PENDING
    copied: int = 0
    total: int = 0
    error: str = ""

    @property
    def progress(self) -> float:
        if self.stage in (Stage.SWITCH, Stage.DROP, Stage.DONE):
            return 1.0
        return min(0.99, self.copied / self.total) if self.total else 0.0


@dataclass
class MoveStats:
    """Counters of the moves this node drove, over its lifetime (read by /metrics)."""

    done: int = 0
    failed: int = 0
    documents: int = 0  # records copied to targets (tombstones included)
    bytes: int = 0  # their vectors and metadata


@dataclass
class RunStats:
    transfers: list[Transfer] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0
    seconds: float = 0.0


def current_maps(state: ClusterState) -> tuple[dict[str, ShardMap], dict[str, int]]:
    live = state.live()
    maps = {n: [list(r) for r in e.replicas] for n, e in live.items()}
    return maps, {n: e.spec.replication for n, e in live.items()}


def plan_moves(state: ClusterState, live_nodes: list[str]) -> list[Move]:
    maps, replication = current_maps(state)
    return plan(maps, replication, live_nodes)


class Rebalancer:
    def __init__(
        self,
        node_id: str,
        state: ClusterState,
        view: MemberView,
        replicas: Replicas,
        publisher: Publisher,
        repair: Repair,
        clock: Clock,
        *,
        per_node: int = 2,
        docs_per_s: float = 0.0,
    ) -> None:
        self.node_id = node_id
        self._state = state
        self._view = view
        self._replicas = replicas
        self._publisher = publisher
        self._repair = repair
        self._clock = clock
        self.per_node = per_node
        # Copy throttle per move (0: as fast as the nodes go), so that serving keeps its share.
        self.docs_per_s = docs_per_s
        self.active: dict[tuple[str, int], Transfer] = {}
        self.stats = MoveStats()
        # Called as each transfer enters a stage (progress reports, tests).
        self.on_stage: Callable[[Transfer], None] | None = None
        self._lock = asyncio.Lock()
        self._slots: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(self.per_node)
        )
        # Where plans are computed: in line by default; the node sets a thread.
        self.offload: Offload = inline

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def moves_in_map(self) -> list[str]:
        """Drivers of the moves the shard map shows under way (anywhere in the cluster)."""
        return sorted({mv.driver or "?" for e in self._state.live().values()
                       for s in range(len(e.replicas)) if (mv := e.move_of(s)) is not None})

    async def plan_moves(self, live_nodes: list[str]) -> list[Move]:
        """`plan_moves` off the event loop: with 1,000 nodes and 100,000 replicas a plan takes
        seconds (CAPACITY.md), and a loop stalled that long stops answering probes and is
        declared dead. The maps are copied here, on the loop; the plan works on the copies."""
        maps, replication = current_maps(self._state)
        moves: list[Move] = await self.offload(plan, maps, replication, live_nodes)
        return moves

    async def run(self, moves: list[Move]) -> RunStats:
        """Carry out every move; returns when all are done or failed."""
        async with self._lock:
            t0 = self._clock.now()
            stats = RunStats([Transfer(m) for m in moves])
            for t in stats.transfers:
                self.active[(t.move.collection, t.move.shard)] = t
            try:
                await asyncio.gather(*(self._carry(t, stats) for t in stats.transfers))
            finally:
                for t in stats.transfers:
                    self.active.pop((t.move.collection, t.move.shard), None)
            stats.seconds = self._clock.now() - t0
            return stats

    async def _carry(self, t: Transfer, stats: RunStats) -> None:
        m = t.move
        nodes = sorted({m.to_node, *([m.from_node] if m.from_node else [])})
        for n in nodes:
            await self._slots[n].acquire()
        try:
            await self._stages(t, stats)
            self.stats.done += 1
            self._enter(t, Stage.DONE)
        except Exception as exc:
            t.error = str(exc)
            self.stats.failed += 1
            self._enter(t, Stage.FAILED)
            await self._clear_move(m)
        finally:
            for n in nodes:
                self._slots[n].release()

    def _enter(self, t: Transfer, stage: Stage) -> None:
        t.stage = stage
        m = t.move
        detail = f": {t.copied} documents" if stage == Stage.DONE else ""
        detail = f": {t.error}" if stage == Stage.FAILED else detail
        log.log(logging.WARNING if stage == Stage.FAILED else logging.INFO,
                "move %s/%d %s→%s: %s%s", m.collection, m.shard, m.from_node, m.to_node,
                stage.value, detail,
                extra={"event": "move_stage", "collection": m.collection, "shard": m.shard,
                       "from": m.from_node, "to": m.to_node, "stage": stage.value,
                       "copied": t.copied})
        if self.on_stage is not None:
            self.on_stage(t)

    async def _stages(self, t: Transfer, stats: RunStats) -> None:
        m, state = t.move, self._state
        entry = state.entry(m.collection)
        source = self._source(entry, m)
        # 1. announce
        self._enter(t, Stage.ANNOUNCE)
        await self._update(m.collection, m.shard,
                           moving=Moving(m.from_node, m.to_node, 0.0, self.node_id))
        # 2. copy
        self._enter(t, Stage.COPY)
        t.total = int((await self._replicas.of(source).stats(m.collection))
                      .get(m.shard, {}).get("count", 0))
        entry = state.entry(m.collection)
        await self._copy(t, stats, entry, source)
        # A write routed before the announce (to the source only) may have landed behind the
        # copy's cursor: compare digests and send what differs until source and target agree.
        await self._catch_up(entry, m.shard, source, m.to_node)
        # 3. switch
        self._enter(t, Stage.SWITCH)
        entry = state.entry(m.collection)
        reps = list(entry.replicas[m.shard])
        if m.from_node is not None and m.from_node in reps:
            reps[reps.index(m.from_node)] = m.to_node
        elif m.to_node not in reps:
            reps.append(m.to_node)
        await self._update(m.collection, m.shard, replicas=tuple(reps), moving=None)
        # 4. drop the old copy, now that every live node has the new map
        self._enter(t, Stage.DROP)
        if m.from_node is not None and self._view.is_alive(m.from_node):
            # Last stragglers routed with the old map reach the target before the copy goes.
            await self._catch_up(state.entry(m.collection), m.shard, m.from_node, m.to_node)
            await self._replicas.of(m.from_node).drop_shard(m.collection, m.shard)

    async def _copy(self, t: Transfer, stats: RunStats, entry: CollectionEntry,
                    source: str) -> None:
        """Stream the shard page by page from `source` to the move's target."""
        m, clock = t.move, self._clock
        src, dst = self._replicas.of(source), self._replicas.of(m.to_node)
        after: str | None = None
        started = clock.now()
        while True:
            docs, after = await src.stream(entry.spec, m.shard, after, PAGE)
            if docs:
                await dst.write(entry.spec, entry.uid, {m.shard: docs})
                size = sum(len(d.metadata) + (d.vector.nbytes if d.vector is not None else 0)
                           for d in docs)
                t.copied += len(docs)
                stats.documents += len(docs)
                stats.bytes += size
                self.stats.documents += len(docs)
                self.stats.bytes += size
            if self.docs_per_s > 0:
                ahead = t.copied / self.docs_per_s - (clock.now() - started)
                if ahead > 0:
                    await clock.sleep(ahead)
            if after is None:
                return

    async def _catch_up(self, entry: CollectionEntry, shard: int, source: str, target: str,
                        rounds: int = 5) -> None:
        for _ in range(rounds):
            if await self._repair.sync_pair(entry, shard, source, target) == 0:
                return

    def _source(self, entry: CollectionEntry, m: Move) -> str:
        reps = list(entry.replicas[m.shard])
        if m.from_node in reps and self._view.is_alive(m.from_node):
            return m.from_node
        for node in self._view.ordered(reps):
            if node != m.to_node and self._view.is_alive(node):
                return node
        raise Unavailable(f"shard {m.shard} of {m.collection!r} has no live replica to copy from")

    async def _update(self, name: str, shard: int, **changes: Any) -> None:
        """A new version of one shard's map entry, adopted here and pushed to every node."""
        entry = self._state.entry(name)
        replicas = changes.pop("replicas", entry.replicas[shard])
        moving = list(entry.moving) + [None] * (len(entry.replicas) - len(entry.moving))
        if "moving" in changes:
            moving[shard] = changes.pop("moving")
        reps = list(entry.replicas)
        reps[shard] = tuple(replicas)
        new = self._state.next_entry(
            entry, self.node_id, replicas=tuple(reps), moving=tuple(moving)
        )
        await self._publisher.publish(new, require_all=True)

    async def _clear_move(self, m: Move) -> None:
        try:
            entry = self._state.entry(m.collection)
            if entry.move_of(m.shard) is not None:
                await self._update(m.collection, m.shard, moving=None)
        except Exception as exc:
            log.warning("clearing the failed move of %s/%d: %s", m.collection, m.shard, exc,
                        exc_info=not expected(exc))

    async def clear_abandoned(self) -> int:
        """Clear moves nobody carries out any more: this node's own that it is not running
        (it restarted mid-move) and, on the leader, those of nodes that are gone. The target's
        partial copy is then an orphan, dropped like any other; a new rebalance redoes it."""
        cleared = 0
        if self.busy:
            return 0
        leader = self._view.is_leader()
        for name, entry in list(self._state.live().items()):
            for shard in range(len(entry.replicas)):
                mv = entry.move_of(shard)
                if mv is None:
                    continue
                mine = mv.driver == self.node_id and (name, shard) not in self.active
                gone = leader and not self._view.is_alive(mv.driver)
                if mine or gone:
                    log.warning("clearing the abandoned move of %s/%d (driver %s)", name, shard,
                                mv.driver or "unknown")
                    await self._update(name, shard, moving=None)
                    cleared += 1
        return cleared

    def progress_of(self, name: str, shard: int) -> float | None:
        t = self.active.get((name, shard))
        return t.progress if t is not None else None
