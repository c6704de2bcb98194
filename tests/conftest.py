"""Shared fixtures: a real one-node Aquila app served over real HTTP on 127.0.0.1.

`node` is a running node (small `train_min` so IVF training happens on a few hundred
documents); `start_node(**overrides)` starts more nodes with other settings (API key, small
body limit, ...). Every node gets its own data_dir under pytest's tmp_path and a free port.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families

from aquila.node.app import make_app
from aquila.node.blocking import Blocking
from aquila.node.config import NodeConfig, load_config
from aquila.node.storage.collection import Collection
from tests.loop_guard import LoopHolds

# Property tests check correctness, never timing: Hypothesis's default 200 ms deadline per
# example failed a membership property that took 260 ms on a loaded 2-core machine.
settings.register_profile("aquila", deadline=None)
settings.load_profile("aquila")

# A small training threshold so IVF indexes train on a few hundred documents in tests.
TEST_TRAIN_MIN = 64


def free_port() -> int:
    """A port free for both TCP (HTTP) and UDP (gossip), which a node binds together."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free TCP+UDP port")


async def wait_for(
    pred: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout_s: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll `pred` (sync or async) until it returns something truthy; that value is returned.
    Fails the test with `what` once `timeout_s` seconds have passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval)


async def settled(coll: Collection, timeout_s: float = 30.0, what: str = "the training") -> None:
    """Wait (`wait_for`) until `coll`'s index is trained and no background work runs (the
    training's task with it: it holds the collection until it ends)."""
    await wait_for(lambda: coll.index.trained and coll.idle, timeout_s, what=what)


# A /metrics scrape's samples by name and labels.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metric_samples(text: str) -> Samples:
    """The samples of a /metrics text (Prometheus' format)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def expect_error(resp: ClientResponse, status: int, code: str) -> str:
    """Assert the contract's error shape with this status and code; return the message."""
    body = await resp.json()
    assert resp.status == status, (resp.status, body)
    assert resp.content_type == "application/json"
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message, body
    return message


async def ok_json(resp: ClientResponse, status: int = 200) -> Any:
    body = await resp.json()
    assert resp.status == status, (resp.status, body)
    return body


