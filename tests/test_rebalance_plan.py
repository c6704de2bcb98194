"""The rebalance planner: table cases worked out by hand, and properties against a brute-force
optimum on small clusters."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.placement import place
from aquila.cluster.movement.plan import Move, apply, plan

Maps = dict[str, list[list[str]]]


def counts(maps: Mapping[str, list[list[str]]], live: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per collection, the number of replicas on each live node (zeros included)."""
    out = {name: dict.fromkeys(live, 0) for name in maps}
    for name, shard_map in maps.items():
        for replicas in shard_map:
            for node in replicas:
                if node in out[name]:
                    out[name][node] += 1
    return out


def spread(values: Sequence[int]) -> int:
    return max(values) - min(values) if values else 0


def assert_balanced(maps: Mapping[str, list[list[str]]], live: Sequence[str]) -> None:
    per = counts(maps, live)
    for name, by_node in per.items():
        assert spread(list(by_node.values())) <= 1, (name, by_node)
    overall = [sum(per[name][node] for name in per) for node in live]
    assert spread(overall) <= 1, overall


def final_sizes(
    maps: Mapping[str, list[list[str]]], replication: Mapping[str, int], live: Sequence[str]
) -> dict[str, list[int]]:
    """How many live replicas each shard should end with (see `plan`'s docstring)."""
    width = len(set(live))
    return {
        name: [min(width, max(min(replication[name], width), len(r))) for r in shard_map]
        for name, shard_map in maps.items()
    }


def fixes(
    maps: Mapping[str, list[list[str]]], replication: Mapping[str, int], live: Sequence[str]
) -> int:
    """Replicas that are dead or missing and can be placed: one move each, whatever happens."""
    sizes = final_sizes(maps, replication, live)
    return sum(
        sizes[name][s] - sum(1 for node in replicas if node in live)
        for name, shard_map in maps.items()
        for s, replicas in enumerate(shard_map)
    )


def placeable(
    pending: Mapping[int, int], holders: Mapping[int, set[str]], room: Mapping[str, int]
) -> int:
    """How many pending replicas (shard → count) can go to nodes with room, at most one per
    shard and node and none to a node already holding the shard: a max flow, by augmenting
    paths over (shard, node) pairs."""
    assigned: dict[tuple[int, str], bool] = {}
    used = dict.fromkeys(room, 0)
    placed = 0

    def augment(shard: int, seen: set[str]) -> bool:
        for node in sorted(room):
            if node in holders[shard] or assigned.get((shard, node)) or node in seen:
                continue
            seen.add(node)
            if used[node] < room[node]:
                used[node] += 1
                assigned[(shard, node)] = True
                return True
            # Take the node's slot from another shard if that one can go elsewhere.
            for (other, where), on in list(assigned.items()):
                if on and where == node and augment(other, seen):
                    assigned[(other, node)] = False
                    assigned[(shard, node)] = True
                    return True
        return False

    for shard, want in sorted(pending.items()):
        for _ in range(want):
            placed += augment(shard, set())
    return placed


