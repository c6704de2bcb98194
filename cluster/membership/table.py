"""The pure member table: SWIM states, incarnation precedence, refutation, suspicion records.

No I/O and no clock: every method takes `now`. Each update returns `Effects` (what to
gossip, which members changed, whether we refuted) and the gossip loop carries them out.
Precedence rules follow memberlist `state.go` (aliveNode / suspectNode / deadNode).
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aquila.cluster.membership.messages import Alive, Dead, MemberRow, Suspect
from aquila.cluster.membership.suspicion import Suspicion, suspicion_timeout
from aquila.cluster.model.bounds import MAX_INCARNATION


class State(enum.StrEnum):
    """Member states, as seen by one node."""

    ALIVE = "alive"
    """Answering probes (directly or through others) at its current incarnation."""
    SUSPECT = "suspect"
    """Missed a probe round; declared dead unless it refutes before its suspicion times out."""
    DEAD = "dead"
    """Failed: its suspicion timed out. Only an alive at a higher incarnation revives it."""
    LEFT = "left"
    """Left gracefully (a dead message from itself). Final unless it rejoins with a higher
    incarnation."""


@dataclass
class Member:
    id: str
    addr: str  # "host:port", the same number for gossip (UDP) and HTTP (TCP)
    state: State
    incarnation: int
    state_change_time: float  # clock time of the last state change, as seen locally
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dead_or_left(self) -> bool:
        return self.state in (State.DEAD, State.LEFT)


Update = Alive | Suspect | Dead


@dataclass
class Effects:
    broadcasts: list[Update] = field(default_factory=list)  # to piggyback, keyed by node
    changed: list[Member] = field(default_factory=list)  # snapshots for notify_change
    refuted: bool = False  # we contradicted a claim about ourselves (Lifeguard: health -1)

    def extend(self, other: Effects) -> None:
        self.broadcasts += other.broadcasts
        self.changed += other.changed
        self.refuted = self.refuted or other.refuted


@dataclass(frozen=True)
class TableParams:
    suspicion_mult: int
    suspicion_max_timeout_mult: int
    probe_interval: float
    dead_node_reclaim_time: float  # 0 = a dead node's id is never reclaimed at a new addr


class MemberTable:
    def __init__(
        self,
        local_id: str,
        local_addr: str,
        meta: dict[str, Any],
        now: float,
        params: TableParams,
    ) -> None:
        self.local_id = local_id
        self.params = params
        # Incarnation starts at 1 so that 0 can never beat a real announcement.
        self._members: dict[str, Member] = {
            local_id: Member(local_id, local_addr, State.ALIVE, 1, now, dict(meta))
        }
        self._suspicions: dict[str, Suspicion] = {}
        self.leaving = False
        # Members are never removed, so ids can be kept in a list for O(1) random picks, and
        # the live count kept up to date: the gossip loops ask for both many times a second,
        # and a scan of a thousand members each time dominated a 1,000-node simulation.
        self._ids: list[str] = [local_id]
        self._live = 1

    # --- reads ------------------------------------------------------------------------

    @property
    def local(self) -> Member:
        return dataclasses.replace(self._members[self.local_id])

    def get(self, node: str) -> Member | None:
        m = self._members.get(node)
        return dataclasses.replace(m) if m else None

    def members(self) -> list[Member]:
        return [dataclasses.replace(m) for m in self._members.values()]

    def num_live(self) -> int:
        """Members not dead or left (suspects count: they may still be fine)."""
        return self._live

    def ids(self) -> list[str]:
        """Every member's id, ourselves included, in the order they were first seen."""
        return list(self._ids)

    def sample(self, rng: random.Random, k: int, accept: Callable[[Member], bool]) -> list[Member]:
        """Up to `k` distinct other members for which `accept` holds, uniformly at random
        (copies, like `members`).

        Rejection sampling over the id list costs O(k) while most members qualify, instead
        of a scan of all of them; when few qualify it falls back to sampling the exact list.
        """
        ids, n = self._ids, len(self._ids)
        picked: list[Member] = []
        seen: set[int] = set()
        for _ in range(4 * k + 8):
            if len(picked) == k:
                break
            i = rng.randrange(n)
            if i in seen:
                continue
            seen.add(i)
            m = self._members[ids[i]]
            if m.id != self.local_id and accept(m):
                picked.append(m)
        if len(picked) < k:
            pool = [m for m in self._members.values() if m.id != self.local_id and accept(m)]
            picked = rng.sample(pool, min(k, len(pool)))
        return [dataclasses.replace(m) for m in picked]

    def local_alive(self) -> Alive:
        me = self._members[self.local_id]
        return Alive(me.incarnation, me.id, me.addr, dict(me.meta))

    def rows(self) -> list[MemberRow]:
        return [
            MemberRow(m.id, m.addr, m.state.value, m.incarnation, dict(m.meta))
            for m in self._members.values()
        ]

    def suspicion(self, node: str) -> Suspicion | None:
        return self._suspicions.get(node)

    def next_deadline(self) -> float | None:
        return min((s.deadline() for s in self._suspicions.values()), default=None)

    def _set_state(self, m: Member, state: State, now: float) -> None:
        was_out = m.dead_or_left
        m.state = state
        m.state_change_time = now
        self._live += int(was_out) - int(m.dead_or_left)

    # --- local node ---------------------------------------------------------------------

    def _refute(self, accused: int) -> Effects:
        """Beat the accusation's incarnation and announce ourselves alive."""
        me = self._members[self.local_id]
        # Never above what every peer decodes: a refutation beyond it would be dropped with
        # the packet carrying it. Accusations decode only below the ceiling, so each can be
        # beaten; an Alive about us at the ceiling (forged) is answered at the ceiling.
        me.incarnation = min(MAX_INCARNATION, max(me.incarnation + 1, accused + 1))
        return Effects(
            broadcasts=[self.local_alive()], changed=[dataclasses.replace(me)], refuted=True
        )

    def update_meta(self, meta: dict[str, Any]) -> Effects:
        """New metadata needs a new incarnation, or peers would ignore it as old news."""
        me = self._members[self.local_id]
        me.meta = dict(meta)
        me.incarnation += 1
        return Effects(broadcasts=[self.local_alive()], changed=[dataclasses.replace(me)])

    def leave(self, now: float) -> Effects:
        """Mark ourselves left and return the dead-from-self message to gossip."""
        self.leaving = True
        me = self._members[self.local_id]
        return self.apply_dead(Dead(me.incarnation, me.id, me.id), now)

    # --- updates ------------------------------------------------------------------------

    def apply_alive(self, a: Alive, now: float) -> Effects:
        m = self._members.get(a.node)
        if m is None:
            # A node we have never seen: a join.
            m = Member(a.node, a.addr, State.ALIVE, a.incarnation, now, dict(a.meta))
            self._members[a.node] = m
            self._ids.append(a.node)
            self._live += 1
            return Effects(broadcasts=[a], changed=[dataclasses.replace(m)])

        updates_addr = False
        if m.addr != a.addr:
            # Another address claims this id. Only a left node, or a dead one after the
            # reclaim time, may come back elsewhere; anything else is a conflict we ignore.
            reclaim = self.params.dead_node_reclaim_time
            can_reclaim = reclaim > 0 and now - m.state_change_time > reclaim
            if m.state == State.LEFT or (m.state == State.DEAD and can_reclaim):
                updates_addr = True
            else:
                return Effects()

        is_local = a.node == self.local_id
        # Old news about others is ignored; about us, only strictly older news is.
        if a.incarnation <= m.incarnation and not is_local and not updates_addr:
            return Effects()
        if a.incarnation < m.incarnation and is_local:
            return Effects()

        self._suspicions.pop(a.node, None)
        if is_local:
            if a.incarnation == m.incarnation and a.meta == m.meta and a.addr == m.addr:
                return Effects()  # our own announcement echoing back
            return self._refute(a.incarnation)

        m.incarnation = a.incarnation
        m.meta = dict(a.meta)
        m.addr = a.addr
        if m.state != State.ALIVE:
            self._set_state(m, State.ALIVE, now)
        return Effects(broadcasts=[a], changed=[dataclasses.replace(m)])

    def _stale(self, m: Member) -> Effects:
        """An accusation of an older incarnation of `m`. When `m` is us, its sender missed
        our refutation and will declare us dead when its timer runs out: announce ourselves
        again at the same incarnation (nothing to beat, so not a refutation). The alive rides
        our next packets, among them the ack to that node's probe (a node probes a member
        it hears is suspect next, see Gossip._notify), so it hears us in time."""
        if m.id == self.local_id and not self.leaving:
            return Effects(broadcasts=[self.local_alive()])
        return Effects()

    def apply_suspect(self, s: Suspect, now: float) -> Effects:
        m = self._members.get(s.node)
        if m is None:
            return Effects()
        if s.incarnation < m.incarnation:
            return self._stale(m)
        existing = self._suspicions.get(s.node)
        if existing is not None:
            # Already suspect: a new, independent accuser shortens the timeout (Lifeguard),
            # and is re-gossiped so the confirmation reaches the other nodes' timers too.
            if existing.confirm(s.from_):
                return Effects(broadcasts=[s])
            return Effects()
        if m.state != State.ALIVE:
            return Effects()
        if s.node == self.local_id:
            return self._refute(s.incarnation)  # never mark ourselves suspect

        m.incarnation = s.incarnation
        self._set_state(m, State.SUSPECT, now)
        # We have no phase relation with peers, so aim to hit the nominal timeout two probe
        # intervals short of the multiplier; with too few others to confirm, expect none.
        k = self.params.suspicion_mult - 2
        n = self.num_live()
        if n - 2 < k:
            k = 0
        lo = suspicion_timeout(self.params.suspicion_mult, n, self.params.probe_interval)
        hi = self.params.suspicion_max_timeout_mult * lo
        self._suspicions[s.node] = Suspicion(start=now, k=k, lo=lo, hi=hi, first_from=s.from_)
        return Effects(broadcasts=[s], changed=[dataclasses.replace(m)])

    def apply_dead(self, d: Dead, now: float) -> Effects:
        m = self._members.get(d.node)
        if m is None:
            return Effects()
        if d.incarnation < m.incarnation:
            return self._stale(m)
        self._suspicions.pop(d.node, None)
        if m.dead_or_left:
            return Effects()
        if d.node == self.local_id and not self.leaving:
            return self._refute(d.incarnation)
        m.incarnation = d.incarnation
        self._set_state(m, State.LEFT if d.node == d.from_ else State.DEAD, now)
        return Effects(broadcasts=[d], changed=[dataclasses.replace(m)])

    def apply(self, u: Update, now: float) -> Effects:
        if isinstance(u, Alive):
            return self.apply_alive(u, now)
        if isinstance(u, Suspect):
            return self.apply_suspect(u, now)
        return self.apply_dead(u, now)

    def expire(self, now: float) -> Effects:
        """Declare dead every suspect whose suspicion deadline has passed."""
        out = Effects()
        for node, s in list(self._suspicions.items()):
            if s.deadline() <= now:
                m = self._members[node]
                out.extend(self.apply_dead(Dead(m.incarnation, node, self.local_id), now))
        return out

    def merge_rows(self, rows: list[MemberRow] | tuple[MemberRow, ...], now: float) -> Effects:
        """Merge a push-pull full state (memberlist `mergeState`)."""
        out = Effects()
        for r in rows:
            if r.state == State.ALIVE:
                out.extend(self.apply_alive(Alive(r.incarnation, r.node, r.addr, r.meta), now))
            elif r.state == State.LEFT:
                out.extend(self.apply_dead(Dead(r.incarnation, r.node, r.node), now))
            elif r.state in (State.DEAD, State.SUSPECT):
                # A remote "dead" is only suspicion here: we give the node the chance to
                # refute rather than trusting one peer's possibly stale verdict.
                out.extend(self.apply_suspect(Suspect(r.incarnation, r.node, self.local_id), now))
        return out
