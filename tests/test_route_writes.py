"""The write path's route_writes over in-memory replicas: acknowledgements per consistency,
hints for replicas that miss a write, refusal before writing, and errors that must not be
retried.

Each node is a FakeBackend; the coordinator ("a") writes to its own through its LocalReplica
and to the others through RemoteReplica and FakePeers, which decodes the write's binary frame
as the receiving node would. A backend
with a closed `gate` holds its writes, which lets a test see exactly when route_writes
returns without sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import pytest

from aquila.cluster.clock import ManualClock
from aquila.cluster.membership.table import Member, State
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.errors import AquilaError, BadRequest, Unavailable
from aquila.cluster.model.hlc import HybridClock
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.cluster.peers.client import PeerError
from aquila.cluster.replication.frames import decode_write
from aquila.cluster.replication.remote import RemoteReplica
from aquila.cluster.replication.replica import LocalReplica, Replicas
from aquila.cluster.replication.writes import WritePath, needed_acks
from aquila.cluster.state.entries import ClusterState, CollectionEntry, Moving

SPEC = CollectionSpec("docs", dim=2, shards=2, replication=3, index=IndexSpec("flat"))
NODES = ["a", "b", "c", "d", "e"]
ADDR = {n: f"10.0.0.{i + 1}:7700" for i, n in enumerate(NODES)}
NODE_AT = {addr: n for n, addr in ADDR.items()}


def make_entry(
    replicas: tuple[tuple[str, ...], ...] = (("a", "b", "c"), ("b", "c", "a")),
    moving: tuple[Moving | None, ...] = (None, None),
) -> CollectionEntry:
    return CollectionEntry(SPEC, replicas, 1, "a", moving=moving, uid="uid-1")


def docs(shard: int, n: int = 3, version: int = 100, deleted: bool = False) -> list[Incoming]:
    return [
        Incoming(f"s{shard}-{i}", None if deleted else np.array([i, shard], dtype=np.float32),
                 b"" if deleted else b'{"i":%d}' % i, version, "a")
        for i in range(n)
    ]


class FakeBackend:
    """One node's shards: last-writer-wins per id, like the real store."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, int], dict[str, Incoming]] = {}
        self.ensured: list[tuple[str, list[int], str]] = []
        self.writes = 0
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()  # a write reached this node (gated or not)

    async def ensure(self, spec: CollectionSpec, shards: Iterable[int], uid: str) -> None:
        self.ensured.append((spec.name, sorted(shards), uid))

    async def write(
        self, spec: CollectionSpec, by_shard: dict[int, list[Incoming]]
    ) -> dict[int, tuple[int, int]]:
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        self.writes += 1
        out = {}
        for shard, batch in by_shard.items():
            held = self.store.setdefault((spec.name, shard), {})
            applied = deleted = 0
            for d in batch:
                old = held.get(d.id)
                if old is None or (d.version, d.writer) > (old.version, old.writer):
                    if d.vector is None and old is not None and old.vector is not None:
                        deleted += 1
                    held[d.id] = d
                    applied += 1
            out[shard] = (applied, deleted)
        return out

    def ids(self, shard: int) -> list[str]:
        return sorted(i for i, d in self.store.get((SPEC.name, shard), {}).items()
                      if d.vector is not None)


