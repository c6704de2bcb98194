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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.antientropy import sync_pair
from cluster.errors import Unavailable
from cluster.membership import State
from cluster.rebalance_plan import Move, plan
from cluster.state import CollectionEntry
from cluster.state import Move as MapMove

if TYPE_CHECKING:
    from cluster.coordinator import Coordinator

log = logging.getLogger(__name__)

PAGE = 1000


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
class RunStats:
    transfers: list[Transfer] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0
    seconds: float = 0.0


def current_maps(coord: Coordinator) -> tuple[dict[str, list[list[str]]], dict[str, int]]:
    live = coord.runtime.state.live()
    maps = {n: [list(r) for r in e.replicas] for n, e in live.items()}
    return maps, {n: e.spec.replication for n, e in live.items()}


def plan_moves(coord: Coordinator, live_nodes: list[str]) -> list[Move]:
    maps, replication = current_maps(coord)
    return plan(maps, replication, live_nodes)


class Rebalancer:
    def __init__(self, coord: Coordinator, per_node: int = 2, docs_per_s: float = 0.0) -> None:
        self.coord = coord
        self.per_node = per_node
        # Copy throttle per move (0: as fast as the nodes go), so that serving keeps its share.
        self.docs_per_s = docs_per_s
        self.active: dict[tuple[str, int], Transfer] = {}
        self._lock = asyncio.Lock()
        self._slots: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(self.per_node)
        )

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def moves_in_map(self) -> list[str]:
        """Drivers of the moves the shard map shows under way (anywhere in the cluster)."""
        return sorted({mv.driver or "?" for e in self.coord.runtime.state.live().values()
                       for s in range(len(e.replicas)) if (mv := e.move_of(s)) is not None})

    async def run(self, moves: list[Move]) -> RunStats:
        """Carry out every move; returns when all are done or failed."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            stats = RunStats([Transfer(m) for m in moves])
            for t in stats.transfers:
                self.active[(t.move.collection, t.move.shard)] = t
            try:
                await asyncio.gather(*(self._carry(t, stats) for t in stats.transfers))
            finally:
                for t in stats.transfers:
                    self.active.pop((t.move.collection, t.move.shard), None)
            stats.seconds = loop.time() - t0
            return stats

    async def _carry(self, t: Transfer, stats: RunStats) -> None:
        m = t.move
        nodes = sorted({m.to_node, *([m.from_node] if m.from_node else [])})
        for n in nodes:
            await self._slots[n].acquire()
        try:
            await self._stages(t, stats)
            t.stage = Stage.DONE
            log.info("moved %s/%d %s→%s: %d documents", m.collection, m.shard, m.from_node,
                     m.to_node, t.copied)
        except Exception as exc:
            t.stage, t.error = Stage.FAILED, str(exc)
            log.warning("move %s/%d %s→%s failed: %s", m.collection, m.shard, m.from_node,
                        m.to_node, exc)
            await self._clear_move(m)
        finally:
            for n in nodes:
                self._slots[n].release()

    async def _stages(self, t: Transfer, stats: RunStats) -> None:
        m, coord = t.move, self.coord
        entry = coord.entry(m.collection)
        source = self._source(entry, m)
        # 1. announce
        t.stage = Stage.ANNOUNCE
        await self._update(m.collection, m.shard,
                           moving=MapMove(m.from_node, m.to_node, 0.0, coord.node_id))
        # 2. copy
        t.stage = Stage.COPY
        t.total = await self._count(entry, m.shard, source)
        after: str | None = None
        entry = coord.entry(m.collection)
        started = coord.clock.now()
        while True:
            docs, after, nbytes = await self._page(entry, m.shard, source, after)
            if docs:
                await coord.write_to_node(m.to_node, entry, {m.shard: docs})
                t.copied += len(docs)
                stats.documents += len(docs)
                stats.bytes += nbytes
            if self.docs_per_s > 0:
                ahead = t.copied / self.docs_per_s - (coord.clock.now() - started)
                if ahead > 0:
                    await coord.clock.sleep(ahead)
            if after is None:
                break
        # A write routed before the announce (to the source only) may have landed behind the
        # copy's cursor: compare digests and send what differs until source and target agree.
        await self._catch_up(entry, m.shard, source, m.to_node)
        # 3. switch
        t.stage = Stage.SWITCH
        entry = coord.entry(m.collection)
        reps = list(entry.replicas[m.shard])
        if m.from_node is not None and m.from_node in reps:
            reps[reps.index(m.from_node)] = m.to_node
        elif m.to_node not in reps:
            reps.append(m.to_node)
        await self._update(m.collection, m.shard, replicas=tuple(reps), moving=None)
        # 4. drop the old copy, now that every live node has the new map
        t.stage = Stage.DROP
        if m.from_node is not None and self._alive(m.from_node):
            # Last stragglers routed with the old map reach the target before the copy goes.
            await self._catch_up(coord.entry(m.collection), m.shard, m.from_node, m.to_node)
            await coord.drop_shard(m.from_node, m.collection, m.shard)

    async def _catch_up(self, entry: CollectionEntry, shard: int, source: str, target: str,
                        rounds: int = 5) -> None:
        for _ in range(rounds):
            if await sync_pair(self.coord, entry, shard, source, target) == 0:
                return

    def _alive(self, node: str) -> bool:
        if node == self.coord.node_id:
            return True
        mem = {x.id: x for x in self.coord.view.members()}.get(node)
        return mem is not None and mem.state == State.ALIVE

    def _source(self, entry: CollectionEntry, m: Move) -> str:
        reps = list(entry.replicas[m.shard])
        if m.from_node in reps and self._alive(m.from_node):
            return m.from_node
        for node in self.coord.ordered_replicas(reps):
            if node != m.to_node and self._alive(node):
                return node
        raise Unavailable(f"shard {m.shard} of {m.collection!r} has no live replica to copy from")

    async def _count(self, entry: CollectionEntry, shard: int, source: str) -> int:
        stats = await self.coord.node_stats(source, entry.spec.name)
        return int(stats.get(shard, {}).get("count", 0))

    async def _page(
        self, entry: CollectionEntry, shard: int, source: str, after: str | None
    ) -> tuple[list[Any], str | None, int]:
        docs, nxt = await self.coord.replicas.of(source).stream(entry.spec, shard, after, PAGE)
        nbytes = sum(len(d.metadata) + (d.vector.nbytes if d.vector is not None else 0)
                     for d in docs)
        return docs, nxt, nbytes

    async def _update(self, name: str, shard: int, **changes: Any) -> None:
        """A new version of one shard's map entry, adopted here and pushed to every node."""
        coord = self.coord
        entry = coord.entry(name)
        replicas = changes.pop("replicas", entry.replicas[shard])
        moving = list(entry.moving) + [None] * (len(entry.replicas) - len(entry.moving))
        if "moving" in changes:
            moving[shard] = changes.pop("moving")
        reps = list(entry.replicas)
        reps[shard] = tuple(replicas)
        new = coord.runtime.state.next_entry(
            entry, coord.node_id, replicas=tuple(reps), moving=tuple(moving)
        )
        coord.runtime.publish(new)
        await coord.push_entry(new, require_all=True)

    async def _clear_move(self, m: Move) -> None:
        try:
            entry = self.coord.entry(m.collection)
            if entry.move_of(m.shard) is not None:
                await self._update(m.collection, m.shard, moving=None)
        except Exception:
            log.exception("clearing the failed move of %s/%d", m.collection, m.shard)

    async def clear_abandoned(self, alive: set[str], leader: bool) -> int:
        """Clear moves nobody carries out any more: this node's own that it is not running
        (it restarted mid-move) and, on the leader, those of nodes that are gone. The target's
        partial copy is then an orphan, dropped like any other; a new rebalance redoes it."""
        cleared = 0
        if self.busy:
            return 0
        for name, entry in list(self.coord.runtime.state.live().items()):
            for shard in range(len(entry.replicas)):
                mv = entry.move_of(shard)
                if mv is None:
                    continue
                mine = mv.driver == self.coord.node_id and (name, shard) not in self.active
                gone = leader and mv.driver not in alive
                if mine or gone:
                    log.warning("clearing the abandoned move of %s/%d (driver %s)", name, shard,
                                mv.driver or "unknown")
                    await self._update(name, shard, moving=None)
                    cleared += 1
        return cleared

    def progress_of(self, name: str, shard: int) -> float | None:
        t = self.active.get((name, shard))
        return t.progress if t is not None else None
