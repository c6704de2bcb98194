"""The cluster side of one node: the replicated cluster state, its dissemination over gossip
(piggybacked broadcasts, push-pull) and direct pushes, its persistence, and reconciling the
node's local shards with it."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import orjson

from aquila.cluster.clock import Clock
from aquila.cluster.membership.table import Member
from aquila.cluster.model.errors import Unavailable, expected
from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.state.entries import ClusterState, CollectionEntry

log = logging.getLogger(__name__)

Persist = Callable[[bytes], Awaitable[None]]


class LocalShards(Protocol):
    """What reconciling needs of this node's storage (a narrow `ShardBackend`)."""

    def has(self, name: str) -> bool: ...

    async def ensure(self, spec: CollectionSpec, shards: Iterable[int], uid: str) -> None: ...

    async def drop_collection(self, name: str) -> None: ...

# After a failed reconciliation, try again this much later.
RETRY_S = 1.0


class StateDelegate:
    """The gossip `Delegate`: carries cluster-state entries on gossip traffic."""

    def __init__(self, runtime: StateReplica) -> None:
        self._rt = runtime
        self._queue: list[list[Any]] = []  # [encoded entry, transmits left]

    def enqueue(self, raw: bytes, members: int) -> None:
        limit = 4 * max(1, math.ceil(math.log10(members + 1)))
        self._queue.append([raw, limit])

    def local_state(self) -> bytes:
        return self._rt.state.encode()

    def merge_remote_state(self, data: bytes) -> None:
        self._merge(data)

    def get_broadcasts(self, limit_bytes: int) -> list[bytes]:
        out: list[bytes] = []
        used = 0
        for item in self._queue:
            raw: bytes = item[0]
            if used + len(raw) + 8 > limit_bytes:
                continue
            out.append(raw)
            used += len(raw) + 8
            item[1] -= 1
        self._queue = [i for i in self._queue if i[1] > 0]
        return out

    def notify_msg(self, data: bytes) -> None:
        self._merge(data)

    def _merge(self, data: bytes) -> None:
        # A peer of another version (or a bug) must not break the gossip loop that calls us.
        try:
            entries = ClusterState.decode_entries(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a cluster-state message that does not decode: %s", exc)
            return
        self._rt.merge(entries)

    def notify_change(self, member: Member) -> None:
        self._rt.member_changed(member)


class StateReplica:
    """This node's copy of the cluster state and its spreading over gossip, without storage:
    what the scale simulator (`cluster/sim/`) runs a thousand of in one process."""

    def __init__(self, node_id: str, initial: ClusterState | None = None) -> None:
        self.node_id = node_id
        self.state = initial or ClusterState()
        self.delegate = StateDelegate(self)
        self.member_listeners: list[Callable[[Member], None]] = []
        self.members_count: Callable[[], int] = lambda: 1

    def merge(self, entries: list[CollectionEntry]) -> list[CollectionEntry]:
        changed = self.state.merge(entries)
        if changed:
            self._changed()
        return changed

    def _changed(self) -> None:
        """Called after a merge changed the state."""

    def publish(self, entry: CollectionEntry) -> None:
        """Adopt a change made here and start spreading it by gossip."""
        self.merge([entry])
        raw = orjson.dumps([entry.to_json()])
        if len(raw) < 1200:  # larger entries travel by push-pull and direct pushes
            self.delegate.enqueue(raw, self.members_count())

    def member_changed(self, member: Member) -> None:
        for fn in self.member_listeners:
            fn(member)


class ClusterRuntime(StateReplica):
    """The replicated state of a real node: persisted, and its local shards reconciled with it."""

    def __init__(
        self,
        node_id: str,
        backend: LocalShards,
        persist: Persist,
        clock: Clock,
        initial: ClusterState | None = None,
    ) -> None:
        super().__init__(node_id, initial)
        self.backend = backend
        self.clock = clock
        self._persist = persist
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reconciled = asyncio.Event()

    async def start(self) -> None:
        self._dirty.set()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _changed(self) -> None:
        self._reconciled.clear()
        self._dirty.set()

    async def wait_reconciled(self, timeout: float) -> None:  # noqa: ASYNC109
        """Until local shards match the map (Unavailable if that takes over `timeout`)."""
        try:
            await self.clock.wait_for(self._reconciled.wait(), timeout)
        except TimeoutError:
            raise Unavailable(
                f"this node has not applied the cluster state within {timeout:.0f} s"
            ) from None

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._persist(self.state.encode())
                await self.reconcile()
                if not self._dirty.is_set():
                    self._reconciled.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reconciling local shards with the cluster state failed: %s", exc,
                            exc_info=not expected(exc))
                await self.clock.sleep(RETRY_S)
                self._dirty.set()

    async def reconcile(self) -> None:
        """Open the shards the map gives this node; drop collections deleted in the map."""
        for name, entry in list(self.state.collections.items()):
            if entry.deleted:
                if self.backend.has(name):
                    await self.backend.drop_collection(name)
                continue
            mine = entry.shards_of(self.node_id)
            if mine:
                await self.backend.ensure(entry.spec, mine, entry.uid)
