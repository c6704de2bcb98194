"""SWIM membership with Lifeguard, over an injected Transport, PushPullTransport and Clock.

Three loops, each paced by `clock.sleep`: probe (failure detection), gossip (piggybacked
updates to a few random peers), push-pull (periodic full-state sync). A fourth task fires
suspicion timeouts. Every decision about member state is made by the pure `MemberTable`;
this module only moves bytes and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aquila.cluster.clock import Clock
from aquila.cluster.membership.messages import (
    COMPOUND_OVERHEAD,
    MAX_META_SIZE,
    MAX_PACKET_SIZE,
    Ack,
    Alive,
    AuthError,
    BroadcastQueue,
    Compound,
    Dead,
    DecodeError,
    IndirectPing,
    Message,
    Nack,
    Ping,
    PushPull,
    Suspect,
    User,
    decode,
    decode_packet,
    encode,
    encode_compound,
)
from aquila.cluster.membership.packet_auth import PacketAuth, StalePacket
from aquila.cluster.membership.suspicion import Awareness, push_pull_scale, retransmit_limit
from aquila.cluster.membership.table import Effects, Member, MemberTable, State, TableParams
from aquila.cluster.membership.transport import Delegate, PushPullTransport, Transport
from aquila.cluster.model.errors import expected

__all__ = ["Delegate", "Gossip", "GossipConfig", "GossipError", "GossipStats", "JoinError"]

log = logging.getLogger(__name__)

# Indirect probes this node runs for others at once; more requests wait for none, they are
# dropped (the requester then counts a missing nack, as for a lost packet).
MAX_RELAYS = 64



@dataclass(frozen=True)
class GossipConfig:
    """Protocol timing, defaults from memberlist's DefaultLANConfig."""

    # How often each node probes one other member (the SWIM protocol period).
    probe_interval: float = 1.0
    # How long to wait for a direct ack before asking others to probe. Lifeguard does not
    # scale this: waiting longer rarely helps a UDP packet arrive.
    probe_timeout: float = 0.5
    # How many peers are asked to probe indirectly after a missed direct ack.
    indirect_checks: int = 3
    # Suspicion timeout = mult × max(1, log10 n) × probe_interval: the floor of Lifeguard's
    # shrinking timeout, reached once enough independent confirmations arrive.
    suspicion_mult: int = 4
    # The ceiling of the suspicion timeout, as a multiple of the floor: a lone accusation
    # waits this long, giving a slow or partitioned suspect time to refute.
    suspicion_max_timeout_mult: int = 6
    # Each update is piggybacked retransmit_mult × ceil(log10(n + 1)) times.
    retransmit_mult: int = 4
    # How often queued updates are gossiped to `gossip_nodes` random peers.
    gossip_interval: float = 0.2
    # Fan-out per gossip round.
    gossip_nodes: int = 3
    # Keep gossiping to dead/left nodes this long, so a wrongly declared node learns of its
    # death and refutes.
    gossip_to_the_dead_time: float = 30.0
    # Full state exchange with one random member (scaled up beyond 32 nodes); heals
    # anything gossip missed. 0 disables it.
    push_pull_interval: float = 30.0
    # Give up on one push-pull (or join) exchange after this long (memberlist TCPTimeout).
    push_pull_timeout: float = 10.0
    # Lifeguard: our probe interval and timeouts are multiplied by up to this much while we
    # seem to be the unhealthy one (missing nacks, having to refute).
    awareness_max_multiplier: int = 8
    # A dead node's id may be claimed from another address after this long; 0 = never (a
    # left node may always rejoin elsewhere).
    dead_node_reclaim_time: float = 0.0
    # Largest UDP packet we send, MAC included: under a typical MTU to avoid fragmentation.
    max_packet_size: int = MAX_PACKET_SIZE


# Suspects queued for an early probe, at most (see Gossip._probe_suspect).
_SUSPECTS_QUEUED = 8


def _is_alive(m: Member) -> bool:
    return m.state == State.ALIVE


class GossipError(Exception):
    pass


