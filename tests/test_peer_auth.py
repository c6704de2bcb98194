"""Peer request signatures (cluster/peers/auth.py), gossip packet seals (cluster/membership/packet_auth.py)
and the replay memory both use (cluster/model/replay.py): each field tampered with, stale, future
and replayed messages are refused; valid ones are accepted once."""

from __future__ import annotations

import asyncio
import random
import struct

import pytest

from aquila.cluster.clock import ManualClock
from aquila.cluster.membership.gossip import Gossip, GossipConfig
from aquila.cluster.membership.memnet import MemNetwork
from aquila.cluster.membership.messages import MAC_SIZE, Ack, AuthError, decode, encode
from aquila.cluster.membership.packet_auth import PacketAuth, StalePacket
from aquila.cluster.membership.table import State
from aquila.cluster.model.replay import WINDOW_S, NotFresh, ReplayGuard
from aquila.cluster.peers.auth import (
    BODY_HEADER,
    NONCE_HEADER,
    RECIPIENT_HEADER,
    SENDER_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    PeerAuthError,
    PeerSigner,
    PeerVerifier,
)

NOW = 1_700_000_000.0
PATH = "/internal/v1/collections/c/write?x=1"
BODY = b'{"writes": []}'


ME = "n2"


def signed(secret: str = "s3cret", at: float = NOW, sender: str = "n1", to: str | None = ME,
           method: str = "POST", path: str = PATH, body: bytes = BODY) -> dict[str, str]:
    return PeerSigner(secret, sender, lambda: at).headers(method, path, body, to)


def verifier(secret: str = "s3cret") -> PeerVerifier:
    return PeerVerifier(secret, lambda: NOW)


def test_valid_request_is_accepted_with_its_sender() -> None:
    v = verifier()
    s = v.check_headers("POST", PATH, signed(sender="node 1/é"), ME)
    assert s is not None and s.sender == "node 1/é"
    v.check_body(s, BODY)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (SENDER_HEADER, "n3"),
        (RECIPIENT_HEADER, "*"),
        (TIME_HEADER, str(int(NOW * 1000) + 1)),
        (NONCE_HEADER, "0" * 32),
        (BODY_HEADER, "0" * 64),
        (SIGNATURE_HEADER, "0" * 64),
    ],
)
def test_each_tampered_header_is_refused(header: str, value: str) -> None:
    headers = {**signed(), header: value}
    with pytest.raises(PeerAuthError, match="wrong signature"):
        verifier().check_headers("POST", PATH, headers, ME)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", PATH),
        ("POST", "/internal/v1/collections/c/drop_shard?x=1"),
        ("POST", "/internal/v1/collections/d/write?x=1"),
        ("POST", "/internal/v1/collections/c/write?x=2"),
        ("POST", "/internal/v1/collections/c/write"),
    ],
)
def test_another_method_or_path_is_refused(method: str, path: str) -> None:
    with pytest.raises(PeerAuthError, match="wrong signature"):
        verifier().check_headers(method, path, signed(), ME)


def test_request_for_another_node_is_refused() -> None:
    """A request captured on its way to n3 cannot be replayed to n2, which never saw it."""
    with pytest.raises(PeerAuthError, match="addressed to another node"):
        verifier().check_headers("POST", PATH, signed(to="n3"), ME)
    # Push-pull goes to a seed's address before its id is known: addressed to any node.
    assert verifier().check_headers("POST", PATH, signed(to=None), ME) is not None
    assert verifier().check_headers("POST", PATH, signed(to="n 2/é"), "n 2/é") is not None


def test_another_body_is_refused_after_the_headers_pass() -> None:
    v = verifier()
    s = v.check_headers("POST", PATH, signed(), ME)
    with pytest.raises(PeerAuthError, match="body"):
        v.check_body(s, b'{"writes": [1]}')


