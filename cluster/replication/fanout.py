"""Scatter-gather over nodes with a deadline, replica retry and hedging: searches, and any
other per-shard operation (count, a scroll page) through `gather_shards`.

One request per node covering all the shards it serves for the whole query batch; the caller
orders each shard's replicas (local first, then alive, then suspect). A node that fails has
its shards retried at once on their next replica; a node that is merely slow (paused, say)
has its shards asked of their next replica too once a hedge delay has passed, and whichever
answers first serves the shard. Every hit names its shard, so answers that overlap are cut
to one per shard before the merge. When the deadline comes, shards still without an answer
are reported missing; the caller decides between a partial answer and 503.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import numpy as np

from aquila.cluster.clock import Clock, abandon
from aquila.cluster.model.documents import Found, Hit
from aquila.cluster.model.errors import AquilaError
from aquila.cluster.model.merge import merge_columns

A = TypeVar("A")
# Ask one node for these shards within `budget` seconds; one list of hits per query, or this
# node's own hits before their documents are read (`Found`).
Rows = list[list[Hit]]
AskNode = Callable[[str, list[int], float], Coroutine[Any, Any, Rows | Found]]
# The documents of some keys of a `Found` (a hit with score 0 each, None for one gone since).
ReadFound = Callable[[Found, list[int]], Awaitable[list[Hit | None]]]

# Hedge a slow node after this share of the budget, at most after HEDGE_MAX_S seconds.
HEDGE_SHARE = 0.25
HEDGE_MAX_S = 1.0


@dataclass
class FanoutResult:
    rows: list[list[Hit]]
    missing: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Shards asked of their next replica: after a failure (retried), after a slow answer
    # (hedged). For the node's metrics.
    retried: int = 0
    hedged: int = 0


def assign(
    candidates: dict[int, list[str]], tried: dict[int, int], shards: Sequence[int]
) -> dict[str, list[int]]:
    """Group these shards by the node of their next untried candidate."""
    plan: dict[str, list[int]] = {}
    for shard in shards:
        nodes = candidates[shard]
        i = tried.get(shard, 0)
        if i < len(nodes):
            plan.setdefault(nodes[i], []).append(shard)
    return plan


@dataclass
class Gathered(Generic[A]):
    """One answer per group of shards that answered (overlaps already cut away), the shards
    with no answer, and what went wrong on the way."""

    answers: list[A]
    missing: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retried: int = 0  # shards asked of their next replica after a failure
    hedged: int = 0  # ... after a slow answer


# Which node alone serves every shard that has a replica, the shards it serves, and those
# with none (`single_node`).
Single = tuple[str, list[int], list[int]]


def single_node(candidates: dict[int, list[str]]) -> Single | None:
    """One node and no alternative (a one-node cluster): that node, the shards it serves and
    the shards with no replica; else None. A function of `candidates` alone: a caller that
    keeps them (the read path, per version of the map) keeps this too."""
    pending = [s for s, nodes in candidates.items() if nodes]
    nodes = {candidates[s][0] for s in pending}
    if len(nodes) == 1 and all(len(candidates[s]) == 1 for s in pending):
        return (next(iter(nodes)), sorted(pending),
                sorted(s for s, n in candidates.items() if not n))
    return None


_UNKNOWN: Single = ("", [], [])


async def gather_shards(
    candidates: dict[int, list[str]],
    ask: Callable[[str, list[int], float], Coroutine[Any, Any, A]],
    restrict: Callable[[A, list[int]], A],
    clock: Clock,
    timeout_s: float,
    single: Single | None = _UNKNOWN,
) -> Gathered[A]:
    """Ask one replica of every shard of `candidates` (shard → replica nodes in preference
    order), with retry, hedging and the deadline; `restrict(answer, shards)` cuts a node's
    answer down to some of the shards it was asked about (the others came first from a hedge).
    Any per-shard operation reuses this: search, count, scroll. `single`: `single_node`
    of the candidates when the caller has it already."""
    if single is _UNKNOWN:
        single = single_node(candidates)
    if single is not None:
        # One node and no alternative (a one-node cluster): one awaited call, no tasks.
        return await _single(*single, ask, clock, timeout_s)
    deadline = clock.now() + timeout_s
    pending = {s for s, nodes in candidates.items() if nodes}
    tried: dict[int, int] = {}
    inflight: dict[asyncio.Future[A], tuple[str, list[int]]] = {}
    answers: list[A] = []
    errors: list[str] = []
    counts = {"retried": 0, "hedged": 0}
    # Requests that ended, in the order they did, and what the loop below waits on: one
    # future per wait, set by the first to end (not a wait on every request in flight, which
    # registers and removes a callback on each of them every time).
    ended: list[asyncio.Future[A]] = []
    wake: list[asyncio.Future[None]] = []
    loop = asyncio.get_running_loop()

    def on_end(task: asyncio.Future[A]) -> None:
        ended.append(task)
        if wake and not wake[0].done():
            wake[0].set_result(None)

    def launch(shards: Sequence[int]) -> None:
        budget = deadline - clock.now()
        for node, group in assign(candidates, tried, shards).items():
            for s in group:
                tried[s] = tried.get(s, 0) + 1
            task = loop.create_task(ask(node, group, budget))
            task.add_done_callback(on_end)
            inflight[task] = (node, group)

    launch(sorted(pending))
    hedge_at: float | None = clock.now() + min(timeout_s * HEDGE_SHARE, HEDGE_MAX_S)
    try:
        while pending and inflight:
            now = clock.now()
            if now >= deadline:
                break
            if not ended:
                wait_s = (deadline - now if hedge_at is None
                          else max(0.0, min(hedge_at, deadline) - now))
                wake.append(loop.create_future())
                try:
                    await clock.wait_first(wake, wait_s)
                finally:
                    wake.pop().cancel()
            done = [t for t in ended if t in inflight]
            ended.clear()
            for task in done:
                node, group = inflight.pop(task)
                exc = task.exception()
                if exc is None:
                    fresh = [s for s in group if s in pending]
                    answer = task.result()
                    if len(fresh) < len(group):  # a hedge answered some of it first
                        answer = restrict(answer, fresh)
                    if fresh:
                        answers.append(answer)
                        pending.difference_update(fresh)
                    continue
                if isinstance(exc, AquilaError) and not exc.transient:
                    raise exc  # the request itself is bad: another replica would say the same
                errors.append(f"{node}: {exc}")
                again = [s for s in group if s in pending]
                counts["retried"] += sum(1 for s in again if tried.get(s, 0) < len(candidates[s]))
                launch(again)
            if not done and hedge_at is not None and clock.now() >= hedge_at:
                hedge_at = None  # once: hedging every round would double the load under stress
                slow = [s for s in sorted(pending) if tried.get(s, 0) < len(candidates[s])]
                if slow:
                    errors.append(f"hedged shard(s) {slow} after a slow answer")
                    counts["hedged"] += len(slow)
                    launch(slow)
    finally:
        # Slower replicas, hedges that lost and tasks finished in the same round as an error
        # raised above: cancelled, and whatever they end with consumed (never "exception was
        # never retrieved").
        abandon(list(inflight))
    missing = sorted(pending | {s for s, n in candidates.items() if not n})
    if missing:
        errors.extend(f"{n}: no answer within the deadline"
                      for n in sorted({n for n, _ in inflight.values()}))
    return Gathered(answers, missing, errors, counts["retried"], counts["hedged"])


async def _single(
    node: str, shards: list[int], empty: list[int],
    ask: Callable[[str, list[int], float], Awaitable[A]], clock: Clock, timeout_s: float,
) -> Gathered[A]:
    try:
        # Copies: the lists may be the caller's, kept for its next search.
        answer = await clock.wait_for(ask(node, list(shards), timeout_s), timeout_s)
    except AquilaError as exc:
        if not exc.transient:
            raise
        return Gathered([], sorted(shards + empty), [f"{node}: {exc}"])
    except TimeoutError:
        return Gathered([], sorted(shards + empty), [f"{node}: no answer within the deadline"])
    return Gathered([answer], list(empty))


async def fan_out(
    candidates: dict[int, list[str]],
    ask: AskNode,
    nq: int,
    k: int,
    larger_is_better: bool,
    clock: Clock,
    timeout_s: float,
    single: Single | None = _UNKNOWN,
    read: ReadFound | None = None,
) -> FanoutResult:
    """Search every shard of `candidates` (shard → replica nodes in preference order);
    `single` as for `gather_shards`. An answer that is a `Found` (this node's own, when
    `ask` gives one) has only the documents of its hits that the merge keeps read, by
    `read`."""
    got = await gather_shards(candidates, ask, _hits_of, clock, timeout_s, single)
    answers = got.answers
    if any(isinstance(a, Found) for a in answers):
        if read is None:
            raise TypeError("a Found answer needs `read`")
        rows = await merge_found(answers, nq, k, larger_is_better, read)
    elif len(answers) == 1:
        only = answers[0]  # one node answered for every shard: nothing to merge
        assert not isinstance(only, Found)
        rows = only if len(only) == nq else [[] for _ in range(nq)]
    else:
        rows = merge_rows([a for a in answers if not isinstance(a, Found)], nq, k,
                          larger_is_better)
    return FanoutResult(rows, got.missing, got.errors, got.retried, got.hedged)


@dataclass(slots=True)
class _Unread(Hit):
    """A hit of a `Found` in a merge, its document not read yet."""

    key: int = -1
    answer: int = -1  # which answer's


async def merge_found(answers: Sequence[Rows | Found], nq: int, k: int,
                      larger_is_better: bool, read: ReadFound) -> list[list[Hit]]:
    """`merge_rows` of answers some of which are `Found`s: merged on their scores, then only
    the documents of the hits the merge keeps are read. A hit whose document is gone since
    (deleted) drops out, and the merge is made again without it: the next hit takes its
    place, as if it had been left out when the search read its documents (the answer is
    the one `merge_rows` gives of the answers with every document read at the search)."""
    gone: dict[int, set[int]] = {}  # per answer, the keys whose documents are gone
    docs: dict[tuple[int, int], Hit] = {}  # (answer, key) -> the document read
    while True:
        rows_of = [_placeholders(a, i, gone.get(i, set())) if isinstance(a, Found) else a
                   for i, a in enumerate(answers)]
        merged = merge_rows(rows_of, nq, k, larger_is_better)
        wanted: dict[int, dict[int, None]] = {}
        for row in merged:
            for h in row:
                if isinstance(h, _Unread) and (h.answer, h.key) not in docs:
                    wanted.setdefault(h.answer, {})[h.key] = None
        lost = False
        for i, keys in wanted.items():
            found = answers[i]
            assert isinstance(found, Found)
            asked = list(keys)
            for key, doc in zip(asked, await read(found, asked), strict=True):
                if doc is None:
                    gone.setdefault(i, set()).add(key)
                    lost = True
                else:
                    docs[(i, key)] = doc
        if not lost:
            break
    out: list[list[Hit]] = []
    for row in merged:
        hits: list[Hit] = []
        for h in row:
            if isinstance(h, _Unread):
                d = docs[(h.answer, h.key)]
                hits.append(Hit(d.id, h.score, d.metadata, d.vector, h.shard))
            else:
                hits.append(h)
        out.append(hits)
    return out


def _placeholders(found: Found, answer: int, gone: set[int]) -> Rows:
    """A `Found`'s hits as rows of `_Unread`, best first, without those gone."""
    rows: Rows = []
    for srow, krow, shrow in zip(found.scores, found.keys, found.shards, strict=True):
        rows.append([_Unread("", score, b"", b"", shard, key, answer)
                     for score, key, shard in zip(srow, krow, shrow, strict=True)
                     if key >= 0 and key not in gone])
    return rows


