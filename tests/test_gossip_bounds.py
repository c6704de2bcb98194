"""Gossip does not trust what arrives: the decoder refuses anything outside its bounds with a
DecodeError (never another exception), a forged accusation cannot leave a node unable to
refute, replies go to the packet's real source, and oversized datagrams are dropped unread.

The in-memory network stands in for UDP; an "attacker" is one more transport on it that
sends whatever bytes a test gives it.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aquila.cluster.clock import ManualClock
from aquila.cluster.membership.gossip import MAX_RELAYS, Gossip, GossipConfig
from aquila.cluster.membership.memnet import MemNetwork
from aquila.cluster.membership.messages import (
    MAX_PACKET_SIZE,
    Ack,
    Alive,
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
    encode_compound,
    to_obj,
)
from aquila.cluster.membership.table import State
from aquila.cluster.model.bounds import MAX_INCARNATION, MAX_SEQ
from tests.fuzz import dumps, mutate

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
STEP = 0.05
A, B, ATTACKER, VICTIM = "10.0.0.1:8470", "10.0.0.2:8470", "10.6.6.6:9999", "10.9.9.9:8470"


# --- strategies ---------------------------------------------------------------------------

node_ids = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)
addrs = st.builds(lambda a, p: f"10.0.0.{a}:{p}", st.integers(0, 255), st.integers(1, 65535))
incs = st.integers(0, MAX_INCARNATION)
accusations = st.integers(0, MAX_INCARNATION - 1)
seqs = st.integers(0, MAX_SEQ)
metas = st.dictionaries(st.text(max_size=8), st.integers(-5, 5) | st.text(max_size=8),
                        max_size=4)
rows = st.one_of(
    st.builds(MemberRow, node_ids, addrs, st.just("alive"), incs, metas),
    st.builds(MemberRow, node_ids, addrs, st.sampled_from(["suspect", "dead", "left"]),
              accusations, metas),
)
simple = st.one_of(
    st.builds(Ping, seqs, node_ids, node_ids, addrs),
    st.builds(IndirectPing, seqs, node_ids, addrs, st.booleans(), node_ids, addrs),
    st.builds(Ack, seqs),
    st.builds(Nack, seqs),
    st.builds(Alive, incs, node_ids, addrs, metas),
    st.builds(Suspect, accusations, node_ids, node_ids),
    st.builds(Dead, accusations, node_ids, node_ids),
    st.builds(User, st.binary(max_size=64)),
    st.builds(PushPull, st.booleans(), st.lists(rows, max_size=4).map(tuple),
              st.binary(max_size=64)),
)
messages: st.SearchStrategy[Message] = st.one_of(
    simple, st.builds(Compound, st.lists(simple, max_size=4).map(tuple)))

@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with a field or two replaced or deleted (tests/fuzz.py), sometimes
    wrapped in compounds."""
    obj: Any = mutate(draw, json.loads(json.dumps(to_obj(draw(messages)))), skip=("t", "v"))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        obj = {"t": 7, "v": 1, "parts": [obj]}
    return dumps(obj)


def assert_only_decode_errors(data: bytes) -> None:
    try:
        msg = decode(data)
    except DecodeError:
        return
    # What decodes can be sent on: encoding it again never fails (no 2^64, no deep nesting).
    assert decode(encode(msg)) == msg


# --- the decoder --------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=2000))
def test_random_bytes_are_only_ever_a_decode_error(data: bytes) -> None:
    assert_only_decode_errors(data)


@PROPERTY
@given(mutated())
def test_mutated_messages_are_only_ever_a_decode_error(data: bytes) -> None:
    assert_only_decode_errors(data)


@PROPERTY
@given(messages)
def test_valid_messages_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("depth", [2, 50, 400, 600, 2000])
def test_nested_compounds_are_a_decode_error(depth: int) -> None:
    data = b'{"t":2,"v":1,"seq":1}'
    for _ in range(depth):
        data = encode_compound([data])
    with pytest.raises(DecodeError):
        decode(data)


def test_one_level_of_compound_decodes() -> None:
    data = encode_compound([b'{"t":2,"v":1,"seq":1}', b'{"t":3,"v":1,"seq":2}'])
    assert decode(data) == Compound((Ack(1), Nack(2)))