def test_wrong_secret_missing_and_malformed_headers_are_refused() -> None:
    with pytest.raises(PeerAuthError, match="wrong signature"):
        verifier("other").check_headers("POST", PATH, signed(), ME)
    for name in (SENDER_HEADER, RECIPIENT_HEADER, TIME_HEADER, NONCE_HEADER, BODY_HEADER,
                 SIGNATURE_HEADER):
        headers = signed()
        del headers[name]
        with pytest.raises(PeerAuthError, match=f"missing {name}"):
            verifier().check_headers("POST", PATH, headers, ME)
    for name, bad in [(TIME_HEADER, "-5"), (TIME_HEADER, "1e9"), (NONCE_HEADER, "zz" * 16),
                      (SIGNATURE_HEADER, "A" * 64), (SENDER_HEADER, "a\nb"), (RECIPIENT_HEADER, "**"),
                      (BODY_HEADER, "0" * 65), (TIME_HEADER, "9" * 30)]:
        with pytest.raises(PeerAuthError, match=f"malformed {name}"):
            verifier().check_headers("POST", PATH, {**signed(), name: bad}, ME)


@pytest.mark.parametrize("offset", [-(WINDOW_S + 1), WINDOW_S + 1, -1e6, 1e6])
def test_stale_and_future_timestamps_are_refused(offset: float) -> None:
    with pytest.raises(PeerAuthError, match="stale|future"):
        verifier().check_headers("POST", PATH, signed(at=NOW + offset), ME)


@pytest.mark.parametrize("offset", [-(WINDOW_S - 1), WINDOW_S - 1])
def test_timestamps_within_the_window_are_accepted(offset: float) -> None:
    assert verifier().check_headers("POST", PATH, signed(at=NOW + offset), ME) is not None


def test_replayed_request_is_refused() -> None:
    v = verifier()
    headers = signed()
    assert v.check_headers("POST", PATH, headers, ME) is not None
    with pytest.raises(PeerAuthError, match="replayed"):
        v.check_headers("POST", PATH, headers, ME)
    # Another request signed the same second is not a replay: its nonce differs.
    assert v.check_headers("POST", PATH, signed(), ME) is not None


def test_without_a_secret_nothing_is_signed_or_checked() -> None:
    assert PeerSigner(None, "n1").headers("POST", PATH, BODY, ME) == {}
    v = PeerVerifier(None)
    assert not v.enabled and v.check_headers("POST", PATH, {}, ME) is None
    v.check_body(None, b"anything")


# -- the replay memory -------------------------------------------------------------------------


def test_replay_memory_forgets_what_would_be_stale_anyway() -> None:
    g = ReplayGuard(window_s=10)
    for i in range(100):
        g.check(100.0, i.to_bytes(2, "big"), 100.0)
    assert len(g) == 100
    g.check(120.0, b"new", 120.0)
    assert len(g) == 1
    with pytest.raises(NotFresh, match="stale"):
        g.check(100.0, b"\x00\x00", 120.0)


def test_replay_memory_is_bounded_and_never_lets_a_forgotten_nonce_back() -> None:
    g = ReplayGuard(window_s=30, max_nonces=10)
    for i in range(50):
        g.check(100.0 + i / 100, i.to_bytes(2, "big"), 100.0)
        assert len(g) <= 10
    # The first nonces were forgotten while still fresh: their timestamps are now refused.
    with pytest.raises(NotFresh, match="older than the replay memory"):
        g.check(100.0, (0).to_bytes(2, "big"), 100.0)
    # Remembered ones are refused as replays; newer messages still pass.
    with pytest.raises(NotFresh, match="replayed"):
        g.check(100.49, (49).to_bytes(2, "big"), 100.0)
    g.check(100.5, b"later", 100.0)


# -- gossip packets ----------------------------------------------------------------------------


def test_packet_round_trip_and_overhead() -> None:
    clock = ManualClock()
    a, b = PacketAuth("s3cret", "a", clock), PacketAuth("s3cret", "b", clock)
    body = encode(Ack(7))
    packet = a.seal(body)
    assert len(packet) == len(body) + a.overhead
    assert decode(b.open(packet)) == Ack(7)


def _header_offsets() -> dict[str, int]:
    # MAC | version (1) | time (8) | nonce (16) | sender length (2) | sender | body
    return {"mac": 0, "version": MAC_SIZE, "time": MAC_SIZE + 1, "nonce": MAC_SIZE + 9,
            "sender_len": MAC_SIZE + 25, "sender": MAC_SIZE + 27, "body": -1}


