"""The cluster side of one node: the replicated cluster state, its dissemination over gossip
(piggybacked broadcasts, push-pull) and direct pushes, its persistence, and reconciling the
node's local shards with it."""

from __future__ import annotations

import asyncio
import contextlib
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
from aquila.cluster.state.statesync import (
    REPLY,
    REQUEST,
    Sync,
    decode_sync,
    encode_sync,
    newer_than,
)

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
    """The gossip `Delegate`: carries cluster-state entries on gossip traffic, and the state
    part of push-pull incrementally (`statesync`)."""

    # A change made here rides along this many of our push-pull requests (to random peers).
    RECENT_PUSHES = 3

    def __init__(self, runtime: StateReplica) -> None:
        self._rt = runtime
        self._queue: list[list[Any]] = []  # [encoded entry, transmits left]
        self._recent: dict[str, int] = {}  # name → push-pull requests left to carry it
        # The push-pull being answered. Gossip merges a peer's request and asks for our state
        # within one synchronous call (Gossip.handle_push_pull), so what merge_remote_state
        # saw tells local_state what to answer; it is forgotten at the next loop turn, so a
        # previous-version reply (a bare list, like a request) never shapes a later request.
        self._answering: Sync | list[CollectionEntry] | None = None

    def enqueue(self, raw: bytes, members: int) -> None:
        limit = 4 * max(1, math.ceil(math.log10(members + 1)))
        # Exactly its length: orjson's result keeps a ~4 KiB buffer (see json_bytes).
        self._queue.append([bytes(memoryview(raw)), limit])

    def spread(self, entry: CollectionEntry) -> None:
        """Start spreading a change made here: by gossip when it fits in a packet, and with
        our next push-pull requests."""
        raw = orjson.dumps([entry.to_json()])
        if len(raw) < 1200:  # larger entries travel by push-pull and direct pushes
            self.enqueue(raw, self._rt.members_count())
        self._recent[entry.spec.name] = self.RECENT_PUSHES

    def local_state(self) -> bytes:
        asked, self._answering = self._answering, None
        state = self._rt.state
        if isinstance(asked, list):
            return state.encode()  # a previous-version peer expects the whole state
        if asked is not None:
            return encode_sync(REPLY, state, newer_than(state, asked.digest))
        return encode_sync(REQUEST, state, self._take_recent())

    def _take_recent(self) -> list[CollectionEntry]:
        out = []
        for name, left in list(self._recent.items()):
            if left <= 1:
                del self._recent[name]
            else:
                self._recent[name] = left - 1
            entry = self._rt.state.collections.get(name)
            if entry is not None:
                out.append(entry)
        return out

    def merge_remote_state(self, data: bytes) -> None:
        # A peer of another version (or a bug) must not break the gossip loop that calls us.
        try:
            msg = decode_sync(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a push-pull cluster state that does not decode: %s", exc)
            return
        self._rt.merge(msg if isinstance(msg, list) else msg.entries)
        if isinstance(msg, Sync) and msg.kind == REPLY:
            # What the replier lacks goes along with our next requests.
            for entry in newer_than(self._rt.state, msg.digest):
                self._recent[entry.spec.name] = self.RECENT_PUSHES
            return
        self._answering = msg
        with contextlib.suppress(RuntimeError):  # no loop: nothing can interleave anyway
            asyncio.get_running_loop().call_soon(self._forget_request)

    def _forget_request(self) -> None:
        self._answering = None

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
        # A peer of another version (or a bug) must not break the gossip loop that calls us.
        try:
            entries = ClusterState.decode_entries(data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignored a cluster-state message that does not decode: %s", exc)
            return
        # Passed on like any rumour: what was news here is news to others, so a change
        # spreads to everyone in O(log n) gossip rounds even where its direct push failed.
        for entry in self._rt.merge(entries):
            raw = orjson.dumps([entry.to_json()])
            if len(raw) < 1200:
                self.enqueue(raw, self._rt.members_count())

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
        self.delegate.spread(entry)

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