_score = operator.attrgetter("score")  # a hit's: the sort key of a small merge


def _hits_of(rows: Rows | Found, shards: list[int]) -> Rows | Found:
    keep = set(shards)
    if isinstance(rows, Found):
        return replace(rows, keys=[[key if s in keep else -1 for key, s in zip(krow, srow,
                                                                             strict=True)]
                                   for krow, srow in zip(rows.keys, rows.shards, strict=True)])
    return [[h for h in row if h.shard in keep] for row in rows]


# Hits below which a merge sorts each query's hits in Python: for a few answers of one query
# (a search of one vector over three nodes: 30 hits) that costs a quarter of the arrays' setup.
SMALL_MERGE = 256


def merge_rows(
    answers: Sequence[list[list[Hit]]], nq: int, k: int, larger_is_better: bool
) -> list[list[Hit]]:
    """Per query, the best k hits over every answer (the same merge as in a node), for all
    queries at once on arrays (`merge_columns`): one sort, no heap of hits per query. A small
    merge sorts in Python, with the same order: by score, ties in answer order then position
    (Python's sort is stable, reversed or not)."""
    if sum(len(row) for answer in answers for row in answer[:nq]) <= SMALL_MERGE:
        small: list[list[Hit]] = []
        for q in range(nq):
            row = [h for answer in answers if q < len(answer) for h in answer[q]]
            row.sort(key=_score, reverse=larger_is_better)
            small.append(row[:k])
        return small
    hits: list[Hit] = []
    queries: list[np.ndarray] = []
    for answer in answers:
        rows = answer[:nq]
        for row in rows:
            hits.extend(row)
        queries.append(np.repeat(np.arange(len(rows)), [len(r) for r in rows]))
    out: list[list[Hit]] = [[] for _ in range(nq)]
    if not hits:
        return out
    of = np.concatenate(queries)
    scores = np.fromiter((h.score for h in hits), np.float64, len(hits))
    query = of.tolist()
    for i in merge_columns(scores, of, nq, k, larger_is_better=larger_is_better).tolist():
        out[query[i]].append(hits[i])
    return out