class FakePeers:
    """Routes internal write requests to the other nodes' backends."""

    def __init__(self, backends: dict[str, FakeBackend]) -> None:
        self.backends = backends
        self.down: set[str] = set()  # unreachable: PeerError, as the real client raises
        self.errors: dict[str, AquilaError] = {}  # the node answers with this error
        self.requests: list[tuple[str, str]] = []

    async def request(
        self, addr: str, method: str, path: str, body: Any = None, *, to: str | None,
        timeout: float | None = None, raw: bytes | None = None,  # noqa: ASYNC109
        max_answer: int | None = None,
    ) -> Any:
        node = NODE_AT[addr]
        assert to == node  # signed for the node expected at addr: no other may accept it
        self.requests.append((node, path))
        assert timeout is not None and timeout > 0
        if node in self.down:
            raise PeerError(f"node {addr} did not answer: ClientConnectorError")
        if node in self.errors:
            raise self.errors[node]
        assert (method, path) == ("POST", f"/internal/v1/collections/{SPEC.name}/write")
        assert body is None and raw is not None  # a write travels as a binary frame
        frame = decode_write(raw)
        assert frame.spec is not None and frame.uid is not None
        spec = CollectionSpec.from_json(frame.spec)
        assert frame.dim == spec.dim
        by_shard = frame.by_shard
        backend = self.backends[node]
        await backend.ensure(spec, list(by_shard), frame.uid)
        out = await backend.write(spec, by_shard)
        return {"shards": {str(s): [a, d] for s, (a, d) in out.items()}}


class FakeMembers:
    def __init__(self, states: dict[str, State]) -> None:
        self.states = states

    def members(self) -> list[Member]:
        return [Member(n, ADDR[n], st, 1, 0.0) for n, st in self.states.items()]


class Cluster:
    def __init__(self, states: dict[str, State] | None = None) -> None:
        self.backends = {n: FakeBackend() for n in NODES}
        self.peers = FakePeers(self.backends)
        self.members = FakeMembers(states or {n: State.ALIVE for n in NODES})

        view = MemberView("a", self.members, ManualClock())
        state = ClusterState()
        # The coordinator's own map knows the collection: its local writes are checked
        # against it (the incarnation comes from the map, see ClusterState.entry_for_write).
        state.merge([make_entry()])
        replicas = Replicas(
            "a", LocalReplica("a", cast(Any, self.backends["a"]), state),
            lambda node: RemoteReplica(node, view.addr_of, self.peers, 10.0),
        )
        self.writes = WritePath("a", state, view, replicas, HybridClock())

    def written(self) -> list[str]:
        return sorted(n for n, b in self.backends.items() if b.writes)

    def hinted(self, node: str) -> dict[tuple[str, int], list[str]]:
        """What the coordinator holds for `node` (leaves it held)."""
        taken = self.writes.hints.take(node)
        for (name, shard), ds in taken.items():
            self.writes.hints.add(node, name, shard, ds)
        return {key: sorted(d.id for d in ds) for key, ds in taken.items()}

    async def finish_background(self) -> None:
        """Let the writes still running after route_writes returned complete."""
        for b in self.backends.values():
            if b.gate is not None:
                b.gate.set()
        await self.writes.finish_background()


async def settle() -> None:
    """Run every callback that is ready; nothing here waits on time or I/O."""
    for _ in range(20):
        await asyncio.sleep(0)


BATCH = {0: docs(0), 1: docs(1)}
ALL_IDS = {0: [d.id for d in docs(0)], 1: [d.id for d in docs(1)]}


@pytest.mark.parametrize(("consistency", "replicas", "acks"),
                         [("one", 3, 1), ("quorum", 3, 2), ("all", 3, 3), ("quorum", 1, 1),
                          ("quorum", 2, 2), ("quorum", 4, 3), ("quorum", 5, 3), ("all", 1, 1)])
def test_needed_acks(consistency: str, replicas: int, acks: int) -> None:
    assert needed_acks(consistency, replicas) == acks


@pytest.mark.parametrize("consistency", ["one", "quorum", "all"])
async def test_all_replicas_alive(consistency: str) -> None:
    cl = Cluster()
    results = await cl.writes.route_writes(make_entry(), BATCH, consistency)
    assert results == {0: (3, 0), 1: (3, 0)}
    await cl.finish_background()
    assert cl.written() == ["a", "b", "c"]
    for n in "abc":
        assert cl.backends[n].ids(0) == ALL_IDS[0] and cl.backends[n].ids(1) == ALL_IDS[1]
    # One request per node, covering all its shards; the local one without the network.
    assert sorted(n for n, _ in cl.peers.requests) == ["b", "c"]
    assert cl.backends["a"].ensured == [("docs", [0, 1], "uid-1")]
    assert cl.backends["b"].ensured == [("docs", [0, 1], "uid-1")]
    assert cl.writes.hints.pending() == 0


