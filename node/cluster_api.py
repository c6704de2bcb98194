"""Public cluster routes: membership, the shard map, join, leave, rebalance."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cluster.config_parse import parse_seeds
from cluster.errors import BadRequest
from node.api import json_response, read_json
from node.keys import CLUSTER


async def cluster_info(request: web.Request) -> web.Response:
    node = request.app[CLUSTER]
    me = node.gossip.local_member()
    return json_response({
        "node": {"id": me.id, "addr": me.addr},
        "epoch": node.runtime.state.epoch,
        "members": [
            {"id": m.id, "addr": m.addr, "state": m.state.value, "incarnation": m.incarnation}
            for m in sorted(node.gossip.members(), key=lambda m: m.id)
        ],
    })


async def shards(request: web.Request) -> web.Response:
    node = request.app[CLUSTER]
    state = node.runtime.state
    out: dict[str, Any] = {}
    for name, e in state.live().items():
        out[name] = [
            {"shard": s, "replicas": list(reps),
             "moving": (m.to_json() if (m := e.move_of(s)) else None)}
            for s, reps in enumerate(e.replicas)
        ]
    return json_response({"epoch": state.epoch, "collections": out})


async def join(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("body must be an object with 'seeds'")
    seeds = parse_seeds(body.get("seeds"))
    node = request.app[CLUSTER]
    from cluster.gossip import JoinError

    try:
        n = await node.join(seeds, deadline_s=10.0)
    except JoinError as exc:
        from cluster.errors import Unavailable

        raise Unavailable(f"could not join: {exc}") from None
    return json_response({"joined": n, "members": len(node.gossip.members())})


def add_cluster_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/cluster", cluster_info)
    r.add_get("/v1/cluster/shards", shards)
    r.add_post("/v1/cluster/join", join)
