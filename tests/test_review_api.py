"""Findings of the security review in the public API, on a real in-process node: bad input
is a 400, never a 500."""

from __future__ import annotations

from typing import Any

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
