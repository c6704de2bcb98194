"""Scatter-gather search over nodes with a deadline and replica retry.

One request per node covering all the shards it serves for the whole query batch; the local
replica is preferred, then alive ones, then suspect ones. A node that fails or is too slow has
its shards retried on their next replica while time remains. Shards left without an answer
are reported as missing; the caller decides between a partial answer and 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from cluster.clock import Clock
from cluster.docs import Hit
from cluster.errors import AquilaError
from cluster.merge import merge_topk

# Ask one node for these shards; returns one list of hits per query, best first.
AskNode = Callable[[str, list[int], float], Awaitable[list[list[Hit]]]]


@dataclass
class FanoutResult:
    rows: list[list[Hit]]
    missing: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def assign(candidates: dict[int, list[str]], tried: dict[int, int]) -> dict[str, list[int]]:
    """Group shards by the node of their next untried candidate."""
    plan: dict[str, list[int]] = {}
    for shard, nodes in candidates.items():
        i = tried.get(shard, 0)
        if i < len(nodes):
            plan.setdefault(nodes[i], []).append(shard)
    return plan


async def fan_out(
    candidates: dict[int, list[str]],
    ask: AskNode,
    nq: int,
    k: int,
    larger_is_better: bool,
    clock: Clock,
    timeout_s: float,
) -> FanoutResult:
    """Search every shard of `candidates` (shard → replica nodes in preference order)."""
    if len({nodes[0] for nodes in candidates.values()}) == 1:
        # The common one-node case: one awaited call, no tasks to schedule.
        node = next(iter(candidates.values()))[0]
        try:
            async with asyncio.timeout(timeout_s):
                rows = await ask(node, sorted(candidates), timeout_s)
            return FanoutResult(rows)
        except AquilaError as err:
            if not err.transient:
                raise
        except TimeoutError:
            pass
    deadline = clock.now() + timeout_s
    tried: dict[int, int] = {}
    answers: list[list[list[Hit]]] = []
    done: set[int] = set()
    errors: list[str] = []
    pending = dict(candidates)
    while pending:
        plan = assign(pending, tried)
        if not plan:
            break
        remaining = deadline - clock.now()
        if remaining <= 0:
            errors.append("deadline reached")
            break
        tasks = {node: asyncio.ensure_future(ask(node, shards, remaining))
                 for node, shards in plan.items()}
        await asyncio.wait(tasks.values(), timeout=remaining)
        for node, task in tasks.items():
            shards = plan[node]
            if task.done() and task.exception() is None:
                answers.append(task.result())
                done.update(shards)
                continue
            if not task.done():
                task.cancel()
                errors.append(f"{node}: no answer within the deadline")
            else:
                exc = task.exception()
                if isinstance(exc, AquilaError) and not exc.transient:
                    raise exc  # the request itself is bad: another replica would say the same
                errors.append(f"{node}: {exc}")
            for s in shards:
                tried[s] = tried.get(s, 0) + 1
        pending = {s: c for s, c in pending.items() if s not in done}
    rows = merge_rows(answers, nq, k, larger_is_better)
    return FanoutResult(rows, sorted(pending), errors)


def merge_rows(
    answers: Sequence[list[list[Hit]]], nq: int, k: int, larger_is_better: bool
) -> list[list[Hit]]:
    """Per query, the best k hits over every node's answer (the same merge as in a node)."""
    out = []
    for q in range(nq):
        lists = [[(h.score, h) for h in a[q]] for a in answers if q < len(a)]
        out.append([h for _, h in merge_topk(lists, k, larger_is_better=larger_is_better)])
    return out
