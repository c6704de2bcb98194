"""Build the aiohttp application of one node: typed state, routes, and a cleanup context that
starts and stops storage and background work in order."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from cluster.errors import Unavailable
from node.api import add_public_routes, error_middleware
from node.blocking import Blocking
from node.cluster_api import add_cluster_routes
from node.cluster_node import ClusterNode
from node.collection import Tuning
from node.config import NodeConfig
from node.engine import Engine
from node.files import write_atomic
from node.internal_api import add_internal_routes
from node.keys import BLOCKING, CLUSTER, CONFIG, METRICS, READY, SERVICE
from node.metrics import Metrics

log = logging.getLogger(__name__)


def node_identity(config: NodeConfig) -> str:
    """The configured node id, or the one generated at first start and kept on disk."""
    if config.node_id:
        return config.node_id
    path = Path(config.data_dir) / "node_id"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    node_id = "node-" + uuid.uuid4().hex[:12]
    write_atomic(path, node_id.encode())
    return node_id


def make_app(config: NodeConfig) -> web.Application:
    # Bodies are decompressed by node/body.py, which counts the limit as it inflates.
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_wire_bytes,
                          handler_args={"auto_decompress": False})
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[READY] = asyncio.Event()
    add_public_routes(app)
    add_cluster_routes(app)
    add_internal_routes(app)
    app.cleanup_ctx.append(_storage)
    return app


async def _join_then_ready(app: web.Application, cluster: ClusterNode) -> None:
    """Ready once joined (the HTTP server must be up first: peers push-pull with us).

    Configured seeds must answer. Peers remembered from an earlier run are tried too, so a
    restarted node finds its cluster even without seeds (a restarted first node, say); when
    none of them answers it serves alone and keeps looking for them in the background."""
    config = app[CONFIG]
    known = await cluster.known_peers()
    if config.seeds:
        await cluster.join(list(dict.fromkeys([*config.seeds, *known])), deadline_s=float("inf"))
    elif known and not await cluster.try_join(known):
        cluster.spawn(cluster.rejoin(known))
    while True:
        try:
            await cluster.runtime.wait_reconciled(60)
            break
        except Unavailable:
            log.warning("still opening this node's shards (see the errors above)")
    app[READY].set()
    log.info("node %s ready on %s", cluster.node_id, config.addr)


async def _storage(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    blocking = Blocking(config.search_threads)
    app[BLOCKING] = blocking
    tuning = Tuning(
        train_min=config.train_min,
        retrain_growth=config.retrain_growth,
        search_batch_rows=config.search_batch_rows,
    )
    engine = Engine(Path(config.data_dir), blocking, tuning, config.fsync)
    node_id = node_identity(config)
    await engine.start()
    cluster = ClusterNode.build(node_id, config, engine, blocking)
    app[CLUSTER] = cluster
    app[SERVICE] = cluster.coordinator
    await cluster.start()
    app[METRICS].watch_cluster(cluster.metrics_snapshot)
    app[METRICS].watch_collections(lambda: {n: c.count() for n, c in engine.collections.items()})
    snapshots = asyncio.get_running_loop().create_task(
        engine.snapshot_loop(config.snapshot_interval_s)
    )
    joining = asyncio.get_running_loop().create_task(_join_then_ready(app, cluster))
    try:
        yield
    finally:
        app[READY].clear()
        for task in (joining, snapshots):
            task.cancel()
        await asyncio.gather(joining, snapshots, return_exceptions=True)
        await cluster.stop()
        await engine.close()
        blocking.close()
