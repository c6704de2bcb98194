"""Asking a search how it was planned, over REST: `explain` answers with one plan per shard,
only when asked; bad values are refused; /metrics counts the planner's paths."""

from __future__ import annotations

from typing import Any

import numpy as np

from aquila.cluster.replication.remote import decode_plans
from tests.conftest import Node, expect_error

FILTER = {"must": [{"key": "g", "match": 3}]}


async def test_explain_answers_each_shards_plan(node: Node, rng: np.random.Generator) -> None:
    await node.create("c", 8, shards=3)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    await node.upsert_matrix("c", x, [{"g": i % 10} for i in range(120)])
    q = x[:2].tolist()
    first = await node.search("c", vectors=q, k=5, filter=FILTER, explain=True)
    plain = await node.search("c", vectors=q, k=5, filter=FILTER)
    assert "plans" not in plain  # only when asked: the v1 answer is unchanged
    assert first["results"] == plain["results"]
    plans: list[dict[str, Any]] = first["plans"]
    assert [p["shard"] for p in plans] == [0, 1, 2]
    node_id = (node.data_dir / "node_id").read_text().strip()
    for p in plans:
        assert p["node"] == node_id
        assert p["path"] == "exact"  # a flat index: scoring 12 matches beats anything
        assert "nprobe" not in p  # no lists probed
    assert sum(p["documents"] for p in plans) == 120
    assert sum(p["matches"] for p in plans) == 12
    again = await node.search("c", vectors=q, k=5, filter=FILTER, explain=True)
    assert [p["cached"] for p in first["plans"]] == [False] * 3
    assert [p["cached"] for p in again["plans"]] == [True] * 3
    unfiltered = await node.search("c", vectors=q, k=5, explain=True)
    assert {p["path"] for p in unfiltered["plans"]} == {"unfiltered"}
    nothing = await node.search("c", vectors=q, k=5, explain=True,
                                filter={"must": [{"key": "g", "match": 99}]})
    assert nothing["results"] == [[], []]
    assert {p["path"] for p in nothing["plans"]} == {"none"}
    text = await (await node.client.get("/metrics")).text()
    counts = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("aquila_search_plans_total{")}
    # Per query and shard: 3 filtered searches of 2 queries over 3 shards, then one with none.
    assert counts == {"exact": 18.0, "none": 6.0}


async def test_explain_must_be_a_boolean(node: Node) -> None:
    await node.create("c", 4)
    for bad in ("yes", 1, None, [True]):
        resp = await node.post_json("/v1/collections/c/search",
                                    {"vector": [0, 0, 0, 1], "explain": bad})
        await expect_error(resp, 400, "bad_request")


def test_a_peers_plans_are_bounded() -> None:
    """Plans from a peer reach the client: only well-formed plans of the shards asked for,
    known fields, bounded numbers; a malformed one is left out, the rest kept."""
    good = {"shard": 1, "path": "selector", "matches": 5, "documents": 9, "cached": True,
            "nprobe": 12, "nprobe_mean": 8.5, "candidates": 40, "secret": "x"}
    raw = [good,
           {"shard": 2, "path": "rm -rf", "matches": 1},
           {"shard": 7, "path": "exact"},
           {"shard": 3, "path": "exact", "matches": -1},
           {"shard": 0, "path": "exact", "matches": True},
           "not a plan"]
    out = decode_plans(raw, [0, 1, 2, 3])
    assert out == {1: {k: v for k, v in good.items() if k != "secret"}}
    assert decode_plans({"shard": 1}, [1]) == {}
    assert decode_plans([good] * 1000, [1]) == {1: out[1]}  # no more plans than shards
