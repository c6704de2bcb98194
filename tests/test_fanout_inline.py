"""A coordinator that asks peers too searches its own part inline (on the event loop, see
`Collection.search`), once the peers' requests have left; alone, it does not."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from aquila.cluster.clock import SystemClock
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.documents import Hit
from aquila.cluster.model.operations import SearchRequest
from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.replication.reads import ReadPath
from aquila.cluster.replication.replica import Replica, Replicas
from aquila.cluster.state.entries import CollectionEntry

SPEC = CollectionSpec("c", 2, "l2", 4, 1)


class View:
    generation = 0

    def table(self) -> dict[str, Any]:
        return {}

    def ordered(self, replicas: Any) -> list[str]:
        return list(replicas)


class Recorder:
    """A node's replica that records each search: (node, shards, inline) in call order."""

    def __init__(self, node: str, calls: list[tuple[str, list[int], bool]]) -> None:
        self.node = node
        self.calls = calls

    async def search(self, spec: CollectionSpec, req: SearchRequest, shards: list[int],
                     budget: float, plans: dict[int, dict[str, Any]] | None = None, *,
                     inline: bool = False) -> list[list[Hit]]:
        self.calls.append((self.node, shards, inline))
        return [[Hit(f"{self.node}-{s}", float(s), b"{}", b"", s) for s in shards]]


def read_path(me: str, calls: list[tuple[str, list[int], bool]]) -> ReadPath:
    replicas = Replicas(me, cast(Replica, Recorder(me, calls)),
                        lambda node: cast(Replica, Recorder(node, calls)))
    return ReadPath(cast(MemberView, View()), replicas, SystemClock())


def request() -> SearchRequest:
    return SearchRequest(np.zeros((1, 2), np.float32), 4, None, None, None, True, False,
                         False, None)


async def test_the_local_part_of_a_fan_out_runs_inline_after_the_peers_requests() -> None:
    calls: list[tuple[str, list[int], bool]] = []
    # n1, the coordinator, holds shards 0 and 2, the first asked.
    entry = CollectionEntry(SPEC, (("n1",), ("n2",), ("n1",), ("n3",)), 1, "n1")
    out = await read_path("n1", calls).search(entry, request())
    assert [c[0] for c in calls] == ["n2", "n3", "n1"]
    assert calls[-1] == ("n1", [0, 2], True)
    assert not any(inline for node, _, inline in calls if node != "n1")
    assert [h["id"] for h in out["results"][0]] == ["n1-0", "n2-1", "n1-2", "n3-3"]


async def test_a_search_of_this_node_alone_is_not_inline() -> None:
    calls: list[tuple[str, list[int], bool]] = []
    entry = CollectionEntry(SPEC, (("n1",),) * 4, 1, "n1")
    await read_path("n1", calls).search(entry, request())
    assert calls == [("n1", [0, 1, 2, 3], False)]
    # Nor is it when this node holds none of the shards asked.
    calls.clear()
    entry = CollectionEntry(SPEC, (("n2",), ("n3",), ("n2",), ("n3",)), 1, "n1")
    await read_path("n1", calls).search(entry, request())
    assert sorted(calls) == [("n2", [0, 2], False), ("n3", [1, 3], False)]
