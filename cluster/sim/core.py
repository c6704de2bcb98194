"""Scale simulator: many real `Gossip` nodes, each carrying the real cluster-state delegate
(`StateReplica`), over the in-memory network (`MemNetwork`) under a `ManualClock`.

Nothing here re-implements the protocol: the simulator only creates nodes, injects faults
(loss, pauses, slow members), moves the clock and records what the nodes report through the
delegate's `notify_change`. `scripts/simulate.py` runs it at 10 to 1,000 nodes and
`tests/test_scale_sim.py` checks its bounds at 20 to 100.

Time moves in steps of at least `resolution` seconds, jumping straight to the next sleeper
when nothing is due sooner; after each step the event loop runs until it is idle (every
packet delivered and every task woken has run), so packets take no clock time unless a slow
member holds them back, and a measured time is exact to within one step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from aquila.cluster.clock import ManualClock
from aquila.cluster.membership.gossip import Gossip, GossipConfig
from aquila.cluster.membership.memnet import MemNetwork
from aquila.cluster.membership.messages import Alive
from aquila.cluster.membership.table import Member, State
from aquila.cluster.state.runtime import StateReplica


def node_id(i: int) -> str:
    """Ids as long as the generated ones (`node-` and 12 hex digits), so sizes are real."""
    return f"node-{i:012x}"


def node_addr(i: int) -> str:
    return f"10.{i // 62_500 % 250}.{i // 250 % 250}.{i % 250}:8470"


@dataclass
class SimNode:
    id: str
    addr: str
    gossip: Gossip
    replica: StateReplica


@dataclass
class Observed:
    """What the nodes reported through notify_change (only the interesting transitions)."""

    suspicions: int = 0
    first_suspected: dict[str, float] = field(default_factory=dict)
    # node → observer → when that observer first declared it dead
    dead: dict[str, dict[str, float]] = field(default_factory=dict)
    deaths: list[tuple[float, str, str]] = field(default_factory=list)  # (when, observer, node)


class SimCluster:
    def __init__(
        self,
        n: int,
        *,
        seed: int = 1,
        config: GossipConfig | None = None,
        resolution: float = 0.01,
    ) -> None:
        self.seed = seed
        self.clock = ManualClock()
        self.net = MemNetwork(self.clock, random.Random(seed))
        self.config = config or GossipConfig()
        self.rng = random.Random(seed + 1)
        self.resolution = resolution
        self.nodes: list[SimNode] = []
        self.down: set[str] = set()  # ids of nodes killed or paused
        self.seen = Observed()
        for _ in range(n):
            self.add_node()

    # --- nodes --------------------------------------------------------------------------

    def add_node(self) -> SimNode:
        i = len(self.nodes)
        nid, addr = node_id(i), node_addr(i)
        replica = StateReplica(nid)
        g = Gossip(
            nid,
            addr,
            self.net.transport(addr),
            self.net.push_pull(addr),
            self.clock,
            rng=random.Random(self.seed * 1_000_003 + i),
            config=self.config,
            delegate=replica.delegate,
        )
        replica.members_count = g.num_alive
        replica.member_listeners.append(partial(self._on_change, nid))
        self.net.serve_push_pull(addr, g.handle_push_pull)
        node = SimNode(nid, addr, g, replica)
        self.nodes.append(node)
        return node

    def _on_change(self, observer: str, m: Member) -> None:
        if m.state == State.SUSPECT:
            self.seen.suspicions += 1
            self.seen.first_suspected.setdefault(m.id, self.clock.now())
        elif m.state == State.DEAD:
            now = self.clock.now()
            self.seen.dead.setdefault(m.id, {}).setdefault(observer, now)
            self.seen.deaths.append((now, observer, m.id))

    async def boot(self, stagger: float = 1.0) -> None:
        """Start every node, each joining through the first, at random moments spread over
        `stagger` seconds (real boots are not simultaneous, and timers in lock step would
        make every node probe and gossip in the same instant)."""
        first = self.nodes[0]
        await first.gossip.start()
        starts = sorted(self.rng.uniform(0.0, stagger) for _ in self.nodes[1:])
        for node, at in zip(self.nodes[1:], starts, strict=True):
            if at > self.clock.now():
                await self.run(at - self.clock.now())
            await node.gossip.start()
            await node.gossip.join([first.addr])

    async def warm_boot(self, stagger: float = 1.0) -> None:
        """Start every node already knowing every other as alive: what a finished cold start
        leaves behind, without its n² updates (each member learning each other one, every
        update received ~3 × retransmit_limit times), which at 1,000 nodes is most of a
        simulation's run time. Starts are spread over `stagger` seconds as in `boot`."""
        now = self.clock.now()
        for node in self.nodes:
            table = node.gossip._table
            for other in self.nodes:
                if other is not node:
                    table.apply(Alive(1, other.id, other.addr, {}), now)
        starts = sorted(self.rng.uniform(0.0, stagger) for _ in self.nodes)
        for node, at in zip(self.nodes, starts, strict=True):
            if at > self.clock.now():
                await self.run(at - self.clock.now())
            await node.gossip.start()

    async def stop(self) -> None:
        for node in self.nodes:
            if node.id not in self.down:
                await node.gossip.stop()

    # --- time ---------------------------------------------------------------------------

    async def settle(self) -> None:
        """Run the event loop until nothing is ready: packets are delivered with call_soon
        and each one may wake tasks that send more, all within the same clock instant."""
        loop = asyncio.get_running_loop()
        # asyncio's own loop exposes its ready queue; any other loop gets a bounded spin.
        ready = getattr(loop, "_ready", None)
        if ready is None:
            for _ in range(64):
                await asyncio.sleep(0)
            return
        while True:
            await asyncio.sleep(0)
            if not ready:
                return

    async def run(self, seconds: float, until: Callable[[], bool] | None = None) -> float | None:
        """Advance the clock by `seconds`. With `until`, stop as soon as it holds (checked
        after every step) and return how long that took; None if it never did."""
        start = self.clock.now()
        end = start + seconds
        await self.settle()
        if until is not None and until():
            return 0.0
        while self.clock.now() < end - 1e-9:
            nxt = self.clock.next_wakeup()
            now = self.clock.now()
            target = min(end, max(nxt if nxt is not None else end, now + self.resolution))
            self.clock.advance(target - now)
            await self.settle()
            if until is not None and until():
                return self.clock.now() - start
        return None

    # --- views --------------------------------------------------------------------------

    async def kill(self, node: SimNode) -> None:
        """Stop the node like a crash: its tasks end, nothing reaches it any more."""
        self.down.add(node.id)
        await node.gossip.stop()

    def pause(self, node: SimNode) -> None:
        """Cut the node off the network (it keeps running, and so thinks the others dead)."""
        self.down.add(node.id)
        self.net.pause(node.addr)

    def running(self) -> list[SimNode]:
        """Nodes neither killed nor paused (some may still be wrongly thought dead)."""
        return [n for n in self.nodes if n.id not in self.down]

    def all_know_all(self, among: list[SimNode] | None = None) -> bool:
        """Every node has every other as a live member (alive or suspect)."""
        group = self.nodes if among is None else among
        want = len(group)
        return all(node.gossip.num_alive() == want for node in group)

    def all_know(self, nid: str, among: list[SimNode]) -> bool:
        return all(node.gossip.member(nid) is not None for node in among)

    def load(self) -> tuple[int, int, int, int]:
        """(packets, bytes, push-pull exchanges, push-pull bytes) sent so far."""
        net = self.net
        return net.sent, net.bytes_sent, net.push_pulls, net.push_pull_bytes
