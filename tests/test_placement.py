"""Placement of new collections: table cases and properties."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.placement import (
    _with_spread_primaries,
    place,
    primary_counts,
    replica_counts,
)
from aquila.cluster.movement.plan import apply, plan

NODES = [f"n{i}" for i in range(8)]


def full_counts(counts: dict[str, int], nodes: list[str]) -> list[int]:
    return [counts.get(node, 0) for node in set(nodes)]


def spread(values: list[int]) -> int:
    return max(values) - min(values)


# --- table cases -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shards", "replication", "nodes", "expected"),
    [
        (1, 1, ["a"], [["a"]]),
        (3, 5, ["a", "b"], [["a", "b"], ["b", "a"], ["a", "b"]]),
        (2, 2, ["b", "a", "c", "d"], [["a", "b"], ["c", "d"]]),
        (4, 2, ["a", "b", "c", "d"], [["a", "b"], ["c", "d"], ["b", "a"], ["d", "c"]]),
        (3, 3, ["a", "b", "c"], [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]),
    ],
)
def test_place_table(
    shards: int, replication: int, nodes: list[str], expected: list[list[str]]
) -> None:
    # The salt is chosen so the ring starts at the first node, to keep the table readable.
    salt = next(s for s in map(str, itertools.count()) if place(1, 1, nodes, salt=s) == [["a"]])
    assert place(shards, replication, nodes, salt=salt) == expected


@pytest.mark.parametrize(
    ("shards", "replication", "nodes", "message"),
    [
        (0, 1, ["a"], "shards"),
        (1, 0, ["a"], "replication"),
        (1, 1, [], "no nodes"),
    ],
)
def test_place_rejects_bad_input(
    shards: int, replication: int, nodes: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        place(shards, replication, nodes)


def test_salt_spreads_many_small_collections() -> None:
    maps = [place(1, 1, NODES, salt=f"collection-{i}") for i in range(200)]
    counts = replica_counts(maps)
    assert set(counts) == set(NODES)
    assert max(counts.values()) <= 2 * 200 // len(NODES)


def test_duplicate_nodes_are_ignored() -> None:
    assert place(4, 2, ["a", "b", "a", "c"], salt="x") == place(4, 2, ["c", "b", "a"], salt="x")


def test_replica_counts() -> None:
    assert replica_counts([[["a", "b"], ["b"]], [["c", "a"]]]) == {"a": 2, "b": 2, "c": 1}
    assert replica_counts([]) == {}


def test_primaries_stay_even_on_every_small_ring() -> None:
    for n in range(1, 9):
        for per_shard in range(1, n + 1):
            for shards in range(1, 3 * n + 2):
                blocks = [
                    [(s * per_shard + j) % n for j in range(per_shard)] for s in range(shards)
                ]
                firsts = [0] * n
                for block in _with_spread_primaries(blocks, n):
                    firsts[block[0]] += 1
                assert spread(firsts) <= 1, (n, per_shard, shards, firsts)


# --- properties --------------------------------------------------------------------------

node_lists = st.lists(st.sampled_from(NODES), min_size=1, max_size=8, unique=True)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), node_lists, st.text(max_size=8))
def test_every_shard_gets_distinct_replicas_evenly(
    shards: int, replication: int, nodes: list[str], salt: str
) -> None:
    shard_map = place(shards, replication, nodes, salt=salt)
    assert len(shard_map) == shards
    for replicas in shard_map:
        assert len(replicas) == min(replication, len(nodes))
        assert len(set(replicas)) == len(replicas)
        assert set(replicas) <= set(nodes)
    assert spread(full_counts(replica_counts([shard_map]), nodes)) <= 1
    assert spread(full_counts(primary_counts([shard_map]), nodes)) <= 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(1, 4), node_lists, st.text(max_size=8), st.randoms())
def test_order_of_nodes_does_not_matter(
    shards: int, replication: int, nodes: list[str], salt: str, rng: random.Random
) -> None:
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    assert place(shards, replication, nodes, salt=salt) == place(
        shards, replication, shuffled, salt=salt
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(NODES[:-1]), min_size=1, max_size=6, unique=True),
    st.lists(st.tuples(st.integers(1, 12), st.integers(1, 3)), min_size=1, max_size=4),
)
def test_adding_a_node_moves_about_one_nth(nodes: list[str], specs: list[tuple[int, int]]) -> None:
    names = [f"c{i}" for i in range(len(specs))]
    replication = {name: r for name, (_, r) in zip(names, specs, strict=True)}
    before = {
        name: place(s, r, nodes, salt=name) for name, (s, r) in zip(names, specs, strict=True)
    }
    # Start from a map that is balanced across collections too, as a running cluster's is.
    before = apply(before, plan(before, replication, nodes))
    grown = [*nodes, NODES[-1]]
    moves = plan(before, replication, grown)
    added = [m for m in moves if m.from_node is None]  # replication can now be met in full
    total = sum(len(replicas) for shard_map in before.values() for replicas in shard_map)
    width = len(grown)
    assert len(moves) - len(added) <= -(-total // width) + len(specs)
    # And the moves all go to the new node, except what evening out the collections needs.
    assert sum(m.to_node == NODES[-1] for m in moves) >= len(moves) - len(added) - len(specs)
