"""Typed application state keys."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from aquila.node.config import NodeConfig

if TYPE_CHECKING:
    from aquila.cluster.service import ClusterService
    from aquila.node.blocking import Blocking
    from aquila.node.cluster_node import ClusterNode
    from aquila.node.metrics import Metrics

CONFIG = web.AppKey("config", NodeConfig)
SERVICE: web.AppKey[ClusterService] = web.AppKey("service")
CLUSTER: web.AppKey[ClusterNode] = web.AppKey("cluster")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
READY = web.AppKey("ready", asyncio.Event)
BLOCKING: web.AppKey[Blocking] = web.AppKey("blocking")