@pytest.mark.parametrize(("consistency", "acks"), [("one", 1), ("quorum", 2), ("all", 3)])
async def test_returns_after_exactly_the_acks_it_needs(consistency: str, acks: int) -> None:
    cl = Cluster()
    for n in "abc":
        cl.backends[n].gate = asyncio.Event()
    task = asyncio.ensure_future(cl.writes.route_writes(make_entry(), BATCH, consistency))
    await settle()
    assert all(cl.backends[n].arrived.is_set() for n in "abc")  # sent to all at once
    for released, n in enumerate("abc", start=1):
        gate = cl.backends[n].gate
        assert gate is not None
        assert not task.done(), f"returned after {released - 1} ack(s), needs {acks}"
        gate.set()
        await settle()
        if released == acks:
            break
    assert task.done()
    assert await task == {0: (3, 0), 1: (3, 0)}
    await cl.finish_background()
    assert cl.written() == ["a", "b", "c"]  # the slower replicas still get the write


@pytest.mark.parametrize("consistency", ["one", "quorum"])
async def test_one_replica_unreachable_succeeds_and_hints_it(consistency: str) -> None:
    # c still looks alive (the failure detector has not noticed): the write is tried.
    cl = Cluster()
    cl.peers.down.add("c")
    results = await cl.writes.route_writes(make_entry(), BATCH, consistency)
    assert results == {0: (3, 0), 1: (3, 0)}
    await cl.finish_background()
    assert cl.written() == ["a", "b"]
    assert cl.hinted("c") == {("docs", 0): ALL_IDS[0], ("docs", 1): ALL_IDS[1]}
    assert cl.writes.hints.nodes() == ["c"]


async def test_one_replica_unreachable_fails_consistency_all() -> None:
    cl = Cluster()
    cl.peers.down.add("c")
    with pytest.raises(Unavailable, match=r"did not reach consistency 'all'.*c: node"):
        await cl.writes.route_writes(make_entry(), BATCH, "all")
    await cl.finish_background()
    # No rollback: the replicas that answered keep the write, and c gets it by hand-off.
    assert cl.written() == ["a", "b"]
    assert cl.hinted("c") == {("docs", 0): ALL_IDS[0], ("docs", 1): ALL_IDS[1]}


@pytest.mark.parametrize("state", [State.DEAD, State.LEFT])
@pytest.mark.parametrize("consistency", ["one", "quorum"])
async def test_dead_replica_is_not_asked_and_is_hinted(consistency: str, state: State) -> None:
    cl = Cluster({"a": State.ALIVE, "b": State.ALIVE, "c": state})
    results = await cl.writes.route_writes(make_entry(), BATCH, consistency)
    assert results == {0: (3, 0), 1: (3, 0)}
    await cl.finish_background()
    assert "c" not in {n for n, _ in cl.peers.requests}
    assert cl.written() == ["a", "b"]
    assert cl.hinted("c") == {("docs", 0): ALL_IDS[0], ("docs", 1): ALL_IDS[1]}


async def test_suspect_replica_is_still_written() -> None:
    cl = Cluster({"a": State.ALIVE, "b": State.ALIVE, "c": State.SUSPECT})
    await cl.writes.route_writes(make_entry(), BATCH, "all")
    assert cl.written() == ["a", "b", "c"]
    assert cl.writes.hints.pending() == 0


@pytest.mark.parametrize(
    ("states", "consistency"),
    [
        ({"a": State.ALIVE, "b": State.ALIVE, "c": State.DEAD}, "all"),
        ({"a": State.ALIVE, "b": State.DEAD, "c": State.DEAD}, "quorum"),
        ({"a": State.ALIVE, "b": State.DEAD}, "quorum"),  # c unknown to the member table
    ],
)
async def test_too_few_live_replicas_refused_before_writing(
    states: dict[str, State], consistency: str
) -> None:
    cl = Cluster(states)
    with pytest.raises(Unavailable, match=f"consistency '{consistency}' needs"):
        await cl.writes.route_writes(make_entry(), BATCH, consistency)
    await cl.finish_background()
    assert cl.written() == []
    assert cl.peers.requests == []
    assert all(not b.arrived.is_set() for b in cl.backends.values())


