"""Sending batches to the cluster: the columnar upsert over aiohttp, with retries.

A batch goes as one `POST /v1/collections/{name}/documents` in the columnar form (ids and
metadata as JSON, the vectors as base64 of little-endian float32, built without a Python float
in sight). aiohttp rather than the Python client (`aquila_client`): the server package does not
depend on the client's distribution, and the client's httpx transport and stdlib JSON cost
several times the CPU per document, which an import on a small machine takes from the nodes.

Transient failures (a node unreachable, a timeout, 503) are retried, on the next node when
several were given, with a growing pause; a batch the cluster refuses as bad (400, 413) is
split in halves until the rows at fault are found and reported, the others stored; a refusal
that no retry can change (401, 403, 404) stops the import.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pybase64

from aquila.node.importer.sources import BadRow, Batch

RETRIES = 8
PAUSE_S = 0.5
PAUSE_MAX_S = 10.0


class ImportFailed(Exception):
    """The import cannot go on (bad key, collection gone, every node unreachable)."""


@dataclass
class Refused(Exception):
    """The cluster refused a batch as bad: only smaller parts of it may pass."""

    status: int
    code: str
    message: str


def body_of(batch: Batch, consistency: str | None) -> bytes:
    """The columnar upsert body of a batch; metadata texts are spliced in as they are."""
    parts = [b'{"ids":', orjson.dumps(batch.ids), b',"vectors_b64":"',
             pybase64.b64encode(batch.vectors.astype("<f4", copy=False).tobytes()),
             b'","metadata":[', b",".join(batch.metadata), b"]"]
    if consistency is not None:
        parts.append(b',"consistency":' + orjson.dumps(consistency))
    parts.append(b"}")
    return b"".join(parts)


class Uploader:
    def __init__(self, session: aiohttp.ClientSession, nodes: list[str], collection: str,
                 api_key: str | None, where: Callable[[int], str],
                 consistency: str | None = None, retries: int = RETRIES,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.session = session
        self.nodes = nodes
        self.path = f"/v1/collections/{quote(collection, safe='')}/documents"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.consistency = consistency
        self.where = where  # a row's place in the input, for a person
        self._next = 0
        self._sleep = sleep
        self.max_retries = retries
        self.retries = 0  # transient failures retried, for the summary

    async def send(self, batch: Batch, body: bytes | None = None) -> list[BadRow]:
        """Store the batch's documents (`body`: its body, when made already); the rows the
        cluster refused, each with its reason."""
        if not batch.ids:
            return []
        try:
            await self._post(body or body_of(batch, self.consistency))
            return []
        except Refused as exc:
            if len(batch.ids) == 1:
                row = batch.rows[0]
                return [BadRow(row, self.where(row), f"{exc.code}: {exc.message}")]
        half = len(batch.ids) // 2
        return [*await self.send(batch.take(0, half)),
                *await self.send(batch.take(half, len(batch.ids)))]

    async def _post(self, body: bytes) -> None:
        pause = PAUSE_S
        last = ""
        for attempt in range(self.max_retries + 1):
            node = self.nodes[(self._next + attempt) % len(self.nodes)]
            try:
                async with self.session.post(f"http://{node}{self.path}", data=body,
                                             headers=self.headers) as resp:
                    raw = await resp.read()
                    if resp.status == 200:
                        self._next = (self._next + 1) % len(self.nodes)
                        return
                    code, message = _error(raw, resp.status)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                last = f"{node}: {type(exc).__name__}: {exc}"
            else:
                if resp.status in (400, 413):
                    raise Refused(resp.status, code, message)
                if resp.status not in (408, 429, 500, 502, 503, 504):
                    raise ImportFailed(f"{node} answered {resp.status} {code}: {message}")
                last = f"{node}: {resp.status} {code}: {message}"
            if attempt < self.max_retries:
                self.retries += 1
                await self._sleep(pause)
                pause = min(pause * 2, PAUSE_MAX_S)
        raise ImportFailed(f"no node stored a batch after {self.max_retries + 1} attempts; "
                           f"last: {last}")


def _error(raw: bytes, status: int) -> tuple[str, str]:
    try:
        err: Any = orjson.loads(raw)["error"]
        return str(err["code"]), str(err["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"http_{status}", raw[:200].decode("utf-8", "replace")
