"""Pure rebalance planning: the fewest replica moves that make the shard maps whole and even.

`plan(current, replication, live_nodes)` looks at every collection's shard map at once and
returns `Move`s that

1. replace replicas on nodes that are not live (the driver copies from a surviving replica),
2. add replicas to shards below min(replication, live nodes),
3. then even out the load, so that the replica counts of the live nodes differ by at most one
   within every collection *and* over all collections together,

never putting two replicas of a shard on one node, and moving nothing that need not move.
`apply(current, moves)` is the map after the moves; `plan(apply(current, plan(...)))` is empty.

How the fewest moves are found. Every replica that is dead or missing costs one move wherever it
goes, so the question is only how many live replicas must move. If collection `c` ends with
`T_c` replicas over `L` live nodes, each node must hold ⌊T_c/L⌋ of them and `T_c mod L` nodes one
more; and for the overall counts to be even too, the nodes must get the "one more"s of all the
collections in equal numbers (within one). A node holding `x` replicas of `c` with target `t` must
lose max(0, x - t) of them, and every move takes exactly one replica off one node, so the number
of balance moves is at least the sum of those excesses. Choosing which nodes get the "one more"s
to make that sum smallest is a small transportation problem (collections → nodes), solved exactly
with a min-cost flow. A replica is then only ever moved from a node above its target to a node
below it; such a node always holds a shard the other one lacks, so the bound is met.

Pending (dead or missing) replicas complicate this: one can only land on a node that does not
hold its shard, and one that cannot land below target pushes another replica on (one more move).
The flow only estimates that; a hill-climb over the targets then counts it exactly (a matching
per collection). So a plan that only balances is minimal; with pending replicas it is minimal in
every case the tests' brute force has checked but one in tens of thousands of random tangles
(shards over- and under-replicated at once), where it is one move over.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aquila.cluster.model.placement import ShardMap


@dataclass(frozen=True)
class Move:
    """One replica of `collection`/`shard` goes to `to_node`.

    `from_node` is the node it leaves (it is replaced in place, keeping its position in the
    replica list), or None to add a replica the shard is missing. A `from_node` that is not
    live means "copy from any surviving replica"; it is named even if none survives.
    """

    collection: str
    shard: int
    from_node: str | None
    to_node: str


def apply(current: Mapping[str, ShardMap], moves: Sequence[Move]) -> dict[str, ShardMap]:
    """The shard maps after `moves`, applied in order. `current` is not modified.

    Raises ValueError for a move that does not fit the map: unknown collection or shard, a
    `from_node` that holds no replica of the shard, or a `to_node` that already holds one.
    """
    out = {name: [list(replicas) for replicas in shard_map] for name, shard_map in current.items()}
    for move in moves:
        shard_map = out.get(move.collection)
        if shard_map is None:
            raise ValueError(f"unknown collection {move.collection!r} in {move}")
        if not 0 <= move.shard < len(shard_map):
            raise ValueError(f"no shard {move.shard} in {move.collection!r}: {move}")
        replicas = shard_map[move.shard]
        if move.to_node in replicas:
            raise ValueError(f"{move.to_node!r} already holds a replica: {move}")
        if move.from_node is None:
            replicas.append(move.to_node)
        elif move.from_node in replicas:
            replicas[replicas.index(move.from_node)] = move.to_node
        else:
            raise ValueError(f"{move.from_node!r} holds no replica: {move}")
    return out


def plan(
    current: Mapping[str, ShardMap],
    replication: Mapping[str, int],
    live_nodes: Sequence[str],
) -> list[Move]:
    """The moves that take `current` (all collections) to a whole, balanced map.

    `replication[name]` is each collection's replication factor; a shard ends with
    min(replication, live nodes) replicas, or more if it already had more (no move removes a
    replica). Moves come in this order: replacements of replicas on dead nodes, additions, then
    balance moves. Deterministic: the same input gives the same list.

    Two things a `Move` cannot express are left as they are: replicas beyond the replication
    factor, and a dead replica of a shard that already has a replica on every live node (there
    is nowhere to move it). Raises ValueError if a collection has no replication factor, a
    factor is below 1, or a shard lists a node twice.
    """
    live = sorted(set(live_nodes))
    names = sorted(current)
    for name in names:
        factor = replication.get(name)
        if factor is None:
            raise ValueError(f"no replication factor for collection {name!r}")
        if factor < 1:
            raise ValueError(f"replication of {name!r} must be at least 1, got {factor}")
        for shard, replicas in enumerate(current[name]):
            if len(set(replicas)) != len(replicas):
                raise ValueError(f"shard {shard} of {name!r} lists a node twice: {replicas}")
    if not live:
        return []
    return _Planner(current, replication, live, names).run()


class _Planner:
    """The working state of one `plan` call: the maps as the moves so far leave them."""

    def __init__(
        self,
        current: Mapping[str, ShardMap],
        replication: Mapping[str, int],
        live: list[str],
        names: list[str],
    ) -> None:
        self.live = live
        self.live_set = set(live)
        self.names = names
        self.replication = replication
        self.maps = {name: [list(r) for r in current[name]] for name in names}
        self.moves: list[Move] = []
        # (collection, shard, node) → index in self.moves of the move that put a replica there,
        # so a replica placed by this plan and later moved on costs one move, not two.
        self.placed_by: dict[tuple[str, int, str], int] = {}
        # Live replica counts per collection and node, and over all collections.
        self.count: dict[str, dict[str, int]] = {name: dict.fromkeys(live, 0) for name in names}
        self.load = dict.fromkeys(live, 0)
        # Live nodes by (load, id), for _match; dropped whenever a load changes.
        self._ranked: list[str] | None = None
        for name in names:
            for replicas in self.maps[name]:
                for node in replicas:
                    if node in self.live_set:
                        self.count[name][node] += 1
                        self.load[node] += 1

    def run(self) -> list[Move]:
        pending = self._pending()
        totals = {name: sum(self.count[name].values()) for name in self.names}
        # How many of a collection's pending replicas each node could take (one per shard,
        # and not of a shard it already holds).
        room = {name: dict.fromkeys(self.live, 0) for name in self.names}
        for name, shard in sorted({(name, shard) for name, shard, _ in pending}):
            replicas = self.maps[name][shard]
            for node in self.live:
                room[name][node] += node not in replicas
        for name, _, _ in pending:
            totals[name] += 1
        self.target = _targets(self.names, self.live, totals, self.count, room)
        by_name = {name: [p for p in pending if p[0] == name] for name in self.names}
        self._improve(by_name)
        for name in self.names:
            self._fill(by_name[name])
        self._balance()
        return self.moves

    def _pending(self) -> list[tuple[str, int, str | None]]:
        """Replicas to place: (collection, shard, dead node it replaces or None to add)."""
        out: list[tuple[str, int, str | None]] = []
        width = len(self.live)
        for name in self.names:
            needed = min(self.replication[name], width)
            for shard, replicas in enumerate(self.maps[name]):
                alive = sum(1 for node in replicas if node in self.live_set)
                # Keep the shard's size (a dead replica is replaced, not dropped) but never
                # below the replication factor nor above the number of live nodes.
                final = min(width, max(needed, len(replicas)))
                room = final - alive
                for node in replicas:
                    if room > 0 and node not in self.live_set:
                        out.append((name, shard, node))
                        room -= 1
                out.extend((name, shard, None) for _ in range(room))
        return out

    def _improve(self, pending: Mapping[str, list[tuple[str, int, str | None]]]) -> None:
        """Hill-climb the targets on the true cost, which counts the pending replicas that
        cannot land below target. `_targets` only estimates that part, so when anything is
        pending, try handing a collection's extra replica to another node (alone, or swapped
        with another collection's to keep the overall spread) while that saves moves."""
        if not any(pending.values()):
            return
        target = self.target
        cost = {name: self._cost(name, pending[name], target[name]) for name in self.names}
        extras = {node: 0 for node in self.live}
        base = {name: min(target[name].values()) for name in self.names}
        for name in self.names:
            for node in self.live:
                extras[node] += target[name][node] - base[name]
        # No targets can do better for a collection than its extras on the nodes above
        # ⌊T/L⌋ and every pending replica landing below target; there is nothing to try.
        floor = {}
        for name in self.names:
            held = [self.count[name][node] for node in self.live]
            spare = sum(1 for x in held if x > base[name])
            extra = sum(target[name][node] - base[name] for node in self.live)
            floor[name] = sum(max(0, x - base[name]) for x in held) - min(extra, spare)
        # Which targets changes could pay off is bounded without solving a matching: moving
        # a collection's extra from giver g to taker t changes its cost by at least
        # [g holds more than base] - [t holds more than base] - [t can take a pending
        # replica] (it frees at most one excess and adds at most one landing place), and a
        # swap adds the same bound for the other collection the other way. Only changes whose
        # bounds sum below zero are tried, in the same order as trying them all, so the
        # result is the same; with a thousand nodes that is a few thousand tries, not
        # billions.
        count = self.count
        takes: dict[str, set[str]] = {}
        for name in self.names:
            shards = {shard for _, shard, _ in pending[name]}
            takes[name] = {
                node
                for node in self.live
                if count[name][node] <= base[name]
                and any(node not in self.maps[name][shard] for shard in shards)
            }
        order = {name: i for i, name in enumerate(self.names)}

        def gain(name: str, giver: str, taker: str) -> int:
            """The bound for moving `name`'s extra from giver to taker."""
            return (
                (count[name][giver] > base[name])
                - (count[name][taker] > base[name])
                - (taker in takes[name])
            )

        improved = True
        while improved:
            improved = False
            for name in self.names:
                if not pending[name] or cost[name] == floor[name]:
                    continue
                tname = target[name]
                givers = [node for node in self.live if tname[node] > base[name]]
                takers = [node for node in self.live if tname[node] == base[name]]
                # Per node, the other collections it could give (or take) an extra of, with
                # the bound of that half of a swap below zero.
                can_give = {
                    node: {
                        other for other in self.names
                        if target[other][node] > base[other] and count[other][node] <= base[other]
                    }
                    for node in takers
                }
                for giver in givers:
                    for taker in takers:
                        bound = gain(name, giver, taker)
                        if bound > 0:
                            continue
                        swaps: list[str | None] = []
                        if bound < 0:
                            if extras[giver] > extras[taker]:
                                swaps.append(None)
                            swaps += [
                                other
                                for other in self.names
                                if other != name
                                and target[other][taker] > base[other]
                                and target[other][giver] == base[other]
                                and bound + gain(other, taker, giver) < 0
                            ]
                        else:
                            others: list[str] = [
                                o
                                for o in can_give[taker]
                                if o != name
                                and target[o][giver] == base[o]
                                and gain(o, taker, giver) < 0
                            ]
                            others.sort(key=order.__getitem__)
                            swaps.extend(others)
                        if not swaps:
                            continue
                        moved = dict(target[name])
                        moved[giver] -= 1
                        moved[taker] += 1
                        moved_cost = self._cost(name, pending[name], moved)
                        for other in swaps:
                            changed = {name: moved}
                            new = {name: moved_cost}
                            if other is not None:
                                changed[other] = dict(target[other])
                                changed[other][taker] -= 1
                                changed[other][giver] += 1
                                new[other] = self._cost(other, pending[other], changed[other])
                            if sum(new.values()) < sum(cost[n] for n in changed):
                                target.update(changed)
                                cost.update(new)
                                if other is None:
                                    extras[giver] -= 1
                                    extras[taker] += 1
                                improved = True
                                break
                        if improved:
                            break
                    if improved:
                        break
                if improved:
                    break

    def _cost(
        self, name: str, pending: list[tuple[str, int, str | None]], target: Mapping[str, int]
    ) -> int:
        """Moves of live replicas `name` needs with these targets (besides the pending)."""
        count = self.count[name]
        # Only nodes holding a replica can be above target (targets are never negative).
        excess = sum(max(0, x - target[node]) for node, x in count.items() if x)
        return excess + len(pending) - sum(len(v) for v in self._match(pending, target).values())

    def _match(
        self, pending: list[tuple[str, int, str | None]], target: Mapping[str, int]
    ) -> dict[int, list[str]]:
        """Which pending replica of a collection can go to which node below target: a
        matching (a node takes at most one replica of a shard, and none of a shard it holds)
        with as many replicas as possible landing where they are wanted, on the least loaded
        nodes when there is a choice.

        A min-cost flow whose cost is the node's rank by load, solved greedily: feasible sets
        of landing places form a polymatroid, so taking nodes cheapest first, each as often
        as an augmenting path lets it, is optimal. One path per replica, where a flow solver
        needed a phase per distinct rank.
        """
        if not pending:
            return {}
        name = pending[0][0]
        count = self.count[name]
        spare: dict[int, int] = {}
        for _, shard, _ in pending:
            spare[shard] = spare.get(shard, 0) + 1
        shards = sorted(spare)
        replicas = {shard: set(self.maps[name][shard]) for shard in shards}
        at: dict[int, list[str]] = {shard: [] for shard in shards}
        if self._ranked is None:
            self._ranked = sorted(self.live, key=lambda node: (self.load[node], node))
        left = len(pending)
        for node in self._ranked:
            room = target[node] - count[node]
            while room > 0 and left > 0 and self._augment(node, shards, spare, replicas, at):
                room -= 1
                left -= 1
            if left == 0:
                break
        for nodes_of_shard in at.values():
            nodes_of_shard.sort()  # the order of self.live
        return at

    @staticmethod
    def _augment(
        node: str,
        shards: list[int],
        spare: dict[int, int],
        replicas: Mapping[int, set[str]],
        at: dict[int, list[str]],
    ) -> bool:
        """Give `node` one more pending replica, moving others along a shortest chain if
        every shard it can take is already given out (breadth first over shards)."""

        def takes(who: str, shard: int) -> bool:
            return who not in replicas[shard] and who not in at[shard]

        # came[shard] = (node that takes it on this path, shard that node leaves or None)
        came: dict[int, tuple[str, int | None]] = {}
        frontier: list[tuple[str, int | None]] = [(node, None)]
        while frontier:
            nxt: list[tuple[str, int | None]] = []
            for who, leaving in frontier:
                for shard in shards:
                    if shard in came or not takes(who, shard):
                        continue
                    came[shard] = (who, leaving)
                    if spare[shard] > 0:
                        spare[shard] -= 1
                        while True:  # flip the path back to `node`
                            taker, left_from = came[shard]
                            at[shard].append(taker)
                            if left_from is None:
                                return True
                            at[left_from].remove(taker)
                            shard = left_from
                    nxt.extend((other, shard) for other in at[shard] if other != who)
            frontier = nxt
        return False

    def _fill(self, pending: list[tuple[str, int, str | None]]) -> None:
        """Place one collection's pending replicas: below target where the matching puts
        them, the rest on the node least over its target (the balance step then moves one
        replica on from there)."""
        if not pending:
            return
        name = pending[0][0]
        count, target = self.count[name], self.target[name]
        matched = self._match(pending, target)
        for _, shard, from_node in pending:
            if matched[shard]:
                to_node = matched[shard].pop(0)
            else:
                replicas = self.maps[name][shard]
                to_node = min(
                    (node for node in self.live if node not in replicas),
                    key=lambda node: (count[node] - target[node], self.load[node], node),
                )
            self._record(Move(name, shard, from_node, to_node))

    def _balance(self) -> None:
        """Move replicas from nodes above their per-collection target to nodes below it.

        Each step takes from the most loaded node above target in some collection (ties by
        node id), to the least loaded node below target in one of those collections (ties by
        node id, then collection). Heaps with lazy deletion find both, since a rescan of
        every node and collection per move costs minutes with 1,000 nodes and 100,000
        replicas.
        """
        count, target, load = self.count, self.target, self.load
        over: dict[str, set[str]] = {node: set() for node in self.live}
        under: dict[str, set[str]] = {node: set() for node in self.live}
        takers: dict[str, list[tuple[int, str]]] = {name: [] for name in self.names}
        for name in self.names:
            for node in self.live:
                if count[name][node] > target[name][node]:
                    over[node].add(name)
                elif count[name][node] < target[name][node]:
                    under[node].add(name)
                    takers[name].append((load[node], node))
            heapq.heapify(takers[name])
        givers = [(-load[node], node) for node in self.live if over[node]]
        heapq.heapify(givers)

        def recount(name: str, node: str) -> None:
            over[node].discard(name)
            under[node].discard(name)
            if count[name][node] > target[name][node]:
                over[node].add(name)
            elif count[name][node] < target[name][node]:
                under[node].add(name)

        def reload(node: str) -> None:
            """`node`'s load changed: enter it afresh wherever it is ranked."""
            if over[node]:
                heapq.heappush(givers, (-load[node], node))
            for name in under[node]:
                heapq.heappush(takers[name], (load[node], node))

        def best_taker(name: str) -> tuple[int, str] | None:
            heap = takers[name]
            while heap and (name not in under[heap[0][1]] or load[heap[0][1]] != heap[0][0]):
                heapq.heappop(heap)
            return heap[0] if heap else None

        while givers:
            neg, source = givers[0]
            if not over[source] or load[source] != -neg:
                heapq.heappop(givers)
                continue
            partners = []
            for name in over[source]:
                top = best_taker(name)
                # Never empty: within a collection the counts and the targets have the
                # same sum, so a node above target means one below it.
                assert top is not None
                partners.append((top[0], top[1], name))
            _, dest, name = min(partners)
            self._move_one(name, source, dest)
            recount(name, source)
            recount(name, dest)
            reload(source)
            reload(dest)

    def _move_one(self, name: str, source: str, dest: str) -> None:
        movable = [
            shard
            for shard, replicas in enumerate(self.maps[name])
            if source in replicas and dest not in replicas
        ]
        # source holds more replicas of `name` than dest, so some shard is on source only.
        # Prefer a replica this plan just placed (re-aim that move instead of adding one),
        # then one that is not the shard's primary, then the lowest shard.
        shard = min(
            movable,
            key=lambda s: (
                (name, s, source) not in self.placed_by,
                self.maps[name][s][0] == source,
                s,
            ),
        )
        earlier = self.placed_by.pop((name, shard, source), None)
        if earlier is None:
            self._record(Move(name, shard, source, dest))
            return
        old = self.moves[earlier]
        # Balance only takes from nodes above target and gives to nodes below it, so a
        # replica never comes back to the node it left.
        assert old.from_node != dest
        self.moves[earlier] = Move(name, shard, old.from_node, dest)
        self.placed_by[(name, shard, dest)] = earlier
        self._shift(name, shard, source, dest)

    def _record(self, move: Move) -> None:
        self._ranked = None
        self.placed_by[(move.collection, move.shard, move.to_node)] = len(self.moves)
        self.moves.append(move)
        replicas = self.maps[move.collection][move.shard]
        if move.from_node is None:
            replicas.append(move.to_node)
        else:
            replicas[replicas.index(move.from_node)] = move.to_node
        if move.from_node in self.live_set:
            self.count[move.collection][move.from_node] -= 1
            self.load[move.from_node] -= 1
        self.count[move.collection][move.to_node] += 1
        self.load[move.to_node] += 1

    def _shift(self, name: str, shard: int, source: str, dest: str) -> None:
        self._ranked = None
        replicas = self.maps[name][shard]
        replicas[replicas.index(source)] = dest
        self.count[name][source] -= 1
        self.load[source] -= 1
        self.count[name][dest] += 1
        self.load[dest] += 1