async def test_refused_write_leaves_no_hints() -> None:
    # Shard 0 (a, b, c) can reach quorum without c; shard 1 (a, d, e) cannot.
    cl = Cluster({"a": State.ALIVE, "b": State.ALIVE, "c": State.DEAD,
                  "d": State.DEAD, "e": State.DEAD})
    entry = make_entry(replicas=(("a", "b", "c"), ("a", "d", "e")))
    with pytest.raises(Unavailable):
        await cl.writes.route_writes(entry, BATCH, "quorum")
    assert cl.written() == []
    assert cl.writes.hints.pending() == 0


@pytest.mark.parametrize("consistency", ["one", "quorum", "all"])
async def test_non_transient_error_propagates(consistency: str) -> None:
    cl = Cluster()
    cl.peers.errors["c"] = BadRequest("vector of 's0-0' has the wrong dimension")
    for n in "ab":  # hold the others so that c's answer is the first one
        cl.backends[n].gate = asyncio.Event()
    task = asyncio.ensure_future(cl.writes.route_writes(make_entry(), BATCH, consistency))
    await settle()
    assert task.done(), "still waiting for other replicas after a non-transient error"
    with pytest.raises(BadRequest, match="wrong dimension"):
        await task
    await cl.finish_background()
    assert "c" not in cl.writes.hints.nodes()  # a bad request is not handed off either


async def test_failures_beside_a_non_transient_error_are_retrieved() -> None:
    """Replicas that fail in the same round as the one whose error is raised: their errors
    are consumed (the conftest fixture fails the test on "Task exception was never
    retrieved"), and the unreachable ones are still handed off."""
    for bad in "bc":
        cl = Cluster()
        cl.peers.errors[bad] = BadRequest("vector of 's0-0' has the wrong dimension")
        cl.peers.down.add("c" if bad == "b" else "b")
        cl.backends["a"].gate = asyncio.Event()
        with pytest.raises(BadRequest):
            await cl.writes.route_writes(make_entry(), BATCH, "all")
        await cl.finish_background()


async def test_move_target_gets_writes_but_does_not_count_as_ack() -> None:
    # Shard 0 is moving from c to d: d must receive writes, but only a, b, c acknowledge.
    cl = Cluster()
    entry = make_entry(moving=(Moving("c", "d", 0.5), None))
    c_gate = cl.backends["c"].gate = asyncio.Event()
    task = asyncio.ensure_future(cl.writes.route_writes(entry, {0: docs(0)}, "all"))
    await settle()
    assert cl.backends["d"].ids(0) == ALL_IDS[0]  # d has answered...
    assert not task.done()  # ...but "all" still waits for c
    c_gate.set()
    await settle()
    assert task.done()
    assert await task == {0: (3, 0)}

    # And a move target alone cannot make up for a missing replica.
    cl = Cluster({"a": State.ALIVE, "b": State.ALIVE, "c": State.DEAD, "d": State.ALIVE})
    with pytest.raises(Unavailable):
        await cl.writes.route_writes(entry, {0: docs(0)}, "all")
    assert cl.written() == []


async def test_deletes_report_what_was_deleted() -> None:
    cl = Cluster()
    await cl.writes.route_writes(make_entry(), {0: docs(0)}, "all")
    tombstones = {0: docs(0, n=2, version=200, deleted=True) + [
        Incoming("never-written", None, b"", 200, "a")]}
    results = await cl.writes.route_writes(make_entry(), tombstones, "all")
    assert results == {0: (3, 2)}  # three records changed, two live documents deleted
    for n in "abc":
        assert cl.backends[n].ids(0) == ["s0-2"]
