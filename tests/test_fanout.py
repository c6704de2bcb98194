"""Scatter-gather with a deadline and replica retry, over fake nodes.

fan_out waits only through its clock: these tests run it on a ManualClock that jumps to the
next deadline whenever nothing else can run, so the deadlines and hedges below are exact and
no test waits on real time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.clock import ManualClock, track
from aquila.cluster.model.documents import Hit
from aquila.cluster.model.errors import BadRequest, Unavailable
from aquila.cluster.model.merge import merge_topk
from aquila.cluster.replication import fanout
from aquila.cluster.replication.fanout import (
    HEDGE_SHARE,
    FanoutResult,
    assign,
    fan_out,
    merge_rows,
    single_node,
)

NQ = 2
K = 3
TIMEOUT = 0.2
SLACK = 0.1  # margin on top of the deadline (a second deadline would exceed it)


def _hits() -> dict[tuple[int, int], list[Hit]]:
    """Per (shard, query), four hits with distinct random scores."""
    rng = np.random.default_rng(7)
    out = {}
    for shard in range(6):
        for q in range(NQ):
            out[shard, q] = [
                Hit(f"s{shard}q{q}h{j}", float(rng.random()), b"{}", b"") for j in range(4)
            ]
    return out


HITS = _hits()


def best(hits: list[Hit], k: int, larger_is_better: bool) -> list[Hit]:
    return sorted(hits, key=lambda h: -h.score if larger_is_better else h.score)[:k]


def expected_rows(shards: list[int], larger_is_better: bool) -> list[list[Hit]]:
    """The exact answer: per query, the best K over every hit of these shards."""
    return [best([h for s in shards for h in HITS[s, q]], K, larger_is_better)
            for q in range(NQ)]


NEVER = "never"  # answers nothing: waits until cancelled
DOWN = "down"  # raises Unavailable (transient)
BAD = "bad"  # raises BadRequest (not transient)


@dataclass
class FakeNodes:
    """Nodes answering `ask` like a node would: per query, the best K over its shards."""

    larger_is_better: bool = False
    behaviour: dict[str, str] = field(default_factory=dict)
    clock: ManualClock = field(default_factory=ManualClock)
    calls: list[tuple[str, list[int], float]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def ask(self, node: str, shards: list[int], budget: float) -> list[list[Hit]]:
        self.calls.append((node, list(shards), budget))
        how = self.behaviour.get(node, "ok")
        if how == NEVER:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(node)
                raise
        if how == DOWN:
            raise Unavailable(f"{node} is down")
        if how == BAD:
            raise BadRequest("bad filter")
        return expected_rows(shards, self.larger_is_better)

    def asked(self, node: str) -> list[list[int]]:
        return [shards for n, shards, _ in self.calls if n == node]


async def run(
    nodes: FakeNodes, candidates: dict[int, list[str]], timeout_s: float = TIMEOUT
) -> tuple[FanoutResult, float]:
    clock = nodes.clock
    t0 = clock.now()
    result = await clock.run(fan_out(candidates, nodes.ask, NQ, K, nodes.larger_is_better,
                                     clock, timeout_s))
    return result, clock.now() - t0


def ids(rows: list[list[Hit]]) -> list[list[str]]:
    return [[h.id for h in row] for row in rows]


# --- assign ---------------------------------------------------------------------------------


def test_assign_groups_shards_by_next_untried_candidate() -> None:
    candidates = {0: ["a", "b"], 1: ["b", "a"], 2: ["a"], 3: []}
    every = [0, 1, 2, 3]
    assert assign(candidates, {}, every) == {"a": [0, 2], "b": [1]}
    assert assign(candidates, {0: 1, 1: 1}, every) == {"b": [0], "a": [1, 2]}
    assert assign(candidates, {0: 2, 1: 2, 2: 1}, every) == {}
    assert assign(candidates, {}, [1]) == {"b": [1]}


# --- several nodes --------------------------------------------------------------------------


@pytest.mark.parametrize("larger_is_better", [False, True])
async def test_all_shards_answered(larger_is_better: bool) -> None:
    nodes = FakeNodes(larger_is_better)
    candidates = {0: ["a", "b"], 1: ["b", "a"], 2: ["c", "a"], 3: ["a"]}
    result, _ = await run(nodes, candidates)
    assert ids(result.rows) == ids(expected_rows([0, 1, 2, 3], larger_is_better))
    assert (result.missing, result.errors) == ([], [])
    assert sorted((n, s) for n, s, _ in nodes.calls) == [("a", [0, 3]), ("b", [1]), ("c", [2])]


async def test_transient_error_retries_shards_on_next_replica() -> None:
    nodes = FakeNodes(behaviour={"a": DOWN})
    result, _ = await run(nodes, {0: ["a", "b"], 1: ["c", "b"], 2: ["a", "c"]})
    assert ids(result.rows) == ids(expected_rows([0, 1, 2], False))
    assert result.missing == []
    assert nodes.asked("a") == [[0, 2]]
    assert nodes.asked("b") == [[0]]
    assert sorted(nodes.asked("c")) == [[1], [2]]
    assert len(result.errors) == 1 and result.errors[0].startswith("a: ")
    # The retry gets what is left of the budget, not a fresh one.
    retry_budgets = [b for n, s, b in nodes.calls if (n, s) == ("b", [0])]
    assert 0 < retry_budgets[0] <= TIMEOUT


async def test_shard_whose_replicas_all_fail_is_missing() -> None:
    nodes = FakeNodes(behaviour={"a": DOWN, "b": DOWN})
    result, _ = await run(nodes, {0: ["a", "b"], 1: ["c"]})
    assert result.missing == [0]
    assert ids(result.rows) == ids(expected_rows([1], False))
    assert [e.split(":")[0] for e in result.errors] == ["a", "b"]


async def test_node_that_never_answers_loses_its_shards_at_the_deadline() -> None:
    nodes = FakeNodes(behaviour={"a": NEVER})
    result, elapsed = await run(nodes, {0: ["a"], 1: ["c"], 2: ["a"]})
    assert result.missing == [0, 2]
    assert ids(result.rows) == ids(expected_rows([1], False))
    assert "a: no answer within the deadline" in result.errors
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + SLACK
    assert elapsed == pytest.approx(TIMEOUT)  # on the fake clock: exactly the deadline
    await asyncio.sleep(0)  # let the cancellation reach the abandoned request
    assert nodes.cancelled == ["a"]


async def test_non_transient_error_propagates() -> None:
    nodes = FakeNodes(behaviour={"b": BAD})
    with pytest.raises(BadRequest):
        await run(nodes, {0: ["a"], 1: ["b", "c"]})
    assert nodes.asked("c") == []  # another replica would say the same: not asked


async def test_no_failure_is_left_unretrieved() -> None:
    """A non-transient error ends the fan-out while other nodes failed in the same round, or
    are still running and fail after their cancellation: asyncio must never have to report
    "Task exception was never retrieved" (the conftest fixture fails the test if it does)."""
    nodes = FakeNodes(behaviour={"a": BAD, "b": DOWN, "c": DOWN})
    with pytest.raises(BadRequest):
        await run(nodes, {0: ["a"], 1: ["b"], 2: ["c"]})
    nodes = FakeNodes(behaviour={"a": BAD, "b": NEVER})
    with pytest.raises(BadRequest):
        await run(nodes, {0: ["a"], 1: ["b"]})


async def test_background_failures_are_logged_and_retrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Background work (`track`: a rebalance, a file write) that fails is logged when it ends,
    never left for asyncio to report as "never retrieved"."""
    tasks: set[asyncio.Task[Any]] = set()

    async def fails() -> None:
        raise OSError("disk gone")

    track(asyncio.ensure_future(fails()), tasks, logging.getLogger("test"))
    assert len(tasks) == 1
    for _ in range(3):
        await asyncio.sleep(0)
    assert not tasks
    assert "disk gone" in caplog.text


