"""This node's view of the members: one cache of gossip's member table, and the one place
that says who is alive, which replicas of a shard are usable and in what order, and who leads.

The cache is dropped on every change gossip reports (`changed`, a member listener) and is at
most `max_age_s` old otherwise: the hot paths look members up per shard, and a replica found
dead a moment late costs only a retry on the next one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from aquila.cluster.clock import Clock
from aquila.cluster.membership.table import Member, State

_RANK = {State.ALIVE: 1, State.SUSPECT: 2}


class MemberSource(Protocol):
    """Where members come from (`Gossip`)."""

    def members(self) -> list[Member]: ...


class MemberView:
    def __init__(self, node_id: str, source: MemberSource, clock: Clock,
                 max_age_s: float = 0.05) -> None:
        self.node_id = node_id
        self._source = source
        self._clock = clock
        self._max_age_s = max_age_s
        self._table: dict[str, Member] = {}
        self._at = float("-inf")
        # Bumped on every refresh: callers memoise per (their input, generation).
        self.generation = 0

    def changed(self, member: Member | None = None) -> None:
        """A member changed: the next look is fresh."""
        self._at = float("-inf")

    def table(self) -> dict[str, Member]:
        now = self._clock.now()
        if now - self._at > self._max_age_s:
            self._table = {m.id: m for m in self._source.members()}
            self._at = now
            self.generation += 1
        return self._table

    def addr_of(self, node: str) -> str | None:
        m = self.table().get(node)
        if m is None:  # perhaps newer than the cache: look again
            self.changed()
            m = self.table().get(node)
        return m.addr if m is not None else None

    def alive(self) -> list[str]:
        """The alive members, by id (this node among them, as gossip sees it)."""
        return sorted(n for n, m in self.table().items() if m.state == State.ALIVE)

    def is_alive(self, node: str) -> bool:
        """This node always is; another when gossip says so."""
        if node == self.node_id:
            return True
        m = self.table().get(node)
        return m is not None and m.state == State.ALIVE

    def peers_to_tell(self) -> list[Member]:
        """The other members a state change is pushed to: alive or suspect."""
        return [m for m in self.table().values()
                if m.id != self.node_id and m.state in _RANK]

    def ordered(self, replicas: Iterable[str]) -> list[str]:
        """Usable replicas, best first: this node, then alive, then suspect; dead never."""
        members = self.table()
        usable = []
        for i, node in enumerate(replicas):
            if node == self.node_id:
                usable.append((0, i, node))
                continue
            m = members.get(node)
            if m is not None and m.state in _RANK:
                usable.append((_RANK[m.state], i, node))
        return [n for _, _, n in sorted(usable)]

    def leads(self, replicas: Iterable[str]) -> bool:
        """Is this node the first usable replica of a shard (the one that repairs it)?"""
        usable = self.ordered(replicas)
        return bool(usable) and usable[0] == self.node_id

    def leader(self) -> str | None:
        """The cluster's leader as this node sees it: the alive member with the smallest id."""
        alive = self.alive()
        return alive[0] if alive else None

    def is_leader(self) -> bool:
        return self.leader() == self.node_id

    def gone_for(self, seconds: float) -> set[str]:
        """Members dead or left for at least `seconds`."""
        now = self._clock.now()
        return {m.id for m in self.table().values()
                if m.state in (State.DEAD, State.LEFT)
                and now - m.state_change_time >= seconds}
