"""The replica seam: one contract, answered alike by this node's replica and by a peer's over
the wire codecs; and the in-memory storage twin checked against the real engine.

`replica` is node a's copies as seen from a itself (LocalReplica) or from node b
(RemoteReplica → MemoryPeers → JSON → a's PeerService → a's LocalReplica). Every test runs
both ways and must see the same thing.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.clock import ManualClock
from aquila.cluster.membership.memnet import MemNetwork
from aquila.cluster.model.digests import BUCKETS, bucket_of
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.errors import BadRequest, NotFound, Unauthorized, Unavailable
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.hlc import HybridClock
from aquila.cluster.model.operations import SearchRequest
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.cluster.peers.client import PeerError
from aquila.cluster.peers.memory import MemoryPeerNet
from aquila.cluster.replication.membackend import MemoryBackend
from aquila.cluster.replication.remote import PeerService, RemoteReplica
from aquila.cluster.replication.replica import LocalReplica, Replica, Replicas
from aquila.cluster.state.entries import ClusterState, CollectionEntry
from aquila.node.blocking import Blocking
from aquila.node.storage.backend import EngineBackend
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine

SPEC = CollectionSpec("c", 4, "l2", 3, 1, IndexSpec("flat"))
ADDR = {"a": "10.0.0.1:1", "b": "10.0.0.2:1"}


def doc(i: int, version: int = 10, writer: str = "a", deleted: bool = False,
        value: float | None = None) -> Incoming:
    v = float(i) if value is None else value
    return Incoming(f"d{i}", None if deleted else np.array([v, 1, 0, 0], np.float32),
                    b"" if deleted else b'{"i":%d}' % i, version, writer)


def request(q: list[list[float]], k: int = 3, flt: Any = None,
            vector: bool = False) -> SearchRequest:
    return SearchRequest(np.asarray(q, np.float32), k, None, flt, parse_filter(flt), True,
                         vector, True, None)


class Pair:
    """Node a holding shards 0 and 1 of SPEC (shard 2 is b's); b only talks to it."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.net = MemNetwork(self.clock, random.Random(0))
        self.hub = MemoryPeerNet(self.net, self.clock)
        self.state = ClusterState()
        self.state.merge([CollectionEntry(SPEC, (("a",), ("a",), ("b",)), 1, "a", uid="u1")])
        self.backend = MemoryBackend()
        self.local = LocalReplica("a", self.backend, self.state)
        self.hlc = HybridClock()
        self.hub.serve(ADDR["a"],
                       PeerService("a", self.local, self.state, self.state.merge, self.hlc))
        self.addrs: dict[str, str] = dict(ADDR)
        self.remote = RemoteReplica("a", self.addrs.get, self.hub.client(ADDR["b"]), 5.0)


@pytest.fixture(params=["local", "remote"])
def pair(request: pytest.FixtureRequest) -> tuple[Pair, Replica]:
    p = Pair()
    return p, (p.local if request.param == "local" else p.remote)


async def test_write_opens_the_shards_and_applies_last_writer_wins(
    pair: tuple[Pair, Replica],
) -> None:
    p, rep = pair
    assert await rep.write(SPEC, "u1", {0: [doc(1), doc(2)], 1: [doc(3)]}) == {0: (2, 0),
                                                                                1: (1, 0)}
    assert p.backend.local_shards("c") == [0, 1]
    # Older versions change nothing; a newer one, or the same version by a larger writer, wins.
    assert await rep.write(SPEC, "u1", {0: [doc(1, 5, value=9.0), doc(2, 10, "b", value=8.0)]}) \
        == {0: (1, 0)}
    got = await rep.get(SPEC, 0, "d2")
    assert got is not None and np.frombuffer(got.vector, "<f4")[0] == 8.0
    assert got.metadata == b'{"i":2}'
    one = await rep.get(SPEC, 0, "d1")
    assert one is not None and np.frombuffer(one.vector, "<f4")[0] == 1.0
    # A delete is a tombstone; deleting what is not there is recorded but deletes nothing.
    assert await rep.write(SPEC, "u1", {0: [doc(1, 20, deleted=True),
                                            doc(7, 20, deleted=True)]}) == {0: (1, 1)}
    assert await rep.get(SPEC, 0, "d1") is None
    assert await rep.get(SPEC, 0, "absent") is None
    assert (await rep.stats("c"))[0]["count"] == 1


async def test_only_this_nodes_map_decides_what_a_write_may_change(
    pair: tuple[Pair, Replica],
) -> None:
    p, rep = pair
    # Another incarnation, other settings, an unknown collection: refused, nothing opened.
    with pytest.raises(Unavailable, match="another incarnation"):
        await rep.write(SPEC, "u0", {0: [doc(1)]})
    other = CollectionSpec("c", 4, "ip", 3, 1, IndexSpec("flat"))
    with pytest.raises(Unavailable, match="another incarnation"):
        await rep.write(other, "u1", {0: [doc(1)]})
    with pytest.raises(Unavailable, match="not in this node's cluster map"):
        await rep.write(CollectionSpec("zz", 4), "u1", {0: [doc(1)]})
    # A shard the map gives another node is not created here.
    with pytest.raises(Unavailable, match="not open on this node"):
        await rep.write(SPEC, "u1", {2: [doc(2)]})
    assert p.backend.local_shards("c") == []
    await rep.write(SPEC, "u1", {0: [doc(1)]})
    with pytest.raises(Unavailable, match=r"\[2\] of 'c' are not on this node"):
        await rep.write(SPEC, "u1", {2: [doc(2)]})
    assert p.backend.local_shards("c") == [0]


async def test_remote_write_advances_the_receivers_version_clock() -> None:
    p = Pair()
    future = p.hlc.next() + 1_000_000
    await p.remote.write(SPEC, "u1", {0: [doc(1, version=future)]})
    assert p.hlc.next() > future


async def test_search_merges_the_asked_shards_only(pair: tuple[Pair, Replica]) -> None:
    p, rep = pair
    await rep.write(SPEC, "u1", {0: [doc(1), doc(2)], 1: [doc(3), doc(4)]})
    rows = await rep.search(SPEC, request([[2.9, 1, 0, 0], [0, 1, 0, 0]]), [0, 1], 5.0)
    assert [[h.id for h in row] for row in rows] == [["d3", "d2", "d4"], ["d1", "d2", "d3"]]
    assert [h.shard for h in rows[0]] == [1, 0, 1]
    assert rows[0][0].score == pytest.approx(0.01, abs=1e-5)
    assert rows[0][0].metadata == b'{"i":3}' and rows[0][0].vector == b""
    rows = await rep.search(SPEC, request([[2.9, 1, 0, 0]], vector=True), [0], 5.0)
    assert [h.id for h in rows[0]] == ["d2", "d1"]
    assert np.frombuffer(rows[0][0].vector, "<f4").tolist() == [2, 1, 0, 0]
    rows = await rep.search(SPEC, request([[2.9, 1, 0, 0]], flt={"must": [{"key": "i", "range": {"gte": 2}}]}), [0, 1], 5.0)
    assert [h.id for h in rows[0]] == ["d3", "d2", "d4"]
    rows = await rep.search(SPEC, request([[2.9, 1, 0, 0]], flt={"must": [{"key": "i", "match": 1}]}), [0, 1], 5.0)
    assert [h.id for h in rows[0]] == ["d1"]


async def test_a_shard_not_held_is_unavailable(pair: tuple[Pair, Replica]) -> None:
    p, rep = pair
    await rep.write(SPEC, "u1", {0: [doc(1)]})
    with pytest.raises(Unavailable, match=r"\[2\]"):
        await rep.search(SPEC, request([[0, 0, 0, 0]]), [0, 2], 5.0)


async def test_stream_pages_digests_buckets_and_purge(pair: tuple[Pair, Replica]) -> None:
    p, rep = pair
    docs = [doc(i) for i in range(25)]
    await rep.write(SPEC, "u1", {0: docs})
    await rep.write(SPEC, "u1", {0: [doc(3, 30, deleted=True)]})
    seen: list[Incoming] = []
    after: str | None = None
    pages = 0
    while True:
        page, after = await rep.stream(SPEC, 0, after, 10)
        seen += page
        pages += 1
        if after is None:
            break
    assert pages == 3
    assert [d.id for d in seen] == sorted(d.id for d in docs)
    tomb = next(d for d in seen if d.id == "d3")
    assert tomb.vector is None and tomb.version == 30  # tombstones travel, versions kept
    live = next(d for d in seen if d.id == "d4")
    assert live.vector is not None and live.vector.tolist() == [4, 1, 0, 0]
    assert (live.metadata, live.version, live.writer) == (b'{"i":4}', 10, "a")

    digests = await rep.digests(SPEC, 0, BUCKETS)
    assert len(digests) == BUCKETS and digests == await p.local.digests(SPEC, 0, BUCKETS)
    wanted = sorted({bucket_of("d3"), bucket_of("d4")})
    got = await rep.bucket_records(SPEC, 0, wanted, BUCKETS)
    assert {"d3", "d4"} <= {d.id for d in got}
    assert all(bucket_of(d.id) in wanted for d in got)

    assert await rep.purge(SPEC, 0, 31) == 1
    assert await rep.digests(SPEC, 0, BUCKETS) != digests
    assert await rep.purge(SPEC, 0, 31) == 0


async def test_drop_shard_refuses_a_shard_the_map_still_assigns(
    pair: tuple[Pair, Replica],
) -> None:
    p, rep = pair
    await rep.write(SPEC, "u1", {0: [doc(1)]})
    # A copy of shard 2, which the map gives to b (left over from a move, say).
    await p.backend.ensure(SPEC, [2], "u1")
    await p.backend.write(SPEC, {2: [doc(2)]})
    with pytest.raises(Unavailable, match="still assigned"):
        await rep.drop_shard("c", 0)
    await rep.drop_shard("c", 2)
    assert p.backend.local_shards("c") == [0]


async def test_remote_errors_keep_their_kind() -> None:
    p = Pair()
    # Unknown collection on the serving node: a 404 it says, not a failure to reach it.
    with pytest.raises(NotFound, match="10.0.0.1:1: collection 'zz'"):
        await p.remote.get(CollectionSpec("zz", 4), 0, "x")
    # Another node's malformed answer is a bad request of the caller, as over HTTP.
    with pytest.raises(BadRequest, match="malformed peer request"):
        await p.hub.client(ADDR["b"]).request(ADDR["a"], "POST",
                                              "/internal/v1/collections/c/get", {"id": "x"},
                                              to="a")
    # A request meant for another node is refused, as a signature naming it would be.
    with pytest.raises(Unauthorized):
        await p.hub.client(ADDR["b"]).request(ADDR["a"], "GET",
                                              "/internal/v1/collections/c/stats", to="z")
    # A node that is not (or no longer) a member, or does not listen, is transient.
    del p.addrs["a"]
    with pytest.raises(Unavailable, match="unknown"):
        await p.remote.get(SPEC, 0, "x")
    await p.remote.drop_shard("c", 2)  # gone: nothing to drop
    p.addrs["a"] = ADDR["a"]
    p.hub.stop(ADDR["a"])
    with pytest.raises(PeerError, match="did not answer"):
        await p.remote.stats("c")


async def test_a_paused_peer_hangs_until_the_timeout_on_the_clock() -> None:
    p = Pair()
    p.net.pause(ADDR["a"])
    fut = asyncio.ensure_future(p.remote.stats("c", timeout=2.0))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not fut.done()
    p.clock.advance(2.0)
    with pytest.raises(PeerError, match="TimeoutError"):
        await fut


def test_replicas_of_answers_local_for_this_node_only() -> None:
    p = Pair()
    made: list[str] = []

    def remote(node: str) -> Replica:
        made.append(node)
        return p.remote

    reps = Replicas("a", p.local, remote)
    assert reps.of("a") is p.local
    assert reps.of("b") is p.remote and reps.of("b") is p.remote
    assert made == ["b"]  # one client per peer, kept


# -- the in-memory twin against the real engine ----------------------------------------------
@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[EngineBackend]:
    blocking = Blocking(2)
    eng = Engine(tmp_path, blocking, Tuning(), fsync=False)
    await eng.start()
    yield EngineBackend(eng)
    await eng.close()
    blocking.close()


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
async def test_memory_backend_answers_as_the_engine_does(engine: EngineBackend, metric: str) -> None:
    spec = CollectionSpec("c", 8, metric, 3, 1, IndexSpec("flat"))
    mem = MemoryBackend()
    rng = np.random.default_rng(5)
    writes: dict[int, list[Incoming]] = {0: [], 1: [], 2: []}
    for i in range(120):
        v = rng.standard_normal(8).astype(np.float32)
        writes[shard_of(f"id{i}", 3)].append(
            Incoming(f"id{i}", v, b'{"g":%d}' % (i % 4), 100 + i, "n1"))
    # Overwrites (newer and stale) and deletes, some of ids never written.
    zero = [d.id for d in writes[0]]
    later = {0: [Incoming(zero[0], None, b"", 500, "n1"), Incoming("nope", None, b"", 500, "n1"),
                 Incoming(zero[1], rng.standard_normal(8).astype(np.float32), b'{"g":9}', 501,
                          "n2"),
                 Incoming(zero[2], rng.standard_normal(8).astype(np.float32), b'{"g":9}', 1,
                          "n2")]}
    for backend in (engine, mem):
        await backend.ensure(spec, [0, 1, 2], "u")
        assert await backend.write(spec, writes) == {s: (len(d), 0) for s, d in writes.items()}
        assert await backend.write(spec, later) == {0: (2, 1)}
    assert engine.shard_stats("c") == mem.shard_stats("c")
    for s in range(3):
        assert await engine.shard_digests(spec, s, BUCKETS) == await mem.shard_digests(spec, s, BUCKETS)
        a, a_next = await engine.stream_shard(spec, s, "id2", 15)
        b, b_next = await mem.stream_shard(spec, s, "id2", 15)
        assert a_next == b_next
        assert [(d.id, d.version, d.writer, d.metadata) for d in a] == \
            [(d.id, d.version, d.writer, d.metadata) for d in b]
        assert await engine.bucket_records(spec, s, [1, 5, 9], 16) is not None
        assert [d.id for d in await engine.bucket_records(spec, s, [1, 5, 9], 16)] == \
            [d.id for d in await mem.bucket_records(spec, s, [1, 5, 9], 16)]
    q = rng.standard_normal((4, 8)).astype(np.float32)
    for predicate in (None, parse_filter({"must": [{"key": "g", "in": [1, 9]}]})):
        a_rows = await engine.search(spec, q, 5, None, predicate, [0, 2], True)
        b_rows = await mem.search(spec, q, 5, None, predicate, [0, 2], True)
        for ra, rb in zip(a_rows, b_rows, strict=True):
            assert [(h.id, h.shard, h.metadata, h.vector) for h in ra] == \
                [(h.id, h.shard, h.metadata, h.vector) for h in rb]
            assert [h.score for h in ra] == pytest.approx([h.score for h in rb], rel=1e-4,
                                                          abs=1e-4)
    g_a = await engine.get(spec, 0, zero[1])
    g_b = await mem.get(spec, 0, zero[1])
    assert g_a is not None and g_b is not None
    assert (g_a.metadata, g_a.vector) == (g_b.metadata, g_b.vector)
    assert await engine.get(spec, 0, zero[0]) is None and await mem.get(spec, 0, zero[0]) is None
    assert await engine.purge_tombstones(spec, 0, 1000) == await mem.purge_tombstones(spec, 0, 1000) == 2
    assert await engine.shard_digests(spec, 0, BUCKETS) == await mem.shard_digests(spec, 0, BUCKETS)
