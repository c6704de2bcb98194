"""The HTTP client for other nodes' internal routes (a `peer_client.PeerClient`); maps HTTP errors back to
`cluster.model.errors`. With a cluster secret, every request is signed (`cluster.peers.auth`): its sender,
method, path, body and time, which the receiving node checks before anything else. The binary
frames (search, write, get) go over a channel per peer instead (`channel.py`), opened by such a
signed request; to a node without one, over the lean HTTP client (`lean.py`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from yarl import URL

from aquila.cluster.model import request_id
from aquila.cluster.model.errors import AquilaError, Unavailable, from_code
from aquila.cluster.peers import wire
from aquila.cluster.peers.auth import PeerSigner
from aquila.cluster.peers.channel import Channels
from aquila.cluster.peers.client import COLLECTION_PREFIX, FRAME_TYPE, PUSH_PULL_PATH, PeerError
from aquila.cluster.peers.lean import LeanClient, LeanError

# The largest answer read from a peer (a page of a shard in a move, a search's hits, the
# cluster state in a push-pull): an address given to join may be anything, and what answers
# there must not make this node read without end.
MAX_ANSWER_BYTES = 1 << 30
_NO_CHANNEL = object()


class Peers:
    def __init__(self, secret: str | None, timeout_s: float = 10.0, *, sender: str,
                 max_answer_bytes: int = MAX_ANSWER_BYTES,
                 wall: Callable[[], float] = time.time) -> None:
        # `wall`: the clock's wall time, which signatures carry (peers check freshness).
        self._secret = secret
        self._signer = PeerSigner(secret, sender, wall)
        self._timeout_s = timeout_s
        self._max_answer = max_answer_bytes
        self._session: aiohttp.ClientSession | None = None
        # Binary frames (search, write, get) go over a channel per peer (`channel.py`), or
        # through the lean client to a node without one.
        self._channels: Channels | None = None
        self._lean: LeanClient | None = None

    async def start(self) -> None:
        self._lean = LeanClient(self._max_answer)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=30),
            json_serialize=lambda o: orjson.dumps(o).decode(),
            # Nodes never compress; an answer that claims to is not inflated (a bomb).
            auto_decompress=False,
        )
        self._channels = Channels(self._session, self._signer, self._secret, self._max_answer,
                                  self._timeout_s)

    async def close(self) -> None:
        if self._channels is not None:
            await self._channels.close()
            self._channels = None
        if self._lean is not None:
            self._lean.close()
            self._lean = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, addr: str, method: str, path: str, body: Any = None, *, to: str | None,
        timeout: float | None = None, raw: bytes | None = None,  # noqa: ASYNC109
        max_answer: int | None = None,
    ) -> Any:
        """JSON (or raw bytes when `raw` is given) to http://addr/path; the decoded answer.

        `to` is the node id expected at `addr`, which alone may accept the request; None
        only for a push-pull to an address whose node is not known yet (a seed)."""
        if self._session is None:
            raise Unavailable("peer client is not started")
        if raw is not None and to is not None and self._channels is not None:
            name, _, op = path.removeprefix(COLLECTION_PREFIX).partition("/")
            if (path.startswith(COLLECTION_PREFIX) and self._channels.wanted(addr, op, len(raw))
                    and wire.sendable_name(name)):
                given = timeout or self._timeout_s
                loop = asyncio.get_running_loop()
                start = loop.time()
                answer = await self._channel_request(addr, to, op, name, raw, given,
                                                     max_answer)
                if answer is not _NO_CHANNEL:
                    return answer
                # Over HTTP after all (too large, or no route): in what is left of its time.
                timeout = max(given - (loop.time() - start), 1e-3)
        data = raw if raw is not None else (b"" if body is None else orjson.dumps(body))
        # Sign the path exactly as it goes on the request line (quoted, with its query).
        try:
            url = URL(f"http://{addr}{path}")
        except ValueError as exc:
            raise PeerError(f"bad peer address {addr!r}: {exc}") from None
        headers = {"Content-Type": "application/json" if raw is None else FRAME_TYPE,
                   **self._signer.headers(method, url.raw_path_qs, data, to)}
        rid = request_id.current.get()
        if rid is not None:  # the client request this serves: the peer logs it too
            headers[request_id.HEADER] = rid
        if raw is not None and path != PUSH_PULL_PATH:  # a frame: the lean client
            return await self._lean_request(addr, url, method, headers, data,
                                            timeout or self._timeout_s, max_answer)
        t = aiohttp.ClientTimeout(total=timeout or self._timeout_s)
        try:
            async with self._session.request(
                method, url, data=data or None, headers=headers, timeout=t
            ) as resp:
                payload = await _read_capped(resp, self._cap(max_answer), addr)
                if resp.status >= 400:
                    raise _error_from(resp.status, payload, addr)
                if raw is not None and resp.content_type != "application/json":
                    return payload
                try:
                    return orjson.loads(payload) if payload else None
                except orjson.JSONDecodeError:
                    raise PeerError(f"node {addr} answered something else than JSON") from None
        except AquilaError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerError(f"node {addr} did not answer: {type(exc).__name__} {exc}") from None

    async def _channel_request(self, addr: str, to: str, op: str, name: str, raw: bytes,
                               timeout: float,  # noqa: ASYNC109
                               max_answer: int | None) -> Any:
        """A frame over the peer's channel: its answer, or _NO_CHANNEL when the peer has no
        channel route (an older node) or its answer is too large for one."""
        assert self._channels is not None
        try:
            async with asyncio.timeout(timeout):
                answer = await self._channels.request(addr, to, op, name, raw)
        except TimeoutError:
            raise PeerError(f"node {addr} did not answer: TimeoutError") from None
        if answer is None:
            return _NO_CHANNEL
        cap = self._cap(max_answer)
        if len(answer.body) > cap:  # an error's too, as over HTTP
            raise PeerError(f"node {addr} answered more than {cap} bytes")
        if answer.kind == wire.ERROR:
            raise _error_from(answer.type, answer.body, addr)
        if answer.type == wire.TOO_LARGE:  # past what a channel carries: over HTTP
            return _NO_CHANNEL
        if answer.type == wire.FRAME:
            return answer.body
        try:
            return orjson.loads(answer.body) if answer.body else None
        except orjson.JSONDecodeError:
            raise PeerError(f"node {addr} answered something else than JSON") from None

    def _cap(self, max_answer: int | None) -> int:
        return self._max_answer if max_answer is None else min(max_answer, self._max_answer)

    async def _lean_request(self, addr: str, url: URL, method: str, headers: dict[str, str],
                            data: bytes, timeout: float,  # noqa: ASYNC109
                            max_answer: int | None) -> Any:
        if self._lean is None or url.host is None:
            raise Unavailable("peer client is not started")
        try:
            async with asyncio.timeout(timeout):
                status, ctype, payload = await self._lean.request(
                    addr, url.host, url.port or 80, method, url.raw_path_qs, headers, data,
                    self._cap(max_answer))
        except (TimeoutError, LeanError, OSError) as exc:
            raise PeerError(f"node {addr} did not answer: {type(exc).__name__} {exc}") from None
        if status >= 400:
            raise _error_from(status, payload, addr)
        if ctype != "application/json":
            return payload
        try:
            return orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            raise PeerError(f"node {addr} answered something else than JSON") from None


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, addr: str) -> bytes:
    out = bytearray()
    async for chunk in resp.content.iter_any():
        out += chunk
        if len(out) > limit:
            raise PeerError(f"node {addr} answered more than {limit} bytes")
    return bytes(out)


def _error_from(status: int, payload: bytes, addr: str) -> AquilaError:
    try:
        err = orjson.loads(payload)["error"]
        e = from_code(err["code"], f"{addr}: {err['message']}")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        e = from_code("unavailable" if status >= 500 else "bad_request",
                      f"{addr} answered {status}")
    if status >= 500 and not isinstance(e, Unavailable):
        return PeerError(e.message)
    return e
