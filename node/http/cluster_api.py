"""Public cluster routes: membership, the shard map, join, leave, rebalance."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from aquila.cluster.membership.gossip import JoinError
from aquila.cluster.model.config_parse import parse_seeds
from aquila.cluster.model.errors import BadRequest, Unavailable
from aquila.cluster.movement.plan import Move
from aquila.cluster.service import ClusterService
from aquila.node.http.api import json_response, read_json
from aquila.node.http.parse import refuse_unknown
from aquila.node.keys import SERVICE


async def cluster_info(request: web.Request) -> web.Response:
    node = request.app[SERVICE]
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
    node = request.app[SERVICE]
    state = node.runtime.state
    out: dict[str, Any] = {}
    for name, e in state.live().items():
        out[name] = [
            {"shard": s, "replicas": list(reps), "moving": _moving(node, name, s)}
            for s, reps in enumerate(e.replicas)
        ]
    return json_response({"epoch": state.epoch, "collections": out})


def _moving(node: ClusterService, name: str, shard: int) -> dict[str, Any] | None:
    entry = node.runtime.state.get(name)
    mv = entry.move_of(shard) if entry is not None else None
    if mv is None:
        # A move this node is driving that still waits for a slot shows as not yet started.
        queued = node.rebalancer.active.get((name, shard))
        if queued is None:
            return None
        return {"from": queued.move.from_node, "to": queued.move.to_node, "progress": 0.0}
    out = mv.public()
    progress = node.rebalancer.progress_of(name, shard)  # live figure on the driving node
    if progress is not None:
        out["progress"] = round(progress, 4)
    return out


def _moves_json(moves: list[Move]) -> list[dict[str, Any]]:
    return [{"collection": m.collection, "shard": m.shard, "from": m.from_node, "to": m.to_node}
            for m in moves]


def _alive(node: ClusterService, exclude: str | None = None) -> list[str]:
    return [n for n in node.view.alive() if n != exclude]


def _refuse_if_moving(node: ClusterService) -> None:
    """One rebalance at a time in the whole cluster: two drivers would plan the same moves."""
    drivers = node.rebalancer.moves_in_map()
    if node.rebalancer.busy or drivers:
        raise Unavailable(
            f"a rebalance is under way (driven by {', '.join(drivers) or node.node_id}); "
            "see GET /v1/cluster/shards"
        )


def _fields(body: Any, allowed: frozenset[str], shape: str) -> dict[str, Any]:
    """The body as an object with no field but `allowed` (a misspelt "dry_run" would start
    a real rebalance); 400 otherwise."""
    if not isinstance(body, dict):
        raise BadRequest(f"body is {shape}")
    refuse_unknown(body, allowed, f"; body is {shape}")
    return body


async def rebalance(request: web.Request) -> web.Response:
    body = await read_json(request) if request.can_read_body else {}
    body = _fields(body, frozenset({"dry_run"}), '{"dry_run": bool}')
    if not isinstance(body.get("dry_run", False), bool):
        raise BadRequest("body is {\"dry_run\": bool}")
    node = request.app[SERVICE]
    _refuse_if_moving(node)
    moves = await node.rebalancer.plan_moves(_alive(node))
    if moves and not body.get("dry_run", False):
        _refuse_if_moving(node)  # another rebalance may have started while we planned
        node.spawn(node.rebalancer.run(moves))
    return json_response({"moves": _moves_json(moves)})


async def leave(request: web.Request) -> web.Response:
    """Move every replica this node holds to the others, wait for that, then leave."""
    if request.can_read_body:
        _fields(await read_json(request), frozenset(), "empty or {}")
    node = request.app[SERVICE]
    others = _alive(node, exclude=node.node_id)
    held = any(node.node_id in reps for e in node.runtime.state.live().values()
               for reps in e.replicas)
    if held and not others:
        raise Unavailable("no other alive node to hand this node's shards to")
    _refuse_if_moving(node)
    moves = await node.rebalancer.plan_moves(others) if others else []
    _refuse_if_moving(node)  # another rebalance may have started while we planned
    stats = await node.rebalancer.run(moves)
    failed = [t for t in stats.transfers if t.error]
    if failed:
        raise Unavailable(f"{len(failed)} shard move(s) failed; still a member: "
                          + "; ".join(t.error for t in failed[:3]))
    await node.gossip.leave(5.0)
    return json_response({"moves": _moves_json(moves), "left": True})


async def join(request: web.Request) -> web.Response:
    body = _fields(await read_json(request), frozenset({"seeds"}),
                   '{"seeds": ["host:port", ...]}')
    if not isinstance(body.get("seeds"), list):  # not the settings' comma-separated string
        raise BadRequest("'seeds' must be a non-empty list of host:port")
    seeds = parse_seeds(body["seeds"])
    node = request.app[SERVICE]
    try:
        n = await node.join(seeds, deadline_s=10.0)
    except JoinError as exc:
        raise Unavailable(f"could not join: {exc}") from None
    return json_response({"joined": n, "members": len(node.gossip.members())})


def add_cluster_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/cluster", cluster_info)
    r.add_get("/v1/cluster/shards", shards)
    r.add_post("/v1/cluster/join", join)
    r.add_post("/v1/cluster/rebalance", rebalance)
    r.add_post("/v1/cluster/leave", leave)