@pytest.mark.parametrize(("raw", "why"), [
    (b'{"t":6,"v":1,"inc":18446744073709551615,"node":"a","from":"b"}', "2^64-1"),
    (b'{"t":6,"v":1,"inc":%d,"node":"a","from":"b"}' % MAX_INCARNATION, "no room to refute"),
    (b'{"t":5,"v":1,"inc":1e300,"node":"a","from":"b"}', "float"),
    (b'{"t":4,"v":1,"inc":1e300,"node":"a","addr":"1.2.3.4:1"}', "float"),
    (b'{"t":4,"v":1,"inc":%d,"node":"a","addr":"1.2.3.4:1"}' % (MAX_INCARNATION + 1), "big"),
    (b'{"t":4,"v":1,"inc":-1,"node":"a","addr":"1.2.3.4:1"}', "negative"),
    (b'{"t":4,"v":1,"inc":true,"node":"a","addr":"1.2.3.4:1"}', "bool"),
    (b'{"t":4,"v":1,"inc":1,"node":"","addr":"1.2.3.4:1"}', "empty id"),
    (b'{"t":4,"v":1,"inc":1,"node":"a","addr":"http://1.2.3.4:1/x"}', "not host:port"),
    (b'{"t":4,"v":1,"inc":1,"node":"a","addr":"1.2.3.4:1","meta":{"x":"%s"}}' % (b"y" * 600),
     "meta too large"),
    (b'{"t":4,"v":1,"inc":1,"node":"a","addr":"1.2.3.4:1","meta":' + b'{"a":' * 300 + b"1"
     + b"}" * 300 + b"}", "meta too deep"),
    (b'{"t":2,"v":1,"seq":1e300}', "float seq"),
    (b'{"t":2,"v":1,"seq":18446744073709551616}', "seq past 2^64"),
    (b'{"t":9,"v":1,"join":false,"members":[["a","1.2.3.4:1","dead",%d,{}]],"user":""}'
     % MAX_INCARNATION, "row accusation without room"),
    (b'{"t":9,"v":1,"join":false,"members":[["a","1.2.3.4:1","zombie",1,{}]],"user":""}',
     "unknown state"),
    (b'{"t":9,"v":1,"join":0,"members":[],"user":""}', "join not a bool"),
])
def test_out_of_bounds_fields_are_a_decode_error(raw: bytes, why: str) -> None:
    with pytest.raises(DecodeError):
        decode(raw)


def test_push_pull_member_count_is_bounded() -> None:
    row = ["a", "1.2.3.4:1", "alive", 1, {}]
    ok = {"t": 9, "v": 1, "join": False, "members": [row] * 4096, "user": ""}
    assert len(decode(json.dumps(ok).encode()).members) == 4096  # type: ignore[union-attr]
    with pytest.raises(DecodeError):
        decode(json.dumps({**ok, "members": [row] * 4097}).encode())


# --- a node on the in-memory network --------------------------------------------------------


class Net:
    """Two gossip nodes (a, b), an attacker's raw transport and a victim's that records what
    reaches it."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.net = MemNetwork(self.clock, random.Random(1))
        self.a = self._node("a", A)
        self.b = self._node("b", B)
        self.attacker = self.net.transport(ATTACKER)
        self.victim = self.net.transport(VICTIM)
        self.got: dict[str, list[bytes]] = {ATTACKER: [], VICTIM: []}

    def _node(self, name: str, addr: str) -> Gossip:
        g = Gossip(name, addr, self.net.transport(addr), self.net.push_pull(addr), self.clock,
                   rng=random.Random(name), config=GossipConfig(push_pull_interval=0))
        self.net.serve_push_pull(addr, g.handle_push_pull)
        return g

    async def start(self) -> None:
        await self.attacker.start(lambda d, s: self.got[ATTACKER].append(d))
        await self.victim.start(lambda d, s: self.got[VICTIM].append(d))
        await self.a.start()
        await self.b.start()
        assert await self.b.join([A]) == 1

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def run(self, seconds: float) -> None:
        for _ in range(round(seconds / STEP)):
            self.clock.advance(STEP)
            await self.settle()

    async def forge(self, to: str, data: bytes) -> None:
        await self.attacker.send(to, data)
        await self.settle()

    def received(self, who: str) -> list[Message]:
        out: list[Message] = []
        for d in self.got[who]:
            msg = decode(d)
            out += list(msg.parts) if isinstance(msg, Compound) else [msg]
        return out

    def loops_alive(self) -> bool:
        return all(not t.done() for g in (self.a, self.b) for t in g._tasks.loops)

    async def stop(self) -> None:
        await self.a.stop()
        await self.b.stop()


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    n = Net()
    await n.start()
    await n.run(1.0)
    yield n
    await n.stop()


async def test_a_ping_is_answered_at_its_real_source(net: Net) -> None:
    """A ping claiming to come from the victim's address: the ack goes to the sender."""
    await net.forge(A, encode(Ping(77, "a", "b", VICTIM)))
    await net.run(0.1)
    assert Ack(77) in net.received(ATTACKER)
    assert net.got[VICTIM] == []