@dataclass
class Node:
    """A running node and a client bound to it, with thin helpers over the REST API."""

    client: TestClient[Any, Any]
    config: NodeConfig

    @property
    def data_dir(self) -> Path:
        return Path(self.config.data_dir)

    async def create(
        self,
        name: str,
        dim: int,
        metric: str = "l2",
        index: str = "flat",
        shards: int = 2,
        **extra: Any,
    ) -> dict[str, Any]:
        body = {"dim": dim, "metric": metric, "shards": shards, "index": {"type": index}, **extra}
        resp = await self.client.put(f"/v1/collections/{name}", json=body)
        return await ok_json(resp, 201)  # type: ignore[no-any-return]

    async def post_json(self, url: str, body: Any) -> ClientResponse:
        """POST `body` as JSON; large bodies go as a stream (aiohttp warns on big raw bytes)."""
        raw = orjson.dumps(body)
        data: bytes | io.BytesIO = io.BytesIO(raw) if len(raw) > 2**20 else raw
        headers = {"Content-Type": "application/json"}
        return await self.client.post(url, data=data, headers=headers)

    async def upsert(self, name: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
        resp = await self.post_json(f"/v1/collections/{name}/documents", {"documents": docs})
        return await ok_json(resp)  # type: ignore[no-any-return]

    async def upsert_matrix(
        self,
        name: str,
        x: npt.NDArray[np.float32],
        metadata: list[dict[str, Any]] | None = None,
        prefix: str = "d",
        batch: int = 1000,
    ) -> list[str]:
        ids = [f"{prefix}{i}" for i in range(len(x))]
        for lo in range(0, len(x), batch):
            docs = [
                {"id": ids[i], "vector": x[i].tolist(), "metadata": (metadata or [{}] * len(x))[i]}
                for i in range(lo, min(lo + batch, len(x)))
            ]
            await self.upsert(name, docs)
        return ids

    async def search(self, name: str, **body: Any) -> dict[str, Any]:
        resp = await self.post_json(f"/v1/collections/{name}/search", body)
        return await ok_json(resp)  # type: ignore[no-any-return]

    async def describe(self, name: str) -> dict[str, Any]:
        return await ok_json(await self.client.get(f"/v1/collections/{name}"))  # type: ignore[no-any-return]

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Poll GET /readyz until 200 (the node has loaded its shards and joined)."""
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

        async def ready() -> bool:
            resp = await self.client.get("/readyz", headers=headers)
            await resp.read()
            return resp.status == 200

        await wait_for(ready, timeout_s, what="the node to be ready")

    async def wait_trained(self, name: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """Poll the description until every shard's index_state is "trained"."""

        async def trained() -> dict[str, Any] | None:
            desc = await self.describe(name)
            states = {s["index_state"] for s in desc["shard_states"]}
            return desc if states == {"trained"} else None

        return await wait_for(trained, timeout_s, interval=0.05, what=f"{name} to be trained")  # type: ignore[no-any-return]


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[StartNode]:
    """Factory: `await start_node(api_key="k", max_body_bytes=4096, ...)` → a running Node,
    ready (GET /readyz answered 200) unless `wait_ready=False`.

    Flags go through `load_config` (so they are validated like the CLI's); `train_min` and
    `snapshot_interval_s` default to test-friendly values."""
    async with AsyncExitStack() as stack:
        counter = 0

        async def start(wait_ready: bool = True, **overrides: Any) -> Node:
            nonlocal counter
            counter += 1
            flags: dict[str, Any] = {
                "data_dir": tmp_path / f"node{counter}",
                "port": free_port(),
                "train_min": TEST_TRAIN_MIN,
                "search_threads": 2,
                **overrides,
            }
            config = load_config(flags, environ={})
            server = TestServer(make_app(config), host="127.0.0.1", port=config.port)
            client: TestClient[Any, Any] = TestClient(server)
            await client.start_server()
            stack.push_async_callback(client.close)
            node = Node(client, config)
            if wait_ready:
                await node.wait_ready()
            return node

        yield start


@pytest.fixture
async def node(start_node: StartNode) -> Node:
    """A running one-node cluster with default settings and train_min=64."""
    return await start_node()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# -- numpy brute force ---------------------------------------------------------------------
def brute_force(
    base: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int, metric: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """(rows, scores) of the exact k best per query, best first, in float64.

    l2: squared distance ascending; ip: inner product descending; cosine: cosine similarity
    descending. Ties go to the lower row (stable sort)."""
    x = base.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "l2":
        s = (q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None, :]
        order = np.argsort(s, axis=1, kind="stable")
    else:
        if metric == "cosine":
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        s = q @ x.T
        order = np.argsort(-s, axis=1, kind="stable")
    top = order[:, :k]
    return top, np.take_along_axis(s, top, axis=1)


def assert_well_separated(scores: npt.NDArray[np.float64], k: int, gap: float = 1e-4) -> None:
    """Exact id/order comparisons need no near-ties among the first k+1 of the brute force."""
    d = np.abs(np.diff(scores[:, : k + 1], axis=1))
    assert (d > gap).all(), "random test data has near-ties; pick another seed"


class _NotSlowCallbacks(logging.Filter):
    """asyncio's own slow-callback reports count garbage collection in; `LoopHolds` replaces
    them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Executing")


@pytest.fixture(autouse=True)
async def event_loop_never_blocked(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail any async test during which one callback worked on the event loop for over
    `loop.slow_callback_duration` (0.5 s of CPU: FAISS, RocksDB or any slow work on the loop
    instead of a thread) or blocked it for three times that, garbage collection left out
    (`tests/loop_guard.py`). The loop runs in debug mode meanwhile (a loop method called from
    another thread raises). The gossip simulator, which drives fifty nodes from the test's own
    coroutine, opts out."""
    if request.node.get_closest_marker("simulation"):
        yield
        return
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.5
    quiet = _NotSlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addFilter(quiet)
    try:
        with LoopHolds(loop, lambda: loop.slow_callback_duration) as holds:
            yield
    finally:
        logger.removeFilter(quiet)
        loop.set_debug(False)
    assert not holds.held, f"the event loop was blocked: {holds.held[:3]}"


# Modules whose tests fail on any exception that asyncio reports as never retrieved (a task
# whose failure nobody looked at: a lost hedge, a write to a replica after the answer): the
# cluster logic, in process. asyncio reports such a task only when it is freed, which may be
# long after; so every task made during the test is recorded, and one that ended with an
# exception nobody retrieved fails the test at its end.
_LOST_EXCEPTIONS_CHECKED = ("test_sim_", "test_fanout", "test_route_writes", "test_replica",
                            "test_hints", "test_inprocess_nodes", "test_peer_protocol")


@pytest.fixture(autouse=True)
async def no_lost_task_exceptions(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    if not request.node.module.__name__.rpartition(".")[2].startswith(_LOST_EXCEPTIONS_CHECKED):
        yield
        return
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    made: list[asyncio.Task[Any]] = []
    previous = loop.get_exception_handler()
    factory = loop.get_task_factory()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        seen.append(f"{context.get('message')}: {context.get('exception')!r}")
        loop.default_exception_handler(context)

    def recording(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
        task = (asyncio.Task(coro, loop=loop, **kw) if factory is None
                else factory(loop, coro, **kw))
        made.append(task)
        return task

    loop.set_exception_handler(handler)
    loop.set_task_factory(recording)
    try:
        yield
        for _ in range(3):
            await asyncio.sleep(0)  # done callbacks scheduled by the last steps run
    finally:
        loop.set_task_factory(factory)
        loop.set_exception_handler(previous)
    lost = [f"{t.get_coro()}: {t.exception()!r}" for t in made
            if t.done() and not t.cancelled() and t._log_traceback]
    assert not seen and not lost, f"never retrieved: {(seen + lost)[:3]}"


@pytest.fixture
async def blocking() -> AsyncIterator[Blocking]:
    """Search, write and background threads for an engine built in the test."""
    b = Blocking(2)
    yield b
    b.close()