def _targets(
    names: list[str],
    live: list[str],
    totals: Mapping[str, int],
    count: Mapping[str, Mapping[str, int]],
    room: Mapping[str, Mapping[str, int]],
) -> dict[str, dict[str, int]]:
    """Per-collection, per-node replica targets: even within each collection and overall,
    and as close to `count` as possible (fewest replicas above target).

    Collection `c` gives every node ⌊T_c/L⌋ and `e_c = T_c mod L` nodes one more. Which nodes
    get the extras is a min-cost flow: source → c (capacity e_c) → node (capacity 1) → sink.
    In units of `unit`, an arc costs 0 if the node already holds more than ⌊T_c/L⌋ (an extra
    there keeps a replica that would otherwise move), 2 if the collection's pending replicas
    alone could not fill the node up to ⌊T_c/L⌋ + 1 (a guess that it takes one more move; see
    `_Planner._improve` for the correction), else 1.
    Below one unit, ties go to the node that needs the fewest pending replicas, which leaves
    the most of them for the others (nodes compete for the same replicas: a heuristic).
    Each node must take ⌊E/L⌋ or ⌈E/L⌉ of all E extras: its first ⌊E/L⌋ units to the sink are
    free and one more costs more than all the rest together, so an even spread always wins.
    """
    width = len(live)
    base = {name: totals[name] // width for name in names}
    extras = {name: totals[name] % width for name in names}
    total_extras = sum(extras.values())
    floor_share = total_extras // width
    # `unit` exceeds any sum of tie-breaks, `penalty` any sum of arc costs.
    unit = 1 + sum(extras[name] * (base[name] + 1) for name in names)
    penalty = 3 * unit * (total_extras + 1)

    graph = _FlowGraph(2 + len(names) + width)
    source, sink = 0, 1 + len(names) + width
    arcs: dict[tuple[str, str], int] = {}
    for i, name in enumerate(names):
        graph.add(source, 1 + i, extras[name], 0)
        for j, node in enumerate(live):
            need = base[name] + 1 - count[name][node]
            if need <= 0:
                cost = 0
            elif need > room[name][node]:
                cost = 2 * unit + need
            else:
                cost = unit + need
            arcs[(name, node)] = graph.add(1 + i, 1 + len(names) + j, 1, cost)
    for j in range(width):
        if floor_share:
            graph.add(1 + len(names) + j, sink, floor_share, 0)
        graph.add(1 + len(names) + j, sink, 1, penalty)
    if graph.min_cost_flow(source, sink, total_extras) < total_extras:
        raise AssertionError("extras cannot be spread; the round-robin spread fits")

    return {
        name: {node: base[name] + (1 if graph.used(arcs[(name, node)]) else 0) for node in live}
        for name in names
    }


class _FlowGraph:
    """Min-cost flow by the primal-dual method (all costs are >= 0).

    A Dijkstra over reduced costs finds the length of the shortest augmenting paths; then
    every shortest path is saturated at once, as a blocking flow (Dinic) over the arcs of
    zero reduced cost. Phases are few (one per distinct path length), where pushing one
    path per Dijkstra took one pass over the whole graph per unit of flow: minutes for a
    thousand nodes and a hundred collections, now seconds.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        # Per arc: head, residual capacity, cost; arc i ^ 1 is the reverse of arc i.
        self.head: list[int] = []
        self.cap: list[int] = []
        self.cost: list[int] = []
        self.out: list[list[int]] = [[] for _ in range(size)]

    def add(self, tail: int, head: int, cap: int, cost: int) -> int:
        arc = len(self.head)
        self.head += [head, tail]
        self.cap += [cap, 0]
        self.cost += [cost, -cost]
        self.out[tail].append(arc)
        self.out[head].append(arc + 1)
        return arc

    def used(self, arc: int) -> bool:
        return self.cap[arc ^ 1] > 0

    def min_cost_flow(self, source: int, sink: int, amount: int) -> int:
        """Push up to `amount` units at least cost; return how many could be pushed."""
        potential = [0] * self.size
        pushed = 0
        while pushed < amount:
            dist = self._distances(source, potential)
            if dist[sink] == _INF:
                break
            cap_at = dist[sink]
            for v in range(self.size):
                # Capped at the sink's distance, the reduced costs of all residual arcs stay
                # non-negative and those of every shortest path become zero.
                potential[v] += min(dist[v], cap_at)
            while pushed < amount:
                level = self._levels(source, potential)
                if level[sink] < 0:
                    break
                pushed += self._blocking(source, sink, amount - pushed, level, potential)
        return pushed

    def _distances(self, source: int, potential: list[int]) -> list[int]:
        head, cap, cost, out = self.head, self.cap, self.cost, self.out
        dist = [_INF] * self.size
        dist[source] = 0
        heap = [(0, source)]
        while heap:
            d, v = heapq.heappop(heap)
            if d > dist[v]:
                continue
            base = d + potential[v]
            for arc in out[v]:
                if cap[arc] > 0:
                    w = head[arc]
                    nd = base + cost[arc] - potential[w]
                    if nd < dist[w]:
                        dist[w] = nd
                        heapq.heappush(heap, (nd, w))
        return dist

    def _levels(self, source: int, potential: list[int]) -> list[int]:
        """BFS depth of each node over admissible arcs (-1: unreachable)."""
        head, cap, cost, out = self.head, self.cap, self.cost, self.out
        level = [-1] * self.size
        level[source] = 0
        queue = [source]
        for v in queue:
            pv, depth = potential[v], level[v] + 1
            for arc in out[v]:
                w = head[arc]
                if level[w] < 0 and cap[arc] > 0 and cost[arc] + pv == potential[w]:
                    level[w] = depth
                    queue.append(w)
        return level

    def _blocking(
        self, source: int, sink: int, limit: int, level: list[int], potential: list[int]
    ) -> int:
        """Push along admissible level-increasing paths until none is left (or `limit`)."""
        head, cap, cost, out = self.head, self.cap, self.cost, self.out
        nxt = [0] * self.size  # per node, the next arc to try (Dinic's current arc)
        stack: list[int] = [source]
        path: list[int] = []
        pushed = 0
        while stack:
            v = stack[-1]
            if v == sink:
                f = min(limit - pushed, min(cap[a] for a in path))
                for a in path:
                    cap[a] -= f
                    cap[a ^ 1] += f
                pushed += f
                if pushed == limit:
                    return pushed
                # Back up to the tail of the first arc this saturated.
                k = next(i for i, a in enumerate(path) if cap[a] == 0)
                del stack[k + 1:]
                del path[k:]
                continue
            arcs = out[v]
            i, end = nxt[v], len(arcs)
            pv, depth = potential[v], level[v] + 1
            while i < end:
                a = arcs[i]
                w = head[a]
                # Admissible: residual capacity, zero reduced cost, one level further.
                if cap[a] > 0 and level[w] == depth and cost[a] + pv == potential[w]:
                    break
                i += 1
            nxt[v] = i
            if i < end:
                stack.append(head[arcs[i]])
                path.append(arcs[i])
            else:
                stack.pop()  # a dead end: leave it and skip the arc that led here
                if path:
                    path.pop()
                    nxt[stack[-1]] += 1
        return pushed


_INF = 1 << 62