@pytest.mark.parametrize("field", list(_header_offsets()))
def test_packet_with_any_byte_flipped_is_refused(field: str) -> None:
    clock = ManualClock()
    packet = bytearray(PacketAuth("s3cret", "a", clock).seal(encode(Ack(7))))
    packet[_header_offsets()[field]] ^= 0x01
    with pytest.raises(AuthError, match="bad MAC"):
        PacketAuth("s3cret", "b", clock).open(bytes(packet))


def test_packet_wrong_key_short_or_unsealed_is_refused() -> None:
    clock = ManualClock()
    packet = PacketAuth("s3cret", "a", clock).seal(encode(Ack(7)))
    b = PacketAuth("s3cret", "b", clock)
    for bad in (PacketAuth("other", "a", clock).seal(encode(Ack(7))), packet[:MAC_SIZE + 5],
                encode(Ack(7)), b""):
        with pytest.raises(AuthError) as info:
            b.open(bad)
        assert not isinstance(info.value, StalePacket)


def test_stale_future_replayed_and_own_packets_are_dropped() -> None:
    clock = ManualClock()
    a, b = PacketAuth("s3cret", "a", clock), PacketAuth("s3cret", "b", clock)
    packet = a.seal(encode(Ack(1)))
    b.open(packet)
    with pytest.raises(StalePacket, match="replayed"):
        b.open(packet)
    with pytest.raises(StalePacket, match="own packet"):
        a.open(a.seal(encode(Ack(2))))
    old = a.seal(encode(Ack(3)))
    clock.advance(WINDOW_S + 1)
    with pytest.raises(StalePacket, match="stale"):
        b.open(old)
    early = ManualClock(start=WINDOW_S + 5)
    with pytest.raises(StalePacket, match="future"):
        PacketAuth("s3cret", "b", ManualClock()).open(PacketAuth("s3cret", "a", early).seal(b"{}"))


def test_packet_sender_is_covered_by_the_mac() -> None:
    """A packet re-labelled as coming from the receiver (to pass as its own) fails the MAC."""
    clock = ManualClock()
    packet = PacketAuth("s3cret", "a", clock).seal(encode(Ack(1)))
    n = struct.unpack_from("!H", packet, MAC_SIZE + 25)[0]
    relabelled = packet[: MAC_SIZE + 27] + b"b" + packet[MAC_SIZE + 27 + n :]
    with pytest.raises(AuthError, match="bad MAC"):
        PacketAuth("s3cret", "b", clock).open(relabelled)


@pytest.mark.simulation
async def test_keyed_cluster_converges_under_a_manual_clock() -> None:
    """Sealed packets carry the injected clock's wall time: a simulated cluster with a secret
    converges and keeps its members alive however far the fake clock is advanced."""
    clock = ManualClock()
    net = MemNetwork(clock, random.Random(1))
    cfg = GossipConfig(probe_interval=1.0, probe_timeout=0.5, gossip_interval=0.2,
                       push_pull_interval=5.0)
    nodes = []
    for i in range(4):
        addr = f"10.0.0.{i + 1}:1"
        g = Gossip(f"n{i}", addr, net.transport(addr), net.push_pull(addr), clock,
                   random.Random(i), cfg, secret="s3cret")
        net.serve_push_pull(addr, g.handle_push_pull)
        nodes.append(g)
    for g in nodes:
        await g.start()
    try:
        for g in nodes[1:]:
            assert await g.join([nodes[0].addr]) == 1
        for _ in range(1200):  # two minutes of fake time, four windows
            clock.advance(0.1)
            for _ in range(5):
                await asyncio.sleep(0)
        for g in nodes:
            assert {m.id: m.state for m in g.members()} == {
                f"n{i}": State.ALIVE for i in range(4)}
            assert g.stats.bad_mac == 0 and g.stats.stale == 0
            assert g.stats.packets_received > 100
    finally:
        for g in nodes:
            await g.stop()
