"""A lean HTTP/1.1 client for the peer protocol's binary frames: the hot paths (search, write,
get) sent over kept-alive connections with the least work per request.

aiohttp's client is general (redirects, cookies, chunked and compressed bodies, tracing,
per-request timeouts objects); a peer request needs none of it, and at a search per node per
query its cost is a good part of what fan-out costs. This client writes the request in one
call and reads an answer that states its Content-Length (nodes always do), nothing else: an
answer without one, with a header block or a body beyond the caps, or a connection that
closes early is a `LeanError` (the caller's PeerError). Idle connections are kept per address
and reused; one the peer closed meanwhile is noticed before reuse, and a request that fails
on a reused connection before any answer arrived is sent once more on a new one (the frames'
operations are idempotent: searches, gets, and writes that carry their versions).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import cast

from aquila.cluster.model.bounds import BoundsError, parse_uint

# Response header blocks are small; anything larger is not a node.
MAX_HEADER_BYTES = 64 * 1024
# Idle connections kept per peer address.
MAX_IDLE = 64
# The largest Content-Length that parses at all (the answer's own bound applies after).
_MAX_LENGTH_FIELD = 2**63 - 1
# Optional whitespace around a header's value (RFC 9110 5.5): space and tab, nothing else.
_OWS = " \t"


class LeanError(Exception):
    """The peer could not be reached, or answered something that is not a usable answer."""


class _Answer:
    __slots__ = ("status", "content_type", "body", "keep_alive")

    def __init__(self, status: int, content_type: str, body: bytes, keep_alive: bool) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body
        self.keep_alive = keep_alive


class _Connection(asyncio.Protocol):
    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._head: tuple[int, str, int, bool] | None = None  # status, type, length, alive
        self._waiter: asyncio.Future[_Answer] | None = None
        self.received = False  # any byte of the current answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport instances, but are ones in kind.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(LeanError(f"connection closed{f': {exc}' if exc else ''}"))

    def _fail(self, exc: Exception) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    def send(self, data: bytes, max_body: int) -> asyncio.Future[_Answer]:
        assert self.transport is not None
        self.max_body = max_body
        self._waiter = asyncio.get_running_loop().create_future()
        self._buf.clear()
        self._head = None
        self.received = False
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self._waiter is None or self._waiter.done():
            self.abort()  # nothing was asked: not a peer that speaks HTTP/1.1 properly
            return
        self._buf += data
        try:
            if self._head is None and not self._parse_head():
                return
            assert self._head is not None
            status, ctype, length, alive = self._head
            if len(self._buf) < length:
                return
            if len(self._buf) > length:
                raise LeanError("the peer sent more than its answer")
            self._waiter.set_result(_Answer(status, ctype, bytes(self._buf), alive))
        except LeanError as exc:
            self._fail(exc)
            self.abort()

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise LeanError("the peer's answer has an oversized header block")
            return False
        if end > MAX_HEADER_BYTES:
            raise LeanError("the peer's answer has an oversized header block")
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        version, _, rest = lines[0].partition(" ")
        try:
            if version not in ("HTTP/1.1", "HTTP/1.0") or rest[3:4] not in ("", " "):
                raise BoundsError("not a status line")
            status = parse_uint(rest[:3], 999, "status")
        except BoundsError:
            raise LeanError(f"not an HTTP answer: {lines[0][:80]!r}") from None
        length = None
        ctype = ""
        alive = version == "HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip(_OWS).lower()
            value = value.strip(_OWS)
            if name == "content-length":
                # ASCII digits only (int() takes "1_0", "+5", "²" too, or raises).
                try:
                    n = parse_uint(value, _MAX_LENGTH_FIELD, "Content-Length")
                except BoundsError:
                    raise LeanError(f"the peer's answer has a malformed length {value[:20]!r}"
                                    ) from None
                if n > self.max_body:
                    raise LeanError(f"the peer's answer is too long ({n} bytes, at most "
                                    f"{self.max_body})")
                if length is not None and n != length:
                    raise LeanError("the peer's answer states two lengths")
                length = n
            elif name == "content-type":
                ctype = value.partition(";")[0].strip().lower()
            elif name == "transfer-encoding":
                raise LeanError("the peer's answer is not of a stated length")
            elif name == "connection":
                alive = value.lower() == "keep-alive" or (alive and value.lower() != "close")
        if length is None:
            raise LeanError("the peer's answer is not of a stated length")
        self._head = (status, ctype, length, alive)
        return True

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class LeanClient:
    """Kept-alive connections per address; `request` is the whole client."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def request(
        self, addr: str, host: str, port: int, method: str, target: str,
        headers: Mapping[str, str], body: bytes, max_body: int | None = None,
    ) -> tuple[int, str, bytes]:
        """(status, content type, body) of a request to `host`:`port` (`addr` as the Host
        header). The caller bounds it in time; cancelled, the connection is dropped (its
        answer may still come). `max_body`: the most the request can legitimately be
        answered with (never above the client's own cap); an answer that states more is
        refused before any of it is read."""
        limit = self._max_body if max_body is None else min(max_body, self._max_body)
        head = [f"{method} {target} HTTP/1.1", f"Host: {addr}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        key = (host, port)
        for _ in range(2):
            conn, reused = self._take(key)
            if conn is None:
                conn = await self._connect(host, port)
            try:
                answer = await conn.send(data, limit)
            except LeanError:
                conn.abort()
                if reused and not conn.received:
                    continue  # the peer had closed it: once more, on a new connection
                raise
            except BaseException:
                conn.abort()
                raise
            if answer.keep_alive and not conn.closed:
                idle = self._idle.setdefault(key, [])
                if len(idle) < MAX_IDLE:
                    idle.append(conn)
                else:
                    conn.abort()
            else:
                conn.abort()
            return answer.status, answer.content_type, answer.body
        raise LeanError("the peer closed the connection twice")  # pragma: no cover

    def _take(self, key: tuple[str, int]) -> tuple[_Connection | None, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        return None, False

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self._max_body),
                                                   host.strip("[]"), port)
        except OSError as exc:
            raise LeanError(f"cannot connect: {exc}") from None
        return conn

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