async def test_no_shards_at_all() -> None:
    nodes = FakeNodes()
    result, _ = await run(nodes, {})
    assert result.rows == [[]] * NQ
    assert (result.missing, result.errors, nodes.calls) == ([], [], [])


@pytest.mark.parametrize(
    "candidates", [{0: ["a"], 1: []}, {0: ["a"], 1: ["b"], 2: []}], ids=["one-node", "two-nodes"]
)
async def test_shard_without_candidates_is_missing(candidates: dict[int, list[str]]) -> None:
    nodes = FakeNodes()
    result, _ = await run(nodes, candidates)
    with_nodes = [s for s, c in candidates.items() if c]
    assert ids(result.rows) == ids(expected_rows(with_nodes, False))
    assert result.missing == [s for s, c in candidates.items() if not c]


# --- one node and no alternative: the fast path ------------------------------------------


async def test_single_node_fast_path() -> None:
    nodes = FakeNodes()
    result, _ = await run(nodes, {1: ["a"], 0: ["a"]})
    assert [(n, sh) for n, sh, _ in nodes.calls] == [("a", [0, 1])]  # one call, shards sorted
    assert 0.9 * TIMEOUT <= nodes.calls[0][2] <= TIMEOUT  # the whole budget
    assert ids(result.rows) == ids(expected_rows([0, 1], False))
    assert (result.missing, result.errors) == ([], [])


