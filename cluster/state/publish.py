"""Changes to the cluster state made by this node: adopted here, spread by gossip, and pushed
straight to every live member, so that they are there before the client's next request
reaches any of them (gossip and push-pull repair whatever a push misses)."""

from __future__ import annotations

import asyncio

from aquila.cluster.clock import Clock
from aquila.cluster.membership.table import State
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.errors import Unavailable
from aquila.cluster.peers.client import STATE_PATH, PeerClient
from aquila.cluster.state.entries import CollectionEntry
from aquila.cluster.state.runtime import ClusterRuntime

PUSH_TIMEOUT_S = 5.0


class Publisher:
    def __init__(self, runtime: ClusterRuntime, view: MemberView, peers: PeerClient,
                 clock: Clock) -> None:
        self._runtime = runtime
        self._view = view
        self._peers = peers
        self._clock = clock

    async def publish(self, entry: CollectionEntry, *, require_all: bool = False) -> None:
        """Adopt `entry` and push it to every member alive or suspect. With `require_all`,
        retry until every alive member has acknowledged it, or raise Unavailable."""
        self._runtime.publish(entry)
        body = [entry.to_json()]  # as ClusterState.decode_entries reads it
        failed: list[str] = []
        for attempt in range(5 if require_all else 1):
            targets = self._view.peers_to_tell()
            results = await asyncio.gather(
                *(self._peers.request(m.addr, "POST", STATE_PATH, body, to=m.id,
                                      timeout=PUSH_TIMEOUT_S) for m in targets),
                return_exceptions=True,
            )
            failed = [m.id for m, r in zip(targets, results, strict=True)
                      if isinstance(r, BaseException) and m.state == State.ALIVE]
            if not failed or not require_all:
                return
            self._view.changed()  # a failed member may have been found dead meanwhile
            await self._clock.sleep(0.2 * (attempt + 1))
        raise Unavailable(f"node(s) {failed} did not acknowledge the new shard map")
