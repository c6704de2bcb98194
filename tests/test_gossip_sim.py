"""Many Gossip nodes in one process over the in-memory network, driven by a ManualClock.

Deterministic: every RNG is seeded, deliveries go through `loop.call_soon`, and time only
moves when `Sim.run` advances the clock. No test here sleeps on real time.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Callable

import pytest

from aquila.cluster.clock import ManualClock
from aquila.cluster.membership.gossip import Gossip, GossipConfig, JoinError
from aquila.cluster.membership.memnet import MemNetwork
from aquila.cluster.membership.messages import Dead, Suspect
from aquila.cluster.membership.suspicion import retransmit_limit, suspicion_timeout
from aquila.cluster.membership.table import Member, State

pytestmark = pytest.mark.simulation

STEP = 0.05  # clock step: well under every protocol timer (the shortest is 200 ms)


class Sim:
    def __init__(self, n: int, seed: int = 1, config: GossipConfig | None = None) -> None:
        self.clock = ManualClock()
        self.net = MemNetwork(self.clock, random.Random(seed))
        self.config = config or GossipConfig()
        self.nodes = [self._make(i, random.Random(seed * 1_000 + i)) for i in range(n)]

    def _make(self, i: int, rng: random.Random) -> Gossip:
        addr = f"10.0.{i // 250}.{i % 250}:8470"
        g = Gossip(
            f"n{i}",
            addr,
            self.net.transport(addr),
            self.net.push_pull(addr),
            self.clock,
            rng=rng,
            config=self.config,
        )
        self.net.serve_push_pull(addr, g.handle_push_pull)
        return g

    async def start(self, join: bool = True) -> None:
        for g in self.nodes:
            await g.start()
        if join:
            for g in self.nodes[1:]:
                assert await g.join([self.nodes[0].addr]) == 1

    async def stop(self) -> None:
        for g in self.nodes:
            await g.stop()

    async def settle(self) -> None:
        """Let the loop run until nothing is in flight: packets hop via call_soon, and the
        tasks they wake need a few more turns."""
        idle = 0
        for _ in range(1_000):
            await asyncio.sleep(0)
            idle = idle + 1 if self.net.in_flight == 0 else 0
            if idle >= 4:
                return

    async def run(self, seconds: float, check: Callable[[], None] | None = None) -> None:
        end = self.clock.now() + seconds
        while self.clock.now() < end - 1e-9:
            self.clock.advance(STEP)
            await self.settle()
            if check is not None:
                check()

    async def run_until(self, pred: Callable[[], bool], limit: float) -> float:
        """Advance until `pred()` holds; return the clock time it took. Fails at `limit`."""
        start = self.clock.now()
        while not pred():
            assert self.clock.now() - start <= limit, f"not reached within {limit:.1f}s"
            self.clock.advance(STEP)
            await self.settle()
        return self.clock.now() - start

    def view(self, observer: Gossip, node: str) -> Member | None:
        return observer.member(node)

    def everyone_sees(self, node: str, state: State, among: list[Gossip] | None = None) -> bool:
        return all(
            (m := g.member(node)) is not None and m.state == state
            for g in (among if among is not None else self.nodes)
        )

    def converged(self) -> bool:
        n = len(self.nodes)
        return all(
            len(g.members()) == n and all(m.state == State.ALIVE for m in g.members())
            for g in self.nodes
        )


@pytest.fixture
async def sim50() -> AsyncIterator[Sim]:
    sim = Sim(50)
    await sim.start()
    yield sim
    await sim.stop()


def dissemination_time(config: GossipConfig, n: int) -> float:
    """Generous time for one update to reach everyone by piggybacking: it is sent in every
    gossip round until its retransmit budget is spent."""
    return retransmit_limit(config.retransmit_mult, n) * config.gossip_interval * 2


async def test_fifty_nodes_converge(sim50: Sim) -> None:
    took = await sim50.run_until(sim50.converged, limit=30.0)
    assert took <= dissemination_time(sim50.config, 50) + sim50.config.probe_interval


async def test_paused_node_is_declared_dead_by_all_within_bound(sim50: Sim) -> None:
    await sim50.run_until(sim50.converged, limit=30.0)
    cfg, n = sim50.config, 50
    victim = sim50.nodes[17]
    others = [g for g in sim50.nodes if g is not victim]
    sim50.net.pause(victim.addr)  # SIGSTOP: it answers nothing and says nothing
    # Detection: every member probes it once per round of n-1 probe periods, so someone's
    # probe fails within one round (+ that probe's own period). Then the suspicion runs at
    # most its ceiling (no confirmations); then the dead message spreads.
    lo = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
    bound = (
        n * cfg.probe_interval + cfg.suspicion_max_timeout_mult * lo + dissemination_time(cfg, n)
    )
    took = await sim50.run_until(
        lambda: sim50.everyone_sees(victim.id, State.DEAD, others), limit=bound
    )
    # Nobody else was taken down with it.
    for g in others:
        assert [m.id for m in g.members() if m.state != State.ALIVE] == [victim.id]
    # Lifeguard's independent confirmations bring it down close to the floor, far from the
    # worst case the bound allows for.
    assert lo <= took <= bound
    print(f"declared dead by all 49 after {took:.2f}s (floor {lo:.2f}s, bound {bound:.1f}s)")


async def test_wrongly_suspected_node_refutes(sim50: Sim) -> None:
    await sim50.run_until(sim50.converged, limit=30.0)
    target, accuser = sim50.nodes[5], sim50.nodes[9]
    inc = target.local_member().incarnation
    accuser.inject(Suspect(inc, target.id, accuser.id))
    assert sim50.view(accuser, target.id).state == State.SUSPECT  # type: ignore[union-attr]

    def never_dead() -> None:
        for g in sim50.nodes:
            m = g.member(target.id)
            assert m is not None and m.state != State.DEAD, f"{g.id} declared {target.id} dead"

    # Run past the longest suspicion timeout: the refutation must have won everywhere.
    hi = sim50.config.suspicion_max_timeout_mult * suspicion_timeout(4, 50, 1.0)
    await sim50.run(hi + 5.0, check=never_dead)
    assert target.local_member().incarnation > inc
    assert target.stats.refutes >= 1
    assert sim50.everyone_sees(target.id, State.ALIVE)
    assert all(g.member(target.id).incarnation > inc for g in sim50.nodes)  # type: ignore[union-attr]


async def test_wrongly_declared_dead_node_comes_back() -> None:
    sim = Sim(10, seed=3)
    await sim.start()
    try:
        await sim.run_until(sim.converged, limit=20.0)
        target = sim.nodes[4]
        inc = target.local_member().incarnation
        sim.nodes[0].inject(Dead(inc, target.id, sim.nodes[0].id))
        # Gossip keeps reaching the "dead" node for a while, so it hears and refutes.
        took = await sim.run_until(lambda: sim.everyone_sees(target.id, State.ALIVE), 20.0)
        assert took < 20.0
        assert target.local_member().incarnation > inc
    finally:
        await sim.stop()


async def test_no_false_deaths_with_ten_percent_loss() -> None:
    n, periods = 20, 400  # as many probe periods as test_scale_sim's 50 nodes at 10 % loss
    sim = Sim(n, seed=7)
    await sim.start()
    try:
        await sim.run_until(sim.converged, limit=20.0)
        sim.net.default_drop = 0.10
        deaths: list[tuple[float, str, str]] = []

        def check() -> None:
            for g in sim.nodes:
                for m in g.members():
                    if m.state == State.DEAD:
                        deaths.append((sim.clock.now(), g.id, m.id))

        await sim.run(periods * sim.config.probe_interval, check=check)
        assert not deaths, f"false deaths: {deaths[:5]}"
        failures = sum(g.stats.probe_failures for g in sim.nodes)
        refutes = sum(g.stats.refutes for g in sim.nodes)
        # Loss did cause suspicions, and the suspects refuted them in time.
        assert failures > 0 and refutes > 0
        assert sim.converged() or all(g.num_alive() == n for g in sim.nodes)
        print(f"{failures} failed probes, {refutes} refutations, dropped {sim.net.dropped}")
    finally:
        await sim.stop()


async def test_graceful_leave() -> None:
    sim = Sim(8, seed=4)
    await sim.start()
    try:
        await sim.run_until(sim.converged, limit=20.0)
        leaver = sim.nodes[3]
        leave = asyncio.create_task(leaver.leave(timeout=5.0))
        await sim.run_until(leave.done, limit=5.0)
        await leave
        assert leaver.local_member().state == State.LEFT
        await sim.run_until(lambda: sim.everyone_sees(leaver.id, State.LEFT), limit=5.0)
        await leaver.stop()
        # Left is final: it stays left (never becomes dead) while the others carry on.
        rest = [g for g in sim.nodes if g is not leaver]
        sim.nodes = rest
        await sim.run(30.0)
        assert sim.everyone_sees(leaver.id, State.LEFT, rest)
        assert all(g.num_alive() == 7 for g in rest)
    finally:
        await sim.stop()


async def test_partition_heals_and_nodes_rejoin_via_refutation() -> None:
    sim = Sim(6, seed=5)
    await sim.start()
    try:
        await sim.run_until(sim.converged, limit=20.0)
        island = sim.nodes[5]
        for g in sim.nodes[:5]:
            sim.net.block(g.addr, island.addr)
            sim.net.block(island.addr, g.addr)
        await sim.run_until(lambda: sim.everyone_sees(island.id, State.DEAD, sim.nodes[:5]), 60)
        for g in sim.nodes[:5]:
            sim.net.unblock(g.addr, island.addr)
            sim.net.unblock(island.addr, g.addr)
        # Gossip to the recently dead and push-pull carry the news to the island, which
        # refutes with a higher incarnation; both sides see everyone alive again.
        await sim.run_until(sim.converged, limit=sim.config.push_pull_interval * 2 + 5)
    finally:
        await sim.stop()


async def test_join_without_answering_seed_raises() -> None:
    sim = Sim(2)
    await sim.start(join=False)
    try:
        with pytest.raises(JoinError, match="no seed answered"):
            await sim.nodes[1].join(["10.9.9.9:8470"])
        assert await sim.nodes[1].join([sim.nodes[0].addr, "10.9.9.9:8470"]) == 1
    finally:
        await sim.stop()


class RecordingDelegate:
    def __init__(self, name: str) -> None:
        self.name = name
        self.outbox: list[bytes] = []
        self.inbox: list[bytes] = []
        self.remote_states: list[bytes] = []
        self.changes: list[tuple[str, State]] = []
        self.sends = 0

    def local_state(self) -> bytes:
        return f"state-of-{self.name}".encode()

    def merge_remote_state(self, data: bytes) -> None:
        self.remote_states.append(data)

    def get_broadcasts(self, limit_bytes: int) -> list[bytes]:
        # Like memberlist, retransmission is the delegate's business: resend each a few times.
        out = self.outbox[:]
        self.sends += 1
        if self.sends % 4 == 0:
            self.outbox.clear()
        assert sum(len(b) for b in out) <= limit_bytes
        return out

    def notify_msg(self, data: bytes) -> None:
        self.inbox.append(data)

    def notify_change(self, member: Member) -> None:
        self.changes.append((member.id, member.state))


async def test_delegate_rides_on_gossip() -> None:
    clock = ManualClock()
    net = MemNetwork(clock, random.Random(0))
    delegates = [RecordingDelegate(f"d{i}") for i in range(3)]
    nodes = []
    for i, d in enumerate(delegates):
        addr = f"10.1.0.{i}:8470"
        g = Gossip(
            f"n{i}",
            addr,
            net.transport(addr),
            net.push_pull(addr),
            clock,
            rng=random.Random(i),
            delegate=d,
            meta={"role": "data"},
        )
        net.serve_push_pull(addr, g.handle_push_pull)
        nodes.append(g)
    sim = Sim(0)
    sim.clock, sim.net, sim.nodes = clock, net, nodes
    await sim.start()
    try:
        assert delegates[0].remote_states == [b"state-of-d1", b"state-of-d2"]
        assert delegates[1].remote_states == [b"state-of-d0"]
        await sim.run_until(sim.converged, limit=10.0)
        assert ("n1", State.ALIVE) in delegates[2].changes
        delegates[0].outbox.append(b"shard map v2")
        await sim.run_until(
            lambda: all(b"shard map v2" in d.inbox for d in delegates[1:]), limit=5.0
        )
        nodes[2].update_meta({"role": "query"})
        await sim.run_until(
            lambda: all(g.member("n2").meta == {"role": "query"} for g in nodes),  # type: ignore[union-attr]
            limit=5.0,
        )
    finally:
        await sim.stop()


def test_default_config_matches_memberlist_lan() -> None:
    c = GossipConfig()
    assert (c.probe_interval, c.probe_timeout, c.indirect_checks) == (1.0, 0.5, 3)
    assert (c.suspicion_mult, c.suspicion_max_timeout_mult, c.retransmit_mult) == (4, 6, 4)
    assert (c.gossip_interval, c.gossip_nodes, c.push_pull_interval) == (0.2, 3, 30.0)
    assert c.awareness_max_multiplier == 8
    assert math.isclose(
        suspicion_timeout(c.suspicion_mult, 50, c.probe_interval), 6.796, abs_tol=1e-3
    )