async def test_fast_path_non_transient_error_propagates() -> None:
    nodes = FakeNodes(behaviour={"a": BAD})
    with pytest.raises(BadRequest):
        await run(nodes, {0: ["a"], 1: ["a"]})


async def test_fast_path_transient_error_loses_the_shards() -> None:
    nodes = FakeNodes(behaviour={"a": DOWN})
    result, _ = await run(nodes, {0: ["a"], 1: ["a"]})
    assert result.rows == [[]] * NQ and result.missing == [0, 1]
    assert result.errors and result.errors[0].startswith("a: ")


async def test_fast_path_node_that_never_answers() -> None:
    nodes = FakeNodes(behaviour={"a": NEVER})
    result, elapsed = await run(nodes, {0: ["a"], 1: ["a"]})
    assert result.rows == [[]] * NQ
    assert result.missing == [0, 1]
    assert result.errors  # the caller can say why
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + SLACK
    assert elapsed == pytest.approx(TIMEOUT)  # on the fake clock: exactly the deadline


@pytest.mark.parametrize(("candidates", "plan"), [
    ({1: ["a"], 0: ["a"]}, ("a", [0, 1], [])),
    ({2: ["a"], 0: ["a"], 1: []}, ("a", [0, 2], [1])),
    ({0: ["a"], 1: ["b"]}, None),  # two nodes
    ({0: ["a", "b"], 1: ["a"]}, None),  # an alternative for a shard
    ({0: []}, None),  # no node at all
    ({}, None),
])
def test_single_node(candidates: dict[int, list[str]],
                     plan: tuple[str, list[int], list[int]] | None) -> None:
    assert single_node(candidates) == plan


async def test_a_plan_kept_by_the_caller_answers_as_one_made_per_search() -> None:
    candidates = {1: ["a"], 0: ["a"], 2: []}
    plan = single_node(candidates)
    kept = (plan[0], list(plan[1]), list(plan[2])) if plan else None
    for _ in range(2):  # the same plan again: nothing of it was changed by the first search
        nodes = FakeNodes()
        got = await nodes.clock.run(fan_out(candidates, nodes.ask, NQ, K, False, nodes.clock,
                                            TIMEOUT, plan))
        assert [(n, sh) for n, sh, _ in nodes.calls] == [("a", [0, 1])]
        assert ids(got.rows) == ids(expected_rows([0, 1], False)) and got.missing == [2]
        got.missing.append(99)  # the caller's to change: not the plan's list
        assert plan == kept


# --- one node first for every shard, with other replicas ------------------------------------


async def test_first_choice_for_every_shard_is_one_call() -> None:
    nodes = FakeNodes()
    result, _ = await run(nodes, {1: ["a", "c"], 0: ["a", "b"]})
    assert [(n, sh) for n, sh, _ in nodes.calls] == [("a", [0, 1])]
    assert ids(result.rows) == ids(expected_rows([0, 1], False))
    assert (result.missing, result.errors) == ([], [])


async def test_transient_error_falls_back_to_other_replicas_once() -> None:
    nodes = FakeNodes(behaviour={"a": DOWN})
    result, _ = await run(nodes, {0: ["a", "b"], 1: ["a", "c"]})
    assert ids(result.rows) == ids(expected_rows([0, 1], False))
    assert result.missing == []
    assert nodes.asked("a") == [[0, 1]]  # the node that failed is not asked again
    assert sorted(nodes.asked("b") + nodes.asked("c")) == [[0], [1]]
    assert (result.retried, result.hedged) == (2, 0)  # counted for the node's metrics


