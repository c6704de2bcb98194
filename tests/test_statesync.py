"""The incremental cluster-state push-pull: digests first, only missing entries after, and the
previous version's full-state exchange still answered."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.state.entries import ClusterState, CollectionEntry
from aquila.cluster.state.runtime import StateReplica
from aquila.cluster.state.statesync import (
    MAX_SYNC_ROWS,
    REPLY,
    REQUEST,
    Sync,
    decode_sync,
    encode_sync,
    newer_than,
)

NODES = ("node-a", "node-b", "node-c")


def entry(name: str, epoch: int, origin: str = "node-a", shards: int = 4) -> CollectionEntry:
    replicas = tuple((NODES[s % 3], NODES[(s + 1) % 3]) for s in range(shards))
    return CollectionEntry(
        CollectionSpec(name, dim=8, shards=shards, replication=2), replicas, epoch, origin,
        moving=tuple(None for _ in replicas), uid=f"{name}-{epoch}",
    )


def replica(node: str, *entries: CollectionEntry) -> StateReplica:
    r = StateReplica(node)
    r.merge(list(entries))
    return r


def exchange(initiator: StateReplica, responder: StateReplica) -> tuple[int, int]:
    """One push-pull as Gossip does it (request, merge + answer, merge); the two sizes."""
    request = initiator.delegate.local_state()
    responder.delegate.merge_remote_state(request)
    reply = responder.delegate.local_state()
    initiator.delegate.merge_remote_state(reply)
    return len(request), len(reply)


def versions(r: StateReplica) -> dict[str, tuple[int, str, str]]:
    return {n: e.version for n, e in r.state.collections.items()}


def test_in_sync_replicas_exchange_digests_only() -> None:
    entries = [entry(f"c{i}", i + 1, shards=64) for i in range(20)]
    a, b = replica("node-a", *entries), replica("node-b", *entries)
    full = len(a.state.encode())
    request, reply = exchange(a, b)
    # Twenty 64-shard entries are ~60 KB; their digests are ~1.5 KB each way.
    assert request < full / 20 and reply < full / 20
    assert versions(a) == versions(b)


def test_reply_carries_what_the_requester_lacks_and_older() -> None:
    a = replica("node-a", entry("x", 1), entry("y", 5))
    b = replica("node-b", entry("x", 3, "node-b"), entry("z", 2))
    exchange(a, b)
    assert versions(a) == versions(b) | {"y": a.state.collections["y"].version}
    # b lacks y: a learnt it from b's digest and pushes it with its next request.
    exchange(a, b)
    assert versions(a) == versions(b)


def test_a_change_made_here_rides_the_next_requests() -> None:
    a, b, c = replica("node-a"), replica("node-b"), replica("node-c")
    new = entry("fresh", 1)
    a.publish(new)
    exchange(a, b)
    exchange(a, c)
    assert "fresh" in b.state.collections and "fresh" in c.state.collections


async def test_previous_version_peers_get_and_give_the_whole_state() -> None:
    a = replica("node-a", entry("x", 2))
    old_request = orjson.dumps([entry("y", 1).to_json()])  # what a v1 node sends
    a.delegate.merge_remote_state(old_request)
    answer = orjson.loads(a.delegate.local_state())
    assert isinstance(answer, list) and {d["spec"]["name"] for d in answer} == {"x", "y"}
    # A v1 reply to our request is merged, and does not turn our next request into v1.
    a.delegate.merge_remote_state(orjson.dumps([entry("z", 1).to_json()]))
    await asyncio.sleep(0)
    assert "z" in a.state.collections
    assert isinstance(decode_sync(a.delegate.local_state()), Sync)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"format": 2, "kind": "request", "digest": [["x", "1", "a", "h"]], "entries": []}',
        b'{"format": 2, "kind": "shout", "digest": [], "entries": []}',
        b'{"format": 3, "kind": "request", "digest": [], "entries": []}',
        b'{"format": 2, "kind": "reply", "digest": {}, "entries": []}',
        b'{"format": 2, "kind": "reply", "digest": [], "entries": [{"spec": 1}]}',
        # Digests are bounded like entries: name, epoch, origin and hash are all checked.
        b'{"format": 2, "kind": "reply", "digest": [["x", 1e300, "a", "h"]], "entries": []}',
        b'{"format": 2, "kind": "reply", "digest": [["x", true, "a", "h"]], "entries": []}',
        b'{"format": 2, "kind": "reply", "digest": [["x", 9223372036854775807, "a", "h"]],'
        b' "entries": []}',
        b'{"format": 2, "kind": "reply", "digest": [["../x", 1, "a", "h"]], "entries": []}',
        b'{"format": 2, "kind": "reply", "digest": [["x", 1, "", "h"]], "entries": []}',
        b'{"format": 2, "kind": "reply", "digest": [["x", 1, "a", "' + b"h" * 17 + b'"]],'
        b' "entries": []}',
        b'{"format": 2, "kind": "reply", "digest": [["x", 1, "a"]], "entries": []}',
        b'{"format": 2, "kind": "reply", "digest": [], "entries": {}}',
        b"[1, 2]",
        b"not json",
    ],
)
def test_malformed_sync_is_ignored(raw: bytes) -> None:
    a = replica("node-a", entry("x", 1))
    before = versions(a)
    a.delegate.merge_remote_state(raw)
    assert versions(a) == before
    assert decode_sync(a.delegate.local_state()).kind == REQUEST  # type: ignore[union-attr]


names = st.sampled_from(["a", "b", "c", "d"])
states = st.lists(st.tuples(names, st.integers(1, 4), st.sampled_from(NODES)), max_size=6)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(states, states)
def test_one_exchange_brings_the_requester_up_to_the_replier(
    mine: list[tuple[str, int, str]], theirs: list[tuple[str, int, str]]
) -> None:
    a = replica("node-a", *(entry(n, e, o) for n, e, o in mine))
    b = replica("node-b", *(entry(n, e, o) for n, e, o in theirs))
    union = ClusterState()
    union.merge(list(a.state.collections.values()) + list(b.state.collections.values()))
    exchange(a, b)
    assert versions(a) == {n: e.version for n, e in union.collections.items()}
    # The reply held exactly what the requester lacked: after it, b has nothing newer.
    assert newer_than(b.state, {n: e.version for n, e in a.state.collections.items()}) == []
    # And a knows b's gaps: a second exchange brings b up too.
    exchange(a, b)
    assert versions(b) == versions(a)


def test_a_digest_longer_than_its_bound_is_refused() -> None:
    rows = [[f"c{i}", 1, "a", "h"] for i in range(MAX_SYNC_ROWS + 1)]
    raw = orjson.dumps({"format": 2, "kind": "reply", "digest": rows, "entries": []})
    with pytest.raises(ValueError, match="at most"):
        decode_sync(raw)


def test_an_unroutable_entry_is_refused_as_in_a_full_state() -> None:
    broken = entry("x", 1).to_json()
    broken["replicas"] = broken["replicas"][:-1]  # a shard without nodes
    raw = orjson.dumps({"format": 2, "kind": "reply", "digest": [], "entries": [broken]})
    with pytest.raises(ValueError):
        decode_sync(raw)
    with pytest.raises(ValueError):
        ClusterState.decode_entries(orjson.dumps([broken]))


def test_encoded_sync_round_trips() -> None:
    state = ClusterState()
    state.merge([entry("x", 1), entry("y", 2)])
    msg = decode_sync(encode_sync(REPLY, state, [state.collections["y"]]))
    assert isinstance(msg, Sync) and msg.kind == REPLY
    assert msg.digest == {n: e.version for n, e in state.collections.items()}
    assert msg.entries == [state.collections["y"]]


def test_gossiped_news_is_passed_on_and_old_news_is_not() -> None:
    a = replica("node-a", entry("x", 1))
    new = orjson.dumps([entry("y", 1).to_json()])
    a.delegate.notify_msg(new)
    assert "y" in a.state.collections
    assert a.delegate.get_broadcasts(1400) == [new]
    b = replica("node-b", entry("y", 1))
    b.delegate.notify_msg(new)  # already known: nothing to pass on
    assert b.delegate.get_broadcasts(1400) == []
