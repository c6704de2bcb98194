"""Cluster state: entry serialisation and the last-writer-wins merge per collection."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.cluster.state.entries import ClusterState, CollectionEntry, Moving

# Deterministic: the same examples on every run, nothing stored between runs.
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)

NAMES = ["alpha", "beta", "gamma"]
NODES = ["n0", "n1", "n2", "n3"]


def spec(name: str = "alpha", shards: int = 2, replication: int = 2) -> CollectionSpec:
    return CollectionSpec(name, dim=4, metric="ip", shards=shards, replication=replication,
                          index=IndexSpec("ivf_pq", nlist=None, nprobe=8))


def entry(
    name: str = "alpha",
    epoch: int = 1,
    origin: str = "n0",
    *,
    deleted: bool = False,
    uid: str = "u1",
    replicas: tuple[tuple[str, ...], ...] = (("n0", "n1"), ("n1", "n2")),
    moving: tuple[Moving | None, ...] = (None, None),
) -> CollectionEntry:
    return CollectionEntry(spec(name), replicas, epoch, origin, deleted, moving, uid)


def through_wire(e: CollectionEntry) -> CollectionEntry:
    return CollectionEntry.from_json(orjson.loads(orjson.dumps(e.to_json())))


# --- CollectionEntry JSON -----------------------------------------------------------------


@pytest.mark.parametrize(
    "e",
    [
        entry(),
        entry(deleted=True, uid="", epoch=7, origin="n3"),
        entry(moving=(Moving("n0", "n3", 0.25), None)),
        entry(moving=(Moving(None, "n3", 0.0), Moving("n2", "n0", 1.0))),
        entry(replicas=((),), moving=()),
    ],
)
def test_entry_json_round_trip(e: CollectionEntry) -> None:
    assert through_wire(e) == e


def test_entry_json_shape() -> None:
    e = entry(moving=(Moving("n0", "n3", 1 / 3, "n5"), None), uid="abc", deleted=True)
    d = e.to_json()
    assert d["replicas"] == [["n0", "n1"], ["n1", "n2"]]
    assert d["moving"] == [{"from": "n0", "to": "n3", "progress": 0.3333, "driver": "n5"}, None]
    # The public shard map shows the contract's fields only.
    assert Moving("n0", "n3", 1 / 3, "n5").public() == {"from": "n0", "to": "n3", "progress": 0.3333}
    assert (d["epoch"], d["origin"], d["deleted"], d["uid"]) == (1, "n0", True, "abc")
    assert d["spec"]["index"] == {"type": "ivf_pq", "nlist": None, "nprobe": 8}


def test_entry_from_json_defaults_for_optional_fields() -> None:
    d = entry().to_json()
    for key in ("deleted", "moving", "uid"):
        del d[key]
    e = CollectionEntry.from_json(d)
    assert (e.deleted, e.moving, e.uid) == (False, (), "")
    assert e.move_of(0) is None


def test_shards_of_includes_move_targets() -> None:
    e = entry(replicas=(("n0", "n1"), ("n1", "n2")), moving=(None, Moving("n2", "n3", 0.5)))
    assert e.shards_of("n1") == [0, 1]
    assert e.shards_of("n3") == [1]
    assert e.shards_of("n9") == []
    assert e.move_of(1) == Moving("n2", "n3", 0.5)


moves = st.one_of(
    st.none(),
    st.builds(
        Moving,
        st.one_of(st.none(), st.sampled_from(NODES)),
        st.sampled_from(NODES),
        # to_json rounds progress to 4 places: generate values it keeps exactly.
        st.integers(0, 10_000).map(lambda i: round(i / 10_000, 4)),
    ),
)


@st.composite
def entries(draw: st.DrawFn, name: str | None = None) -> CollectionEntry:
    shards = draw(st.integers(1, 4))
    replicas = tuple(
        tuple(draw(st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True)))
        for _ in range(shards)
    )
    return CollectionEntry(
        spec(name or draw(st.sampled_from(NAMES)), shards=shards),
        replicas,
        draw(st.integers(0, 2**40)),
        draw(st.sampled_from(NODES)),
        draw(st.booleans()),
        tuple(draw(moves) for _ in range(shards)),
        draw(st.text(alphabet="0123456789abcdef", max_size=32)),
    )


@PROPERTY
@given(entries())
def test_entry_json_round_trip_property(e: CollectionEntry) -> None:
    assert through_wire(e) == e


@PROPERTY
@given(st.lists(entries(), max_size=6))
def test_encode_decode_entries_round_trip(es: list[CollectionEntry]) -> None:
    state = ClusterState()
    state.merge(es)
    decoded = ClusterState.decode_entries(state.encode())
    assert decoded == list(state.collections.values())
    assert ClusterState.decode_entries(ClusterState().encode()) == []


# --- merge: last writer wins by (epoch, origin) ---------------------------------------------


def test_merge_keeps_newer_and_reports_winners() -> None:
    state = ClusterState()
    v1, v2 = entry(epoch=1, origin="n1"), entry(epoch=2, origin="n0", uid="u2")
    assert state.merge([v1]) == [v1]
    assert state.merge([v2]) == [v2]
    assert state.merge([v1]) == []  # older: ignored
    assert state.merge([v2]) == []  # the same version again: nothing changes
    assert state.get("alpha") == v2


def test_merge_breaks_epoch_ties_by_origin() -> None:
    low, high = entry(epoch=5, origin="n1", uid="x"), entry(epoch=5, origin="n2", uid="y")
    for order in ([low, high], [high, low]):
        state = ClusterState()
        state.merge(order)
        assert state.get("alpha") == high


def test_tombstone_beats_older_entry_and_loses_to_newer() -> None:
    state = ClusterState()
    created = entry(epoch=1, origin="n0", uid="first")
    state.merge([created])
    tomb = state.next_entry(created, "n1", deleted=True)
    assert state.merge([tomb]) == [tomb]
    assert state.get("alpha") is None
    assert state.live() == {}
    assert state.collections["alpha"] == tomb  # kept as a tombstone

    # The old entry gossiped late does not resurrect the collection.
    assert state.merge([created]) == []
    assert state.get("alpha") is None

    # Created again: a newer version beats the tombstone.
    again = state.next_entry(created, "n2", uid="second")
    assert again.epoch > tomb.epoch
    assert state.merge([again]) == [again]
    assert state.get("alpha") == again
    assert state.merge([tomb]) == []
    assert state.get("alpha") == again


def test_next_entry_is_above_everything_seen() -> None:
    state = ClusterState()
    assert state.epoch == 0
    state.merge([entry("alpha", epoch=3), entry("beta", epoch=9, deleted=True),
                 entry("gamma", epoch=4)])
    assert state.epoch == 9  # tombstones count
    e = state.get("alpha")
    assert e is not None
    nxt = state.next_entry(e, "n3", replicas=(("n3",), ("n3",)))
    assert (nxt.epoch, nxt.origin, nxt.replicas) == (10, "n3", (("n3",), ("n3",)))
    assert (nxt.spec, nxt.uid, nxt.deleted) == (e.spec, e.uid, e.deleted)
    assert state.collections["alpha"] == e  # next_entry does not adopt the change itself
    assert state.merge([nxt]) == [nxt]
    assert state.next_entry(nxt, "n0").epoch == 11


def test_live_is_sorted_and_skips_tombstones() -> None:
    state = ClusterState()
    state.merge([entry("gamma"), entry("alpha"), entry("beta", deleted=True)])
    assert list(state.live()) == ["alpha", "gamma"]


@st.composite
def distinct_versions(draw: st.DrawFn) -> list[CollectionEntry]:
    """Entries with distinct (name, epoch, origin): one version is one content, as when
    every version is made by next_entry on its origin."""
    keys = draw(st.lists(
        st.tuples(st.sampled_from(NAMES), st.integers(1, 6), st.sampled_from(NODES)),
        min_size=1, max_size=12, unique=True,
    ))
    out = []
    for name, epoch, origin in keys:
        e = draw(entries(name))
        out.append(CollectionEntry(e.spec, e.replicas, epoch, origin, e.deleted, e.moving, e.uid))
    return out


def reference(es: list[CollectionEntry]) -> dict[str, CollectionEntry]:
    best: dict[str, CollectionEntry] = {}
    for e in es:
        if e.spec.name not in best or e.version > best[e.spec.name].version:
            best[e.spec.name] = e
    return best


@PROPERTY
@given(distinct_versions(), st.integers(1, 4), st.randoms(use_true_random=False), st.data())
def test_gossip_order_does_not_change_the_outcome(
    es: list[CollectionEntry], n_replicas: int, rnd: random.Random, data: Any
) -> None:
    # Each entry reaches at least one replica, some several times, in any order.
    inbox: list[list[CollectionEntry]] = [[] for _ in range(n_replicas)]
    for e in es:
        targets = data.draw(st.sets(st.integers(0, n_replicas - 1), min_size=1))
        for r in targets:
            inbox[r] += [e] * data.draw(st.integers(1, 3))
    replicas = [ClusterState() for _ in range(n_replicas)]
    for state, msgs in zip(replicas, inbox, strict=True):
        rnd.shuffle(msgs)
        # Delivered in batches of any size, as gossip and push-pull do.
        while msgs:
            cut = rnd.randint(1, len(msgs))
            state.merge(msgs[:cut])
            msgs = msgs[cut:]

    # Then everyone exchanges full state (push-pull), in any order.
    snapshots = [s.encode() for s in replicas]
    for i, state in enumerate(replicas):
        order = [j for j in range(n_replicas) if j != i]
        rnd.shuffle(order)
        for j in order:
            state.merge(ClusterState.decode_entries(snapshots[j]))

    expected = reference(es)
    for state in replicas:
        assert state.collections == expected
        assert state.epoch == max(e.epoch for e in es)


@PROPERTY
@given(distinct_versions(), st.randoms(use_true_random=False))
def test_merge_returns_each_winner_it_adopted(
    es: list[CollectionEntry], rnd: random.Random
) -> None:
    state = ClusterState()
    rnd.shuffle(es)
    seen: dict[str, CollectionEntry] = {}
    for e in es:
        changed = state.merge([e])
        newer = e.spec.name not in seen or e.version > seen[e.spec.name].version
        assert changed == ([e] if newer else [])
        if newer:
            seen[e.spec.name] = e
    assert state.collections == seen


def test_same_version_different_content_resolves_alike_everywhere() -> None:
    """Two entries under one (epoch, origin) — a node that restarted before its state was
    on disk may make them — still converge: the content digest breaks the tie."""
    a = entry(epoch=5, origin="n1", replicas=(("n1",), ("n2",)))
    b = entry(epoch=5, origin="n1", replicas=(("n2",), ("n1",)))
    first, second = ClusterState(), ClusterState()
    first.merge([a, b])
    second.merge([b, a])
    assert first.encode() == second.encode()
    assert first.get("alpha") == max(a, b, key=lambda e: e.version)
