"""Gossip over real UDP sockets on loopback with the system clock, plus wire-format checks.

Push-pull stays in memory here (the HTTP one is wired in node/); probes, acks and
piggybacked gossip go through real datagrams.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from aquila.cluster.clock import ManualClock, SystemClock
from aquila.cluster.membership.gossip import Gossip, GossipConfig, JoinError
from aquila.cluster.membership.memnet import MemNetwork
from aquila.cluster.membership.messages import (
    MAX_PACKET_SIZE,
    Ack,
    Alive,
    AuthError,
    BroadcastQueue,
    Compound,
    Dead,
    DecodeError,
    IndirectPing,
    MemberRow,
    Message,
    Nack,
    Ping,
    PushPull,
    Suspect,
    User,
    decode,
    encode,
)
from aquila.cluster.membership.packet_auth import PacketAuth
from aquila.cluster.membership.table import State
from aquila.cluster.membership.transport import Receiver
from aquila.cluster.membership.udp import UdpTransport

FAST = GossipConfig(
    probe_interval=0.1,
    probe_timeout=0.05,
    gossip_interval=0.02,
    push_pull_interval=1.0,
    push_pull_timeout=1.0,
)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self) -> None:
        self.clock = SystemClock()
        self.net = MemNetwork(self.clock)  # push-pull only
        self.nodes: list[Gossip] = []

    def add(self, name: str, secret: str | None = "s3cret") -> Gossip:
        port = free_udp_port()
        addr = f"127.0.0.1:{port}"
        g = Gossip(
            name,
            addr,
            UdpTransport("127.0.0.1", port),
            self.net.push_pull(addr),
            self.clock,
            rng=random.Random(name),
            config=FAST,
            secret=secret,
        )
        self.net.serve_push_pull(addr, g.handle_push_pull)
        self.nodes.append(g)
        return g

    async def poll(self, pred: Callable[[], bool], deadline: float, what: str) -> None:
        end = self.clock.now() + deadline
        while not pred():
            assert self.clock.now() < end, f"timed out waiting for {what}"
            await self.clock.sleep(0.01)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    yield c
    for g in c.nodes:
        await g.stop()


async def test_three_nodes_over_udp_converge_and_detect_failure(cluster: Cluster) -> None:
    a, b, c = cluster.add("a"), cluster.add("b"), cluster.add("c")
    for g in (a, b, c):
        await g.start()
    assert await b.join([a.addr]) == 1
    assert await c.join([a.addr]) == 1
    nodes = [a, b, c]

    def all_alive() -> bool:
        return all(
            len(g.members()) == 3 and all(m.state == State.ALIVE for m in g.members())
            for g in nodes
        )

    await cluster.poll(all_alive, 5.0, "convergence")
    # Joins converge through push-pull (TCP): the first datagrams may still be on their way.
    await cluster.poll(lambda: a.stats.packets_received > 0, 5.0, "a datagram at a")
    assert a.stats.bad_mac == 0

    await c.stop()
    cluster.nodes.remove(c)
    seen: dict[str, set[State]] = {"a": set(), "b": set()}

    def c_dead_everywhere() -> bool:
        for g in (a, b):
            m = g.member("c")
            assert m is not None
            seen[g.id].add(m.state)
        return all(g.member("c").state == State.DEAD for g in (a, b))  # type: ignore[union-attr]

    await cluster.poll(c_dead_everywhere, 5.0, "c declared dead")
    # Suspicion comes before death: at least one observer passed through suspect (the
    # other may have learned the verdict directly from gossip).
    assert State.SUSPECT in seen["a"] | seen["b"]
    assert a.member("b").state == State.ALIVE  # type: ignore[union-attr]


async def test_wrong_secret_cannot_join_and_its_packets_are_dropped(cluster: Cluster) -> None:
    a, b = cluster.add("a"), cluster.add("b")
    intruder = cluster.add("x", secret="wrong")
    for g in (a, b, intruder):
        await g.start()
    assert await b.join([a.addr]) == 1
    with pytest.raises(JoinError):
        await intruder.join([a.addr])
    # Make the intruder probe and gossip to a anyway: every packet must be dropped.
    intruder.inject(Alive(1, "a", a.addr))
    await cluster.poll(lambda: a.stats.bad_mac >= 3, 5.0, "dropped packets")
    assert a.member("x") is None and b.member("x") is None
    await cluster.poll(
        lambda: intruder.member("a").state != State.ALIVE,  # type: ignore[union-attr]
        5.0,
        "intruder to get no acks",
    )


# --- wire format --------------------------------------------------------------------------

MESSAGES: list[Message] = [
    Ping(1, "n1", "n2", "10.0.0.2:8470"),
    IndirectPing(2, "n1", "10.0.0.1:8470", True, "n2", "10.0.0.2:8470"),
    Ack(3),
    Nack(4),
    Alive(5, "n1", "10.0.0.1:8470", {"zone": "a", "weight": 2}),
    Suspect(6, "n1", "n2"),
    Dead(7, "n1", "n1"),
    User(b"\x00\xffbinary"),
    Compound((Ack(1), Suspect(2, "a", "b"), User(b"x"))),
    PushPull(True, (MemberRow("n1", "h:1", "alive", 3, {"k": 1}),), b"app-state"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_and_version(msg: Message) -> None:
    data = encode(msg)
    assert b'"v":1' in data
    assert decode(data) == msg


def test_unknown_and_malformed_messages_are_rejected() -> None:
    for bad in [b"not json", b"[]", b'{"t":99,"v":1}', b'{"t":0,"v":1}', b'{"t":2,"seq":1}']:
        with pytest.raises(DecodeError):
            decode(bad)


def test_newer_version_with_extra_fields_still_decodes() -> None:
    assert decode(b'{"t":2,"v":7,"seq":9,"future":"field"}') == Ack(9)


def test_mac_rejects_tampering_and_wrong_keys() -> None:
    clock = ManualClock()
    sender = PacketAuth("s3cret", "a", clock)
    packet = sender.seal(encode(Ack(1)))
    tampered = packet[:-2] + b"2}"
    for secret, p in [("s3cret", tampered), ("other", packet), ("s3cret", encode(Ack(1)))]:
        with pytest.raises(AuthError):
            PacketAuth(secret, "b", clock).open(p)
    assert decode(PacketAuth("s3cret", "b", clock).open(packet)) == Ack(1)
    assert PacketAuth(None, "a", clock).seal(b"x") == b"x"


def test_queue_replaces_stale_updates_and_respects_limit() -> None:
    q = BroadcastQueue(lambda: 2)
    done: list[str] = []
    q.queue("n1", b"old", lambda: done.append("old"))
    q.queue("n1", b"new", lambda: done.append("new"))
    assert done == ["old"] and len(q) == 1
    assert q.take(100) == [b"new"]
    assert q.take(100) == [b"new"]
    assert q.take(100) == [] and done == ["old", "new"]


class RecordingTransport:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def start(self, receiver: Receiver) -> None:
        pass

    async def send(self, addr: str, data: bytes) -> None:
        self.sizes.append(len(data))

    async def close(self) -> None:
        pass


async def test_piggybacked_packets_stay_under_the_limit() -> None:
    clock = ManualClock()
    rec = RecordingTransport()
    g = Gossip(
        "me",
        "10.0.0.1:1",
        rec,
        MemNetwork(clock).push_pull("10.0.0.1:1"),
        clock,
        rng=random.Random(0),
        secret="s3cret",
    )
    await g.start()
    try:
        for i in range(300):
            g.inject(
                Alive(1, f"node-{i}", f"10.0.{i // 250}.{i % 250}:8470", {"pad": "x" * (i % 120)})
            )
        for _ in range(20):
            clock.advance(0.05)
            for _ in range(10):
                await asyncio.sleep(0)
        assert rec.sizes
        assert max(rec.sizes) <= MAX_PACKET_SIZE
        assert max(rec.sizes) > MAX_PACKET_SIZE * 0.8  # packed, not one update per packet
    finally:
        await g.stop()


async def test_meta_too_large_is_refused() -> None:
    clock = ManualClock()
    g = Gossip("me", "h:1", RecordingTransport(), MemNetwork(clock).push_pull("h:1"), clock)
    with pytest.raises(ValueError, match="metadata"):
        g.update_meta({"blob": "x" * 1000})
