"""Findings of the security review in the public API, on a real in-process node: bad input
is a 400, never a 500."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import StartNode, expect_error, ok_json


@pytest.mark.parametrize("include", [[[1]], [{}], [["metadata"]]])
async def test_an_unhashable_include_is_400(start_node: StartNode, include: Any) -> None:
    """`include` holding lists or objects was put in a set: TypeError, a 500 with a traceback."""
    node = await start_node()
    c = node.client
    await ok_json(await c.put("/v1/collections/c", json={"dim": 2, "index": {"type": "flat"}}),
                  201)
    resp = await c.post("/v1/collections/c/search",
                        json={"vector": [1.0, 0.0], "include": include})
    await expect_error(resp, 400, "bad_request")


SPEC = {"name": "c", "dim": 2, "shards": 2, "index": {"type": "flat"}}


@pytest.mark.parametrize("replicas", [[], [["n1"]], [["n1"], []], [["n1"], ["n1"], ["n1"]]])
def test_a_state_entry_with_a_replica_list_per_shard_only(replicas: list[list[str]]) -> None:
    """An entry from a peer whose map has fewer replica lists than its shards (or a shard
    with none) was adopted; every write and read of that collection then failed with an
    IndexError, a 500."""
    from aquila.cluster.model.bounds import BoundsError
    from aquila.cluster.state.entries import ClusterState

    raw = {"spec": SPEC, "replicas": replicas, "epoch": 9, "origin": "x", "uid": "u"}
    with pytest.raises(BoundsError):
        ClusterState.decode_entries(orjson.dumps([raw]))
    good = {**raw, "replicas": [["n1"], ["n1", "n2"]]}
    assert ClusterState.decode_entries(orjson.dumps([good]))[0].replicas
    # A tombstone's map is never routed by.
    assert ClusterState.decode_entries(orjson.dumps([{**raw, "replicas": [], "deleted": True}]))[0].deleted


async def test_a_pushed_short_map_does_not_break_writes(start_node: StartNode) -> None:
    """Seen against a real development node: one unauthenticated state push (the route is
    open on loopback without a secret, as a peer's), then every write of the collection
    answered 500."""
    node = await start_node()
    c = node.client
    await ok_json(await c.put("/v1/collections/c", json={"dim": 2, "shards": 2,
                                                         "index": {"type": "flat"}}), 201)
    resp = await c.post("/internal/v1/state", json=[
        {"spec": SPEC, "replicas": [], "epoch": 10**6, "origin": "x", "uid": "u"}])
    await expect_error(resp, 400, "bad_request")
    body = {"documents": [{"id": "a", "vector": [1.0, 0.0]}]}
    await ok_json(await c.post("/v1/collections/c/documents", json=body))
