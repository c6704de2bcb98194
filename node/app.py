"""Build the aiohttp application of one node: typed state, routes, and a cleanup context that
starts and stops storage and background work in order."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from aquila.cluster.clock import Clock, SystemClock
from aquila.cluster.membership.transport import Transport
from aquila.cluster.model.errors import Unavailable
from aquila.cluster.peers.client import PeerClient
from aquila.node.blocking import Blocking
from aquila.node.cluster_node import ClusterNode
from aquila.node.config import MIB, NodeConfig
from aquila.node.files import write_atomic
from aquila.node.http.api import add_public_routes
from aquila.node.http.cluster_api import add_cluster_routes
from aquila.node.http.dashboard import add_ui_routes
from aquila.node.http.internal_api import add_internal_routes
from aquila.node.http.observe import front
from aquila.node.keys import BLOCKING, CLUSTER, CONFIG, METRICS, READY, SERVICE
from aquila.node.logs import set_node
from aquila.node.metrics import Metrics
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.heap import malloc_figures

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


def make_app(
    config: NodeConfig,
    *,
    clock: Clock | None = None,
    transport: Transport | None = None,
    peers: PeerClient | None = None,
) -> web.Application:
    """The node's application. The system clock, gossip over UDP and the HTTP peer client
    unless others are given (a fake clock, `memnet`, `mempeers`); given ones are started and
    closed by whoever gave them."""
    # Bodies are decompressed by node/http/body.py, which counts the limit as it inflates.
    app = web.Application(middlewares=[front],
                          client_max_size=config.max_wire_bytes,
                          handler_args={"auto_decompress": False})
    clock = clock or SystemClock()
    app[CONFIG] = config
    app.cleanup_ctx.append(functools.partial(_storage, clock=clock, transport=transport,
                                             peers=peers))
    app[METRICS] = Metrics()
    app[READY] = asyncio.Event()
    add_public_routes(app)
    add_cluster_routes(app)
    add_internal_routes(app, clock)
    add_ui_routes(app)
    return app


async def _join_then_ready(app: web.Application, cluster: ClusterNode) -> None:
    """Ready once joined (the HTTP server must be up first: peers push-pull with us).

    Configured seeds must answer. Peers remembered from an earlier run are tried too, so a
    restarted node finds its cluster even without seeds (a restarted first node, say); when
    none of them answers it serves alone and keeps looking for them in the background."""
    config = app[CONFIG]
    service = cluster.service
    known = await cluster.known_peers()
    if config.seeds:
        await service.join(list(dict.fromkeys([*config.seeds, *known])), deadline_s=float("inf"))
    elif known and not await service.try_join(known):
        service.spawn(service.rejoin(known))
    while True:
        try:
            await service.runtime.wait_reconciled(60)
            break
        except Unavailable:
            log.warning("still opening this node's shards (see the errors above)")
    app[READY].set()
    log.info("node %s ready on %s", cluster.node_id, config.addr)


async def _storage(
    app: web.Application,
    *,
    clock: Clock,
    transport: Transport | None,
    peers: PeerClient | None,
) -> AsyncIterator[None]:
    config = app[CONFIG]
    blocking = Blocking(config.search_threads)
    app[BLOCKING] = blocking
    tuning = Tuning(
        train_min=config.train_min,
        retrain_growth=config.retrain_growth,
        search_batch_rows=config.search_batch_rows,
        rocksdb_memory_bytes=config.rocksdb_memory_mib * MIB,
    )
    engine = Engine(Path(config.data_dir), blocking, tuning, config.fsync)
    engine.on_trained = app[METRICS].trained
    node_id = node_identity(config)
    set_node(node_id)
    await engine.start()
    cluster = ClusterNode.build(node_id, config, engine, blocking, clock=clock,
                                transport=transport, peers=peers)
    app[CLUSTER] = cluster
    app[SERVICE] = cluster.service
    await cluster.start()
    app[METRICS].watch_cluster(cluster.metrics_snapshot)
    app[METRICS].watch_storage(lambda: {n: c.figures() for n, c in engine.collections.items()})
    app[METRICS].watch_plans(lambda: dict(engine.plan_counts))
    app[METRICS].watch_heap(malloc_figures)
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(engine.snapshot_loop(config.snapshot_interval_s, cluster.service.clock)),
        loop.create_task(app[METRICS].watch_loop_lag(cluster.service.clock)),
        loop.create_task(_join_then_ready(app, cluster)),
    ]
    try:
        yield
    finally:
        app[READY].clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await cluster.stop()
        finally:
            try:
                await engine.close()
            finally:
                blocking.close()  # else Python's exit would wait for a training