async def test_an_indirect_probe_reaches_only_a_members_address(net: Net) -> None:
    """An indirect probe naming a non-member's address is not relayed there (reflection);
    one naming a member's address is, and the answer goes to the real source."""
    await net.forge(A, encode(IndirectPing(5, "victim", VICTIM, True, "b", VICTIM)))
    await net.forge(A, encode(IndirectPing(6, "b", VICTIM, True, "b", VICTIM)))
    await net.run(1.0)
    assert net.got[VICTIM] == []
    assert net.a.stats.unknown_target == 2
    await net.forge(A, encode(IndirectPing(7, "b", B, True, "x", VICTIM)))
    await net.run(1.0)
    assert Ack(7) in net.received(ATTACKER)
    assert net.got[VICTIM] == []


async def test_a_forged_dead_at_2_64_is_dropped_and_the_node_refutes_a_real_one(
    net: Net,
) -> None:
    for target in (A, B):
        await net.forge(target, b'{"t":6,"v":1,"inc":18446744073709551615,"node":"b","from":"x"}')
    await net.run(1.0)
    assert net.a.member("b").state == State.ALIVE  # type: ignore[union-attr]
    assert net.b.local_member().incarnation < 10
    # The largest accusation that decodes still leaves b room to refute, everywhere.
    top = MAX_INCARNATION - 1
    await net.forge(A, encode(Dead(top, "b", "x")))
    await net.run(3.0)
    assert net.b.local_member().incarnation == MAX_INCARNATION
    assert net.a.member("b").state == State.ALIVE  # type: ignore[union-attr]
    assert net.a.member("b").incarnation == MAX_INCARNATION  # type: ignore[union-attr]
    assert net.loops_alive()


async def test_a_float_incarnation_does_not_kill_the_probe_loop(net: Net) -> None:
    """1e300 was taken as an int of 300 digits: every later packet about that member failed
    to encode, and the probe loop died on it."""
    for raw in (b'{"t":4,"v":1,"inc":1e300,"node":"z","addr":"10.0.0.9:1"}',
                b'{"t":5,"v":1,"inc":1e300,"node":"b","from":"x"}'):
        await net.forge(A, raw)
    probes = net.a.stats.probes
    await net.run(5.0)
    assert net.a.member("z") is None
    assert net.a.stats.probes > probes
    assert net.loops_alive()
    assert net.a.member("b").state == State.ALIVE  # type: ignore[union-attr]


async def test_oversized_datagrams_are_dropped_unread(net: Net) -> None:
    big = encode(Alive(1, "z", "10.0.0.9:1", {"x": "y" * 200}))
    padded = big[:-1] + b" " * (MAX_PACKET_SIZE + 10 - len(big)) + b"}"
    assert decode(padded) == decode(big)  # valid, only too large
    await net.forge(A, padded)
    assert net.a.stats.oversized == 1
    assert net.a.member("z") is None
    await net.forge(A, big)
    assert net.a.member("z") is not None


async def test_deep_compounds_count_as_malformed(net: Net) -> None:
    data = encode(Ack(1))
    for _ in range(30):
        data = encode_compound([data])
    before = net.a.stats.malformed
    await net.forge(A, data)
    assert net.a.stats.malformed == before + 1
    assert net.loops_alive()


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(mutated() | st.binary(max_size=200), min_size=5, max_size=30))
@example([b'{"t":4,"v":1,"inc":18446744073709551616,"node":"z","addr":"10.0.0.9:1"}',
          b'{"t":5,"v":1,"inc":1e300,"node":"b","from":"x"}',
          b'{"t":7,"v":1,"parts":[' * 400 + b"]}" * 400])
def test_a_node_fed_mutated_packets_keeps_gossiping(packets: list[bytes]) -> None:
    async def scenario() -> None:
        n = Net()
        await n.start()
        for p in packets:
            await n.forge(A, p)
            await n.forge(B, p)
        await n.run(1.0)
        assert n.loops_alive()
        for g in (n.a, n.b):
            g._local_push_pull(False)  # the whole table still encodes
        # A packet that happened to be a valid accusation of a or b is refuted in time.
        for _ in range(200):
            if all(g.member(x).state == State.ALIVE  # type: ignore[union-attr]
                   for g in (n.a, n.b) for x in "ab"):
                break
            await n.run(0.1)
        else:
            raise AssertionError("a and b do not see each other alive again")
        assert n.loops_alive()
        await n.stop()

    asyncio.run(scenario())


async def test_a_flood_of_indirect_probes_runs_a_bounded_number(net: Net) -> None:
    net.net.pause(B)  # b answers nothing: every relay waits its whole timeout
    for seq in range(500):
        await net.attacker.send(A, encode(IndirectPing(seq, "b", B, True, "x", VICTIM)))
    await net.settle()
    assert net.a._relays == MAX_RELAYS
    await net.run(1.0)
    assert net.a._relays == 0
    nacks = [m for m in net.received(ATTACKER) if isinstance(m, Nack)]
    assert len(nacks) == MAX_RELAYS
    net.net.resume(B)