class JoinError(GossipError):
    """No seed answered the join push-pull."""


@dataclass
class GossipStats:
    packets_sent: int = 0
    packets_received: int = 0
    bad_mac: int = 0  # dropped: missing or wrong MAC (wrong cluster secret, forgery)
    stale: int = 0  # dropped: authentic but stale, from the future, replayed, or our own
    malformed: int = 0  # dropped: not a message we can decode
    oversized: int = 0  # dropped unread: larger than any packet a member sends
    unknown_target: int = 0  # indirect probes of an address that is no member's
    probes: int = 0
    probe_failures: int = 0
    refutes: int = 0
    push_pulls: int = 0
    push_pull_failures: int = 0


@dataclass
class _Pending:
    """An outstanding probe: resolved by an ack (direct or relayed); nacks counted."""

    ack: asyncio.Future[None]
    nacks: int = 0


@dataclass
class _Tasks:
    loops: list[asyncio.Task[None]] = field(default_factory=list)
    spawned: set[asyncio.Task[None]] = field(default_factory=set)


class Gossip:
    def __init__(
        self,
        node_id: str,
        addr: str,
        transport: Transport,
        push_pull: PushPullTransport,
        clock: Clock,
        rng: random.Random | None = None,
        config: GossipConfig | None = None,
        delegate: Delegate | None = None,
        secret: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.id = node_id
        self.addr = addr
        self.config = config or GossipConfig()
        self._transport = transport
        self._push_pull = push_pull
        self._clock = clock
        self._rng = rng or random.Random()
        self._delegate = delegate
        self._auth = PacketAuth(secret, node_id, clock)
        self.stats = GossipStats()
        cfg = self.config
        # Pure state, no I/O: safe to build here.
        self._table = MemberTable(
            node_id,
            addr,
            meta or {},
            clock.now(),
            TableParams(
                cfg.suspicion_mult,
                cfg.suspicion_max_timeout_mult,
                cfg.probe_interval,
                cfg.dead_node_reclaim_time,
            ),
        )
        self._awareness = Awareness(cfg.awareness_max_multiplier)
        self._queue = BroadcastQueue(
            lambda: retransmit_limit(cfg.retransmit_mult, self._table.num_live())
        )
        self._pending: dict[int, _Pending] = {}
        self._relays = 0  # indirect probes under way for others
        self._seq = 0
        self._probe_order: list[str] = []
        self._probe_set: set[str] = set()  # the ids in _probe_order, for O(1) membership
        self._probe_index = 0
        # Suspects to probe before the round robin (see _notify), every other period at most.
        self._suspects: list[str] = []
        self._probed_suspect = False
        self._wake: asyncio.Future[None] | None = None
        self._tasks = _Tasks()
        # Each member's state when last logged: a change of state is one info line.
        self._logged: dict[str, State] = {node_id: State.ALIVE}
        self._running = False
        self._stopped = False

    # --- public API ---------------------------------------------------------------------

    async def start(self) -> None:
        await self._transport.start(self._on_packet)
        self._running = True
        self._broadcast(self._table.local_alive())
        loops = [self._probe_loop(), self._gossip_loop(), self._suspicion_loop()]
        if self.config.push_pull_interval > 0:
            loops.append(self._push_pull_loop())
        self._tasks.loops = [asyncio.create_task(c) for c in loops]

    async def stop(self) -> None:
        self._running = False
        self._stopped = True
        tasks = self._tasks.loops + list(self._tasks.spawned)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = _Tasks()
        await self._transport.close()

    async def join(self, seeds: list[str]) -> int:
        """Full-state sync with each seed; returns how many answered."""
        targets = [s for s in seeds if s != self.addr]
        if not targets:
            return 0
        results = await asyncio.gather(
            *(self._push_pull_with(s, join=True) for s in targets), return_exceptions=True
        )
        errors = [
            f"{s}: {r!r}"
            for s, r in zip(targets, results, strict=True)
            if isinstance(r, BaseException)
        ]
        ok = len(targets) - len(errors)
        if ok == 0:
            raise JoinError("no seed answered: " + "; ".join(errors))
        return ok

    async def leave(self, timeout: float) -> None:  # noqa: ASYNC109 - clock time, see _wait
        """Gossip a dead-from-self (state `left`) and wait until it has been sent out."""
        effects = self._table.leave(self._clock.now())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        for b in effects.broadcasts:
            self._queue.queue(b.node, encode(b), finished)
        self._notify(effects)
        others = [m for m in self._table.members() if m.id != self.id and not m.dead_or_left]
        if others:
            await self._wait(done, timeout)

    def members(self) -> list[Member]:
        return self._table.members()

    def member(self, node_id: str) -> Member | None:
        return self._table.get(node_id)

    def local_member(self) -> Member:
        return self._table.local

    def num_alive(self) -> int:
        """Members not dead or left, ourselves included (suspects count, as in memberlist)."""
        return self._table.num_live()

    @property
    def health_score(self) -> int:
        """Lifeguard awareness score: 0 is healthy."""
        return self._awareness.score

    def update_meta(self, meta: dict[str, Any]) -> None:
        """Replace our metadata; gossiped with a new incarnation."""
        if len(encode(Alive(0, self.id, self.addr, meta))) > MAX_META_SIZE:
            raise ValueError(f"metadata larger than {MAX_META_SIZE} bytes once encoded")
        self._carry(self._table.update_meta(meta))

    def inject(self, update: Alive | Suspect | Dead) -> None:
        """Apply an update as if it arrived from the network (tests, admin tooling)."""
        self._carry(self._table.apply(update, self._clock.now()))

    def handle_push_pull(self, payload: bytes) -> bytes:
        """Serve a peer's push-pull: merge its state, return ours.

        Raises messages.AuthError (wrong secret, stale or replayed) or DecodeError, which
        the HTTP handler maps to 401 / 400, and GossipError once stopped (503).
        """
        if self._stopped:
            raise GossipError("gossip is stopped")
        msg = decode(self._open(payload))
        if not isinstance(msg, PushPull):
            raise DecodeError("expected a push-pull message")
        self._merge(msg)
        return self._local_push_pull(join=False)

    # --- push-pull ----------------------------------------------------------------------

    def _local_push_pull(self, join: bool) -> bytes:
        user = self._delegate.local_state() if self._delegate else b""
        return self._auth.seal(encode(PushPull(join, tuple(self._table.rows()), user)))

    def _merge(self, msg: PushPull) -> None:
        self._carry(self._table.merge_rows(msg.members, self._clock.now()))
        if self._delegate is not None and msg.user_state:
            self._delegate.merge_remote_state(msg.user_state)

    async def _push_pull_with(self, addr: str, join: bool) -> None:
        self.stats.push_pulls += 1
        try:
            reply = await self._push_pull.exchange(
                addr, self._local_push_pull(join), self.config.push_pull_timeout
            )
            msg = decode(self._open(reply))
            if not isinstance(msg, PushPull):
                raise DecodeError("expected a push-pull reply")
        except Exception:
            self.stats.push_pull_failures += 1
            raise
        self._merge(msg)

    async def _push_pull_loop(self) -> None:
        while True:
            n = self._table.num_live()
            await self._clock.sleep(push_pull_scale(self.config.push_pull_interval, n))
            picked = self._table.sample(self._rng, 1, _is_alive)
            if not picked:
                continue
            peer = picked[0]
            try:
                await self._push_pull_with(peer.addr, join=False)
            except Exception as exc:  # a failed sync is retried next period
                log.debug("push-pull with %s failed: %r", peer.id, exc)

    # --- probing (SWIM failure detection) -------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            start = self._clock.now()
            await self._probe_once()
            # Lifeguard: an unhealthy node probes less often, so its own slowness causes
            # fewer false suspicions of others.
            period = self._awareness.scale(self.config.probe_interval)
            await self._clock.sleep(max(0.0, start + period - self._clock.now()))

    def _next_probe_target(self) -> Member | None:
        """Round robin over a shuffled member list, reshuffled each round (memberlist);
        every other period, a member we hear is suspect first (see _notify)."""
        if not self._probed_suspect:
            while self._suspects:
                m = self._table.get(self._suspects.pop(0))
                if m is not None and m.state == State.SUSPECT:
                    self._probed_suspect = True
                    return m
        self._probed_suspect = False
        for _ in range(len(self._probe_order) + 1):
            if self._probe_index >= len(self._probe_order):
                self._probe_order = [i for i in self._table.ids() if i != self.id]
                self._probe_set = set(self._probe_order)
                self._rng.shuffle(self._probe_order)
                self._probe_index = 0
                if not self._probe_order:
                    return None
            node = self._probe_order[self._probe_index]
            self._probe_index += 1
            m = self._table.get(node)
            if m is not None and not m.dead_or_left:
                return m
        return None

    async def _probe_once(self) -> None:
        target = self._next_probe_target()
        if target is None:
            return
        cfg = self.config
        self.stats.probes += 1
        seq = self._next_seq()
        pending = _Pending(asyncio.get_running_loop().create_future())
        self._pending[seq] = pending
        try:
            sent = self._clock.now()
            interval = self._awareness.scale(cfg.probe_interval)
            msgs: list[Message] = [Ping(seq, target.id, self.id, self.addr)]
            if target.state == State.SUSPECT:
                # Tell a suspect it is suspected so it can refute right away.
                msgs.append(Suspect(target.incarnation, target.id, self.id))
            await self._send(target.addr, msgs)
            if await self._wait(pending.ack, cfg.probe_timeout):
                self._awareness.apply_delta(-1)
                self._probe_again_if_suspect(target.id)
                return

            # No direct ack: maybe the path is bad, not the node. Ask k others to try.
            helpers = self._table.sample(
                self._rng,
                cfg.indirect_checks,
                lambda m: m.state == State.ALIVE and m.id != target.id,
            )
            req = IndirectPing(seq, target.id, target.addr, True, self.id, self.addr)
            for h in helpers:
                await self._send(h.addr, [req])
            if await self._wait(pending.ack, sent + interval - self._clock.now()):
                self._probe_again_if_suspect(target.id)
                return

            # Lifeguard: helpers that should have nacked but did not suggest the fault is
            # ours (we are dropping packets), so count each missing nack against our health.
            # Without helpers a failed probe is the only signal we have.
            if helpers:
                self._awareness.apply_delta(max(0, len(helpers) - pending.nacks))
            else:
                self._awareness.apply_delta(1)
            self.stats.probe_failures += 1
            # Use the incarnation from probe start: a refutation that arrived meanwhile
            # carries a higher one and so beats this accusation.
            self._carry(
                self._table.apply_suspect(
                    Suspect(target.incarnation, target.id, self.id), self._clock.now()
                )
            )
        finally:
            del self._pending[seq]

    def _probe_again_if_suspect(self, node: str) -> None:
        """It answered, yet we still suspect it: its refutation has not reached us, or it had
        not heard of the suspicion. Our ping told it (see MemberTable._stale); probe it again
        next period, and that ack carries its alive."""
        m = self._table.get(node)
        if m is not None and m.state == State.SUSPECT:
            self._probe_suspect(node)

    def _probe_suspect(self, node: str) -> None:
        """Queue a suspect to be probed soon. Bounded: a queue full of members still suspect
        drops the newcomer (under a storm of suspicions the round robin must go on)."""
        if node in self._suspects:
            return
        if len(self._suspects) >= _SUSPECTS_QUEUED:
            self._suspects = [
                x for x in self._suspects
                if (m := self._table.get(x)) is not None and m.state == State.SUSPECT
            ]
        if len(self._suspects) < _SUSPECTS_QUEUED:
            self._suspects.append(node)

    async def _relay_probe(self, req: IndirectPing, reply_to: str) -> None:
        """Probe `req.target` for the node at `reply_to` (where the request came from, not
        an address written in it); relay the ack, or nack."""
        seq = self._next_seq()
        pending = _Pending(asyncio.get_running_loop().create_future())
        self._pending[seq] = pending
        try:
            await self._send(req.target_addr, [Ping(seq, req.target, self.id, self.addr)])
            if await self._wait(pending.ack, self.config.probe_timeout):
                await self._send(reply_to, [Ack(req.seq)])
            elif req.nack:
                await self._send(reply_to, [Nack(req.seq)])
        finally:
            self._relays -= 1
            del self._pending[seq]

    def _is_member_at(self, node: str, addr: str) -> bool:
        """Is `addr` the address of member `node` (other than us) as our table knows it?"""
        m = self._table.get(node)
        return m is not None and node != self.id and m.addr == addr

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # --- suspicion timers -----------------------------------------------------------------

    async def _suspicion_loop(self) -> None:
        """One task for all suspicions: sleep until the earliest deadline or a change."""
        loop = asyncio.get_running_loop()
        while True:
            self._wake = loop.create_future()
            deadline = self._table.next_deadline()
            if deadline is None:
                await self._wake
            else:
                await self._wait(self._wake, deadline - self._clock.now())
            self._carry(self._table.expire(self._clock.now()))

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # --- dissemination --------------------------------------------------------------------

    async def _gossip_loop(self) -> None:
        while True:
            await self._clock.sleep(self.config.gossip_interval)
            await self._gossip_once()

    async def _gossip_once(self) -> None:
        if not self._queue and self._delegate is None:
            return  # nothing to piggyback, so no packet would be sent
        now = self._clock.now()
        dead_time = self.config.gossip_to_the_dead_time
        # Also gossip to the recently dead, so a node wrongly declared dead hears it and
        # refutes (memberlist GossipToTheDeadTime).
        picked = self._table.sample(
            self._rng,
            self.config.gossip_nodes,
            lambda m: not m.dead_or_left or now - m.state_change_time < dead_time,
        )
        for m in picked:
            await self._send(m.addr, [], require_payload=True)

    def _broadcast(self, update: Alive | Suspect | Dead) -> None:
        # Keyed by member: a newer update about a node supersedes the queued one.
        self._queue.queue(update.node, encode(update))

    def _carry(self, effects: Effects) -> None:
        if not (effects.broadcasts or effects.changed or effects.refuted):
            return  # old news, most of what arrives: nothing to gossip, notify or re-time
        for b in effects.broadcasts:
            self._broadcast(b)
        if effects.refuted:
            # Lifeguard: being accused is a hint that we are the slow one.
            self._awareness.apply_delta(1)
            self.stats.refutes += 1
        self._notify(effects)
        self._poke()

    def _notify(self, effects: Effects) -> None:
        for m in effects.changed:
            if self._logged.get(m.id) != m.state:
                self._logged[m.id] = m.state
                log.info("member %s at %s is %s (incarnation %d)", m.id, m.addr, m.state.value,
                         m.incarnation, extra={"event": "member_state", "member": m.id,
                                               "state": m.state.value})
            if m.state == State.SUSPECT and m.id != self.id:
                # Probe a member we hear is suspect soon: if it refuted and we missed that,
                # its ack carries the alive (see MemberTable._stale); if it is down, our
                # failed probe confirms the suspicion.
                self._probe_suspect(m.id)
            if m.id != self.id and m.id not in self._probe_set:
                # A new member joins the current probe round at a random later position,
                # so it is probed within this round, not only after the reshuffle.
                pos = self._rng.randint(self._probe_index, len(self._probe_order))
                self._probe_order.insert(pos, m.id)
                self._probe_set.add(m.id)
            if self._delegate is not None:
                self._delegate.notify_change(m)

    # --- packets --------------------------------------------------------------------------

    def _build_packet(self, msgs: list[Message], require_payload: bool) -> bytes | None:
        """Encode `msgs` and fill the rest of the packet with piggybacked updates."""
        parts = [encode(m) for m in msgs]
        budget = self.config.max_packet_size - COMPOUND_OVERHEAD - sum(len(p) + 1 for p in parts)
        budget -= self._auth.overhead
        piggy = self._queue.take(budget)
        budget -= sum(len(p) + 1 for p in piggy)
        if self._delegate is not None and budget > 64:
            # User data is base64 in JSON: 4 bytes per 3, plus the message envelope.
            overhead = len(encode(User(b""))) + 1
            for data in self._delegate.get_broadcasts((budget - overhead) * 3 // 4):
                enc = encode(User(data))
                if len(enc) + 1 > budget:
                    break
                budget -= len(enc) + 1
                piggy.append(enc)
        parts += piggy
        if not parts or (require_payload and not piggy):
            return None
        body = parts[0] if len(parts) == 1 else encode_compound(parts)
        return self._auth.seal(body)

    async def _send(self, addr: str, msgs: list[Message], require_payload: bool = False) -> None:
        packet = self._build_packet(msgs, require_payload)
        if packet is None:
            return
        self.stats.packets_sent += 1
        await self._transport.send(addr, packet)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if not self._running:
            coro.close()
            return
        task = asyncio.create_task(coro)
        self._tasks.spawned.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.spawned.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("gossip task failed: %s", exc, exc_info=None if expected(exc) else exc)

    def _on_packet(self, data: bytes, from_addr: str) -> None:
        if not self._running:
            return
        self.stats.packets_received += 1
        if len(data) > self.config.max_packet_size:
            self.stats.oversized += 1  # never decoded: no member sends one this large
            return
        try:
            msgs, dropped = decode_packet(self._open(data))
        except AuthError:
            return
        except DecodeError:
            self.stats.malformed += 1
            return
        if dropped:
            self.stats.malformed += 1
        for msg in msgs:
            self._handle(msg, from_addr)

    def _open(self, packet: bytes) -> bytes:
        """Authenticate a packet or push-pull payload (counted when refused)."""
        try:
            return self._auth.open(packet)
        except StalePacket:
            self.stats.stale += 1
            raise
        except AuthError:
            self.stats.bad_mac += 1
            raise

    def _handle(self, msg: Message, from_addr: str) -> None:
        # Replies go to the packet's real source, never to an address written in the message:
        # a forged source address must not turn us into a reflector at a third party.
        match msg:
            case Compound():
                for part in msg.parts:  # compounds do not nest (see messages.from_obj)
                    self._handle(part, from_addr)
            case Ping():
                # A ping for another id means the sender has a stale address for us.
                if msg.target == self.id:
                    self._spawn(self._send(from_addr, [Ack(msg.seq)]))
            case IndirectPing():
                # The one third address the protocol needs: probed only if it is a member's,
                # and only so many at once (a flood of requests must not become one of pings).
                if not self._is_member_at(msg.target, msg.target_addr):
                    self.stats.unknown_target += 1
                elif self._relays < MAX_RELAYS:
                    self._relays += 1  # counted now: the task starts later
                    self._spawn(self._relay_probe(msg, from_addr))
            case Ack():
                p = self._pending.get(msg.seq)
                if p is not None and not p.ack.done():
                    p.ack.set_result(None)
            case Nack():
                p = self._pending.get(msg.seq)
                if p is not None:
                    p.nacks += 1
            case Alive() | Suspect() | Dead():
                self._carry(self._table.apply(msg, self._clock.now()))
            case User():
                if self._delegate is not None:
                    self._delegate.notify_msg(msg.data)
            case PushPull():
                self.stats.malformed += 1  # full state only travels over push-pull

    # --- time -----------------------------------------------------------------------------

    async def _wait(self, fut: asyncio.Future[None], seconds: float) -> bool:
        """Wait for `fut` at most `seconds` of clock time; True if it resolved.

        Raced against `clock.sleep`, so under a ManualClock nothing waits on real time.
        `fut` itself is never cancelled: it may be shared (a probe's ack).
        """
        if fut.done():
            return True
        if seconds <= 0:
            return False
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({fut, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        return fut.done()