async def test_slow_node_is_hedged_to_the_next_replica() -> None:
    """A paused replica (SIGSTOP) answers nothing: once the hedge delay has passed, its
    shards are asked of the next replica and the answer is complete, long before the
    deadline."""
    nodes = FakeNodes(behaviour={"a": NEVER})
    result, elapsed = await run(nodes, {0: ["a", "b"], 1: ["a", "c"], 2: ["c"]})
    assert ids(result.rows) == ids(expected_rows([0, 1, 2], False))
    assert result.missing == []
    assert elapsed < TIMEOUT * 0.75
    assert elapsed == pytest.approx(TIMEOUT * HEDGE_SHARE)  # answered right at the hedge
    assert sorted(nodes.asked("b") + nodes.asked("c")) == [[0], [1], [2]]
    assert (result.retried, result.hedged) == (0, 2)  # shards 0 and 1 hedged
    await asyncio.sleep(0)
    assert nodes.cancelled == ["a"]  # the abandoned request is cancelled


async def test_answers_that_overlap_count_once_per_shard() -> None:
    """A slow node answering after its hedge contributes only the shards still missing."""

    @dataclass
    class Late(FakeNodes):
        async def ask(self, node: str, shards: list[int], budget: float) -> list[list[Hit]]:
            if node == "a":
                await self.clock.sleep(TIMEOUT * 0.4)  # after the hedge, before the deadline
            rows = await super().ask(node, shards, budget)
            return [[Hit(h.id, h.score, h.metadata, h.vector, int(h.id[1])) for h in row]
                    for row in rows]

    nodes = Late(behaviour={"c": NEVER})
    # Shard 0 is hedged to b (answers at once); shard 1's only other replica never answers,
    # so a's late answer serves shard 1, and must not bring shard 0's hits a second time.
    result, _ = await run(nodes, {0: ["a", "b"], 1: ["a", "c"]})
    assert result.missing == []
    got = ids(result.rows)
    assert got == ids(expected_rows([0, 1], False))
    assert all(len(row) == len(set(row)) for row in got)


async def test_every_replica_silent_keeps_the_deadline() -> None:
    nodes = FakeNodes(behaviour={"a": NEVER, "b": NEVER})
    result, elapsed = await run(nodes, {0: ["a", "b"], 1: ["a", "b"]})
    assert result.missing == [0, 1]
    assert elapsed < TIMEOUT + SLACK
    assert elapsed == pytest.approx(TIMEOUT)


# --- the merge on arrays equals the merge of lists it replaced ------------------------------


def old_merge_rows(answers: list[list[list[Hit]]], nq: int, k: int,
                   larger_is_better: bool) -> list[list[Hit]]:
    """fanout.merge_rows as it was: a heap merge of hit objects, query by query."""
    out = []
    for q in range(nq):
        lists = [[(h.score, h) for h in a[q]] for a in answers if q < len(a)]
        out.append([h for _, h in merge_topk(lists, k, larger_is_better=larger_is_better)])
    return out


@st.composite
def node_answers(draw: st.DrawFn) -> tuple[list[list[list[Hit]]], int, int, bool]:
    """Per node, per query, a row sorted best first; scores from a small set (many ties), and
    some answers with fewer rows than queries."""
    larger = draw(st.booleans())
    nq = draw(st.integers(1, 5))
    k = draw(st.integers(0, 8))
    answers = []
    for n in range(draw(st.integers(0, 4))):
        rows = []
        for q in range(draw(st.integers(0, nq))):
            scores = draw(st.lists(st.sampled_from([-1.5, -0.0, 0.0, 0.25, 0.5, 2.0])
                                   | st.floats(-5, 5), max_size=8))
            rows.append([Hit(f"n{n}q{q}h{j}", s, b"{}", b"", n)
                         for j, s in enumerate(sorted(scores, reverse=larger))])
        answers.append(rows)
    return answers, nq, k, larger


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(node_answers())
def test_array_merge_equals_the_heap_merge(case: tuple[list[list[list[Hit]]], int, int, bool]
                                           ) -> None:
    answers, nq, k, larger = case
    want = old_merge_rows(answers, nq, k, larger)
    # Both ways of merging: sorted in Python (small merges), and on arrays (the rest).
    for small in (fanout.SMALL_MERGE, -1):
        with mock.patch.object(fanout, "SMALL_MERGE", small):
            got = merge_rows(answers, nq, k, larger)
        assert [[h.id for h in row] for row in got] == [[h.id for h in row] for row in want]
