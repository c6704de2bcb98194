"""Typed application state keys."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from node.config import NodeConfig

if TYPE_CHECKING:
    from node.metrics import Metrics
    from node.service import LocalService

CONFIG = web.AppKey("config", NodeConfig)
SERVICE: web.AppKey[LocalService] = web.AppKey("service")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
READY = web.AppKey("ready", asyncio.Event)