def optimum(
    maps: Mapping[str, list[list[str]]], replication: Mapping[str, int], live: Sequence[str]
) -> int:
    """The fewest moves, by trying every balanced target (small clusters only).

    For a target, every dead or missing replica costs a move; so does every replica above
    target on a node; and so does every pending replica that cannot land on a node below
    target (it lands elsewhere and pushes something on).
    """
    live = sorted(set(live))
    width = len(live)
    per = counts(maps, live)
    sizes = final_sizes(maps, replication, live)
    names = sorted(maps)
    totals = {name: sum(sizes[name]) for name in names}
    pending = {
        name: {
            s: sizes[name][s] - sum(1 for node in replicas if node in live)
            for s, replicas in enumerate(maps[name])
        }
        for name in names
    }
    holders = {name: {s: set(r) for s, r in enumerate(maps[name])} for name in names}
    best: int | None = None
    choices = [itertools.combinations(live, totals[name] % width) for name in names]
    for extra_sets in itertools.product(*choices):
        extras = [sum(node in chosen for chosen in extra_sets) for node in live]
        if spread(extras) > 1:
            continue
        cost = 0
        for name, chosen in zip(names, extra_sets, strict=True):
            target = {node: totals[name] // width + (node in chosen) for node in live}
            cost += sum(max(0, per[name][node] - target[node]) for node in live)
            room = {node: max(0, target[node] - per[name][node]) for node in live}
            wanted = sum(pending[name].values())
            cost += wanted + wanted - placeable(pending[name], holders[name], room)
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


def check_plan(maps: Maps, replication: Mapping[str, int], live: Sequence[str]) -> list[Move]:
    """Run `plan` and assert everything the planner promises about its result."""
    moves = plan(maps, replication, live)
    after = apply(maps, moves)
    live_set = set(live)
    assert_balanced(after, sorted(live_set))
    sizes = final_sizes(maps, replication, live)
    for name, shard_map in after.items():
        assert len(shard_map) == len(maps[name])
        for s, replicas in enumerate(shard_map):
            assert len(set(replicas)) == len(replicas), replicas
            alive = [node for node in replicas if node in live_set]
            assert len(alive) == sizes[name][s]
            assert len(alive) >= min(replication[name], len(live_set))
            dead = [node for node in replicas if node not in live_set]
            if dead:
                # Only where every live node already holds the shard: nowhere to go.
                assert set(alive) == live_set
    for move in moves:
        assert move.to_node in live_set
    assert plan(after, replication, live) == []
    return moves


# --- table cases -------------------------------------------------------------------------


def test_balanced_map_with_all_nodes_live_needs_nothing() -> None:
    maps = {"docs": [["a", "b"], ["b", "c"], ["c", "a"]]}
    assert plan(maps, {"docs": 2}, ["a", "b", "c"]) == []


def test_dead_node_replicas_are_replaced_in_place() -> None:
    maps = {"docs": [["a", "b"], ["b", "c"], ["c", "a"]]}
    moves = check_plan(maps, {"docs": 2}, ["a", "b"])
    assert moves == [Move("docs", 1, "c", "a"), Move("docs", 2, "c", "b")]
    assert apply(maps, moves) == {"docs": [["a", "b"], ["b", "a"], ["b", "a"]]}


def test_dead_replica_goes_to_the_node_below_target() -> None:
    # c died; d is new and empty, so the replacement goes to d and nothing else moves.
    maps = {"docs": [["a", "b"], ["b", "c"], ["c", "a"]]}
    moves = check_plan(maps, {"docs": 2}, ["a", "b", "d"])
    assert moves == [Move("docs", 1, "c", "d"), Move("docs", 2, "c", "d")]


def test_shard_with_no_live_replica_still_names_the_dead_node() -> None:
    maps = {"docs": [["c"], ["a"]]}
    assert check_plan(maps, {"docs": 1}, ["a", "b"]) == [Move("docs", 0, "c", "b")]


def test_missing_replicas_are_added() -> None:
    maps = {"docs": [["a"], ["a"]]}
    moves = check_plan(maps, {"docs": 2}, ["a", "b", "c"])
    assert moves == [Move("docs", 0, None, "b"), Move("docs", 1, None, "c")]


def test_new_node_takes_its_share_and_no_more() -> None:
    maps = {"docs": [["a"], ["b"], ["a"], ["b"]]}
    moves = check_plan(maps, {"docs": 1}, ["a", "b", "c"])
    assert len(moves) == 1
    assert moves[0].to_node == "c"


def test_balance_across_collections() -> None:
    # Each collection is balanced on its own (1 vs 0), but a holds both.
    maps = {"x": [["a"]], "y": [["a"]]}
    moves = check_plan(maps, {"x": 1, "y": 1}, ["a", "b"])
    assert len(moves) == 1
    assert (moves[0].from_node, moves[0].to_node) == ("a", "b")


def test_moves_from_most_to_least_loaded() -> None:
    # Six single-replica shards: a holds 3, b 2, c 1; the one move is from a to c.
    maps = {"x": [["a"], ["a"], ["a"], ["b"], ["b"], ["c"]]}
    moves = check_plan(maps, {"x": 1}, ["a", "b", "c"])
    assert moves == [Move("x", 0, "a", "c")]


def test_cannot_drop_a_dead_replica_when_every_live_node_holds_the_shard() -> None:
    maps = {"docs": [["a", "b", "c"]]}
    assert check_plan(maps, {"docs": 3}, ["a", "b"]) == []


def test_replicas_beyond_the_factor_are_left_alone() -> None:
    maps = {"docs": [["a", "b", "c"], ["a", "b", "c"]]}
    assert plan(maps, {"docs": 1}, ["a", "b", "c"]) == []


def test_no_live_nodes_means_no_moves() -> None:
    assert plan({"docs": [["a"]]}, {"docs": 1}, []) == []


def test_counted_by_hand_matches_optimum() -> None:
    # Two collections, four nodes, d new and e dead. x: 4 shards r=2 (8 replicas → 2 each);
    # y: 2 shards r=1 (2 replicas → 2 nodes get one). e's two replicas must move (2 moves);
    # a has 4 of x where 2 is the target (2 moves). Overall 10 replicas on 4 nodes → 2 or 3.
    maps = {
        "x": [["a", "b"], ["a", "c"], ["a", "e"], ["a", "b"]],
        "y": [["e"], ["c"]],
    }
    replication = {"x": 2, "y": 1}
    live = ["a", "b", "c", "d"]
    moves = check_plan(maps, replication, live)
    assert len(moves) == 4 == optimum(maps, replication, live)


def test_plan_does_not_depend_on_the_order_of_live_nodes() -> None:
    maps = {"x": [["a", "b"], ["c", "d"], ["a", "e"]], "y": [["b"], ["b"], ["b"]]}
    replication = {"x": 2, "y": 1}
    assert plan(maps, replication, ["a", "b", "c", "f"]) == plan(
        maps, replication, ["f", "c", "b", "a", "a"]
    )


@pytest.mark.parametrize(
    ("maps", "replication", "message"),
    [
        ({"x": [["a"]]}, {}, "no replication factor"),
        ({"x": [["a"]]}, {"x": 0}, "at least 1"),
        ({"x": [["a", "a"]]}, {"x": 2}, "twice"),
    ],
)
def test_plan_rejects_bad_input(maps: Maps, replication: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(maps, replication, ["a", "b"])


@pytest.mark.parametrize(
    ("move", "message"),
    [
        (Move("nope", 0, None, "b"), "unknown collection"),
        (Move("x", 3, None, "b"), "no shard"),
        (Move("x", 0, None, "a"), "already holds"),
        (Move("x", 0, "c", "b"), "holds no replica"),
    ],
)
def test_apply_rejects_moves_that_do_not_fit(move: Move, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply({"x": [["a"]]}, [move])


def test_apply_does_not_modify_its_input() -> None:
    maps = {"x": [["a", "b"]]}
    after = apply(maps, [Move("x", 0, "a", "c"), Move("x", 0, None, "d")])
    assert after == {"x": [["c", "b", "d"]]}
    assert maps == {"x": [["a", "b"]]}


# --- properties --------------------------------------------------------------------------

POOL = ["n0", "n1", "n2", "n3", "n4", "n5"]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[Maps, dict[str, int], list[str]]:
    """Arbitrary small maps: dead nodes, missing and extra replicas, skewed load."""
    live = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=5, unique=True))
    names = draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=3, unique=True))
    maps: Maps = {}
    replication: dict[str, int] = {}
    for name in names:
        replication[name] = draw(st.integers(1, 3))
        shards = draw(st.integers(1, 4))
        maps[name] = [
            draw(st.lists(st.sampled_from(POOL), max_size=replication[name] + 1, unique=True))
            for _ in range(shards)
        ]
    return maps, replication, live


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_plan_makes_any_map_whole_balanced_and_stable(
    cluster: tuple[Maps, dict[str, int], list[str]],
) -> None:
    maps, replication, live = cluster
    check_plan(maps, replication, live)


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_plan_uses_the_fewest_moves(cluster: tuple[Maps, dict[str, int], list[str]]) -> None:
    maps, replication, live = cluster
    moves = plan(maps, replication, live)
    # The simple bound first: every dead or missing replica costs one move, and every
    # replica above ⌈T/L⌉ of its collection on a node must move.
    per = counts(maps, sorted(set(live)))
    sizes = final_sizes(maps, replication, live)
    width = len(set(live))
    low = fixes(maps, replication, live)
    for name, by_node in per.items():
        total = sum(sizes[name])
        low += sum(max(0, x - -(-total // width)) for x in by_node.values())
    assert low <= len(moves)
    best = optimum(maps, replication, live)
    if fixes(maps, replication, live) == 0:
        assert len(moves) == best
    else:
        # Placing dead or missing replicas is a matching the planner approximates (see the
        # module docstring): rarely, one move over the optimum.
        assert best <= len(moves) <= best + 1


@settings(max_examples=200, deadline=None)
@given(clusters(), st.randoms(use_true_random=False))
def test_plan_is_deterministic(
    cluster: tuple[Maps, dict[str, int], list[str]], rng: random.Random
) -> None:
    maps, replication, live = cluster
    shuffled = list(live)
    rng.shuffle(shuffled)
    assert plan(maps, replication, live) == plan(maps, replication, shuffled)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(POOL), min_size=1, max_size=6, unique=True),
    st.lists(st.tuples(st.integers(1, 6), st.integers(1, 3)), min_size=1, max_size=4),
)
def test_placed_and_planned_maps_need_no_further_moves(
    nodes: list[str], specs: list[tuple[int, int]]
) -> None:
    maps = {f"c{i}": place(s, r, nodes, salt=f"c{i}") for i, (s, r) in enumerate(specs)}
    replication = {f"c{i}": r for i, (_, r) in enumerate(specs)}
    after = apply(maps, plan(maps, replication, nodes))
    assert plan(after, replication, nodes) == []
    assert plan(after, replication, list(reversed(nodes))) == []
