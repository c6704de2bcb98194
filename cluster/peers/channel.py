"""A persistent, multiplexed channel per peer for the binary frames (search, write, get): one
WebSocket on the node's own port (`CHANNEL_PATH`), opened by a signed handshake, carrying
many requests at once (`wire.py`: request ids, answers in any order, a MAC and a sequence
number per direction with a cluster secret). A frame then costs the receiving node a message
read and a task, not an HTTP request (parsing, routing, middlewares, a Response).

Client side (`Channels`, used by `http.Peers`): one channel per (address, node id), opened on
the first request and shared, and closed once no request was sent on it for `IDLE_S` (a node
that left, or that this one no longer asks); requests past `MAX_IN_FLIGHT` wait for room while
the peer answers, and fail (PeerError) once it answered nothing for `SLOT_WAIT_S`. A caller's
timeout or cancellation drops its request only (a late answer is dropped); a channel that
breaks fails its requests in flight with PeerError (retryable) and the next request opens a
new one. Frames above `MAX_CHANNEL_FRAME` (bulk writes) go over HTTP, so that no search
waits behind them, and so are frames whose answer is above `MAX_CHANNEL_ANSWER` (asked again).
A node that does not know the route (404/405: an older node) is remembered for
`NO_CHANNEL_S`, and its frames go over HTTP meanwhile (`Channels.request` answers None); one
that refuses a channel as it serves all it takes (503, `Admission`), for `BUSY_S`.

Server side (`serve`, called by node/http/internal_api.py once the handshake is
authenticated): reads requests, serves each in its own task (at most `MAX_IN_FLIGHT` at
once; beyond that a request is refused as Unavailable, which a conforming client never
sees) and writes each answer as it is ready. How many channels a node serves is capped, in
all and per sender (`Admission`, checked before the upgrade is accepted).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import contextvars
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType
from aiohttp.abc import AbstractStreamWriter

from aquila.cluster.model import request_id
from aquila.cluster.model.errors import AquilaError, BadRequest, Unauthorized, Unavailable
from aquila.cluster.peers import wire
from aquila.cluster.peers.auth import SIGNATURE_HEADER, PeerSigner
from aquila.cluster.peers.client import PeerError

log = logging.getLogger(__name__)

CHANNEL_PATH = "/internal/v1/channel"
# Requests in flight on one channel (both ends hold to it).
MAX_IN_FLIGHT = 256
# A request finding them all in flight waits for room while the peer answers; once it has
# answered none for this long (its handler hangs: the slots fill with abandoned requests), it
# fails at once with PeerError (another replica) instead of waiting its whole time.
SLOT_WAIT_S = 1.0
# How long a node without the channel route is served over HTTP before it is asked again.
NO_CHANNEL_S = 60.0
# A larger frame (a bulk write's batch) goes over HTTP on a connection of its own: on the
# channel, the searches behind it would wait for its megabytes to pass.
MAX_CHANNEL_FRAME = 1 << 20
# The largest answer a channel carries: a larger one (hits with much metadata) is answered
# TOO_LARGE and asked again over HTTP, where its own bound (`max_answer`) is checked before
# it is read. The client reads no message larger than this (with the MAC checked only after
# it is read, whatever answers at the address could otherwise make it buffer `max_answer`,
# up to 1 GiB, whatever it asked).
MAX_CHANNEL_ANSWER = 16 << 20
# Both ends ping a channel idle this long; one whose peer does not answer within half of it
# (stopped, or gone with its TCP connection left half-open) is closed: its requests fail
# (PeerError: another replica) rather than time out one by one for as long as the kernel
# keeps the connection, and the server lets go of what it held for it.
HEARTBEAT_S = 10.0
# A client closes a channel it sent no request on for this long (a node that left the
# cluster, or that it no longer asks), looking for them every IDLE_S / 4.
IDLE_S = 300.0
# How long a stopping node waits for a client to take its channel's close (it may not read).
CLOSE_S = 1.0
# Channels a node serves at once, in all and per (signed) sender: well above what its peers
# open (one per peer, two while one replaces a broken one, or a peer known at two addresses).
# An upgrade past either is refused (503) before it is accepted; the client then sends that
# frame over HTTP, and its others for `BUSY_S`, before it asks again.
MAX_CHANNELS = 256
MAX_CHANNELS_PER_SENDER = 8
BUSY_S = 5.0

Serve = Callable[[str, str, bytes], Awaitable[Any]]  # op, collection, frame -> answer
# After each request served: op, status, milliseconds (the node logs it; request_id is set).
Served = Callable[[str, int, float], None]


class Channel:
    """The client's end of one open channel."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, keys: tuple[bytes, bytes] | None,
                 addr: str, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._ws = ws
        self._send_key: bytes | None = None if keys is None else keys[0]
        self._recv_key: bytes | None = None if keys is None else keys[1]
        self.addr = addr
        self._cap = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: dict[int, asyncio.Future[wire.Answer]] = {}
        # Sent and not answered yet, the abandoned ones too: each holds a slot till answered.
        self._unanswered: set[int] = set()
        self._next_id = 0
        self._send_seq = 0
        self._recv_seq = 0
        self.broken: Exception | None = None
        self.last_used = 0.0  # when a request was last sent on it (`Channels`' clock)
        # When the peer last answered, or was first owed an answer since (the loop's time).
        self._progress_at = asyncio.get_running_loop().time()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def in_flight(self) -> int:
        return len(self._unanswered)

    @property
    def awaited(self) -> bool:
        """Whether a caller waits for an answer on it."""
        return bool(self._pending)

    async def request(self, op: str, name: str, rid: str | None, body: bytes) -> wire.Answer:
        """The peer's answer to one frame. Raises PeerError when the channel breaks, or
        when it has no room and the peer answered nothing for SLOT_WAIT_S."""
        if self._slots.locked():
            await self._wait_for_room()
        else:
            await self._slots.acquire()
        if self.broken is not None:
            self._slots.release()
            raise PeerError(f"node {self.addr}: channel broken: {self.broken}")
        id_ = self._next_id
        while id_ in self._unanswered:  # wrapped round to one abandoned, still unanswered
            id_ = (id_ + 1) & wire.MAX_ID
        self._next_id = (id_ + 1) & wire.MAX_ID
        fut: asyncio.Future[wire.Answer] = asyncio.get_running_loop().create_future()
        msg = wire.encode_request(self._send_seq, id_, op, name, rid, body, self._send_key)
        self._send_seq += 1
        self._pending[id_] = fut
        if not self._unanswered:
            self._progress_at = asyncio.get_running_loop().time()
        self._unanswered.add(id_)
        try:
            # An uncompressed frame is written before send_bytes first yields: the sequence
            # numbers go out in the order they were given.
            await self._ws.send_bytes(msg)
            return await fut
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            self._break(exc)
            raise PeerError(f"node {self.addr}: channel broken: {exc}") from None
        finally:
            self._pending.pop(id_, None)  # a late answer finds nobody waiting

    async def _wait_for_room(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            left = self._progress_at + SLOT_WAIT_S - loop.time()
            if left <= 0:
                raise PeerError(f"node {self.addr}: {self.in_flight} requests in flight on its "
                                f"channel, none answered for {SLOT_WAIT_S} s")
            try:
                async with asyncio.timeout(left):
                    await self._slots.acquire()
                return
            except TimeoutError:  # this wait's own: has the peer answered meanwhile?
                continue

    async def _read(self) -> None:
        reason: Exception = PeerError("channel closed")
        try:
            while True:
                msg = await self._ws.receive()
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.ERROR:
                        reason = PeerError(f"channel failed: {msg.data}")
                    else:
                        reason = PeerError(f"channel closed ({msg.type.name})")
                    break
                answer = wire.decode_answer(msg.data, self._recv_key, self._recv_seq)
                self._recv_seq += 1
                if answer.id not in self._unanswered:
                    raise wire.WireError(f"answer to request {answer.id}, never asked")
                self._unanswered.discard(answer.id)
                self._progress_at = asyncio.get_running_loop().time()
                self._slots.release()
                fut = self._pending.pop(answer.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(answer)
        except wire.WireError as exc:
            reason = exc
        except asyncio.CancelledError:
            reason = PeerError("channel closed by this node")
            raise
        except Exception as exc:  # anything else from the connection: the channel is gone
            reason = PeerError(f"channel failed: {type(exc).__name__}: {exc}")
        finally:
            self._break(reason)
            if not self._ws.closed:
                # No close handshake to wait for: the channel is of no more use.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._ws.close(), 1.0)

    def _break(self, exc: Exception) -> None:
        if self.broken is not None:
            return
        self.broken = exc
        err = PeerError(f"node {self.addr}: channel broken: {exc}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for _ in range(self._cap):  # wake whoever waits for room: they fail at once
            self._slots.release()
        if not self._reader.done() and asyncio.current_task() is not self._reader:
            self._reader.cancel()

    async def close(self) -> None:
        self._break(PeerError("channel closed by this node"))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ws.close(), 1.0)


class Channels:
    """This node's channels to its peers, opened on demand through `session`."""

    def __init__(self, session: aiohttp.ClientSession, signer: PeerSigner, secret: str | None,
                 max_answer: int, timeout_s: float, max_in_flight: int = MAX_IN_FLIGHT,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._signer = signer
        self._secret = secret
        self._max_answer = max_answer
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._monotonic = monotonic
        self._open: dict[tuple[str, str], Channel] = {}
        self._opening: dict[tuple[str, str], asyncio.Task[Channel | None]] = {}
        self._without: dict[str, float] = {}  # address -> until when it is asked over HTTP
        self._reaper: asyncio.Task[None] | None = None  # closes idle channels while any
        self._closed = False
        # Benchmarks only (A/B against the HTTP path): AQUILA_NO_CHANNEL=1 never opens one.
        self.enabled = not os.environ.get("AQUILA_NO_CHANNEL")

    def wanted(self, addr: str, op: str, size: int) -> bool:
        """Whether a frame of `op` and `size` bytes to `addr` goes over a channel."""
        if not self.enabled or op not in wire.OP_CODES or size > MAX_CHANNEL_FRAME:
            return False
        until = self._without.get(addr)
        if until is None:
            return True
        if self._monotonic() < until:
            return False
        del self._without[addr]
        return True

    async def request(self, addr: str, to: str, op: str, name: str, body: bytes
                      ) -> wire.Answer | None:
        """The answer of `to` at `addr` to one frame, or None when that node has no channel
        route or takes no more channels (the caller sends it over HTTP). The caller bounds it
        in time."""
        key = (addr, to)
        ch = self._open.get(key)
        if ch is None or ch.broken is not None:
            task = self._opening.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._connect(addr, to))
                self._opening[key] = task
                task.add_done_callback(lambda t: self._opened(key, t))
            # Shielded: one caller's timeout does not fail the others' opening.
            try:
                ch = await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and current is not None and not current.cancelling():
                    # The opening was cancelled (this node's client closes), not the caller.
                    raise PeerError(f"node {addr}: channel closed by this node") from None
                raise
            if ch is None:
                return None
        ch.last_used = self._monotonic()
        rid = request_id.current.get()
        return await ch.request(op, name, rid if request_id.valid(rid) else None, body)

    def _opened(self, key: tuple[str, str], task: asyncio.Task[Channel | None]) -> None:
        self._opening.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have given up on it

    async def _connect(self, addr: str, to: str) -> Channel | None:
        headers = self._signer.headers("GET", CHANNEL_PATH, b"", to)
        try:
            async with asyncio.timeout(self._timeout_s):
                ws = await self._session.ws_connect(
                    f"http://{addr}{CHANNEL_PATH}", headers=headers, compress=0,
                    autoping=True, heartbeat=HEARTBEAT_S,
                    max_msg_size=min(self._max_answer, MAX_CHANNEL_ANSWER) + wire.OVERHEAD)
                try:
                    hello = await ws.receive()
                    if hello.type != WSMsgType.BINARY:
                        raise wire.WireError(f"channel closed before its hello ({hello.type})")
                    nonce = wire.decode_hello(hello.data)
                except BaseException:
                    await ws.close()
                    raise
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (404, 405):
                self._without[addr] = self._monotonic() + NO_CHANNEL_S
                return None
            if exc.status == 401:
                raise Unauthorized(f"{addr}: peer channel refused") from None
            if exc.status == 503:  # serving all the channels it takes: this frame over HTTP
                self._without[addr] = self._monotonic() + BUSY_S
                return None
            raise PeerError(f"node {addr} refused a channel: {exc.status}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerError(f"node {addr} did not answer: {type(exc).__name__} {exc}") from None
        keys = wire.channel_keys(self._secret, headers.get(SIGNATURE_HEADER, ""), nonce)
        ch = Channel(ws, keys, addr, self._max_in_flight)
        ch.last_used = self._monotonic()
        old = self._open.get((addr, to))
        self._open[(addr, to)] = ch
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        if old is not None:
            await old.close()
        return ch

    async def close_idle(self) -> None:
        """Close the channels no request was sent on for IDLE_S, and nobody waits on (a
        broken one too: its place); forget the addresses past their time over HTTP."""
        now = self._monotonic()
        idle = [key for key, ch in self._open.items()
                if now - ch.last_used > IDLE_S and not ch.awaited]
        channels = [self._open.pop(key) for key in idle]
        for addr in [a for a, until in self._without.items() if until <= now]:
            del self._without[addr]
        await asyncio.gather(*(ch.close() for ch in channels))

    async def _reap(self) -> None:
        # A cancellation taken by a channel's close (`close` below) still ends it.
        while self._open and not self._closed:
            await asyncio.sleep(IDLE_S / 4)
            await self.close_idle()

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for task in list(self._opening.values()):
            task.cancel()
        channels = list(self._open.values())
        self._open.clear()
        for ch in channels:
            await ch.close()


# --- the server's end -------------------------------------------------------------------------

class Admission:
    """How many channels a node serves, in all and per sender (None: unsigned, counted in all
    only); taken before an upgrade is accepted, given back when its channel ends."""

    def __init__(self, most: int | None = None, per_sender: int | None = None) -> None:
        self._most = MAX_CHANNELS if most is None else most
        self._per_sender = MAX_CHANNELS_PER_SENDER if per_sender is None else per_sender
        self._total = 0
        self._by_sender: dict[str, int] = {}  # no entry at 0: bounded by `most`

    @property
    def served(self) -> int:
        return self._total

    def take(self, sender: str | None) -> None:
        """Count one more channel, or raise Unavailable past a cap."""
        if self._total >= self._most:
            raise Unavailable(f"this node serves {self._most} peer channels already")
        if sender is not None:
            n = self._by_sender.get(sender, 0)
            if n >= self._per_sender:
                raise Unavailable(f"this node serves {n} peer channels to that sender already")
            self._by_sender[sender] = n + 1
        self._total += 1

    def give_back(self, sender: str | None) -> None:
        self._total -= 1
        if sender is not None:
            n = self._by_sender.pop(sender) - 1
            if n:
                self._by_sender[sender] = n


class ServerChannel:
    """Serves the requests of one accepted channel (`ws` prepared, the hello not yet sent)."""

    def __init__(self, ws: aiohttp.web.WebSocketResponse, secret: str | None, signature: str,
                 serve: Serve, served: Served, max_in_flight: int = MAX_IN_FLIGHT,
                 transport: asyncio.Transport | None = None,
                 writer: AbstractStreamWriter | None = None) -> None:
        self._ws = ws
        self._transport = transport  # the connection's, aborted by `close` if need be
        self._writer = writer  # what `ws.prepare` answered: its drain waits for room
        self._nonce = os.urandom(wire.NONCE_SIZE)
        keys = wire.channel_keys(secret, signature, self._nonce)
        self._recv_key: bytes | None = None if keys is None else keys[0]
        self._send_key: bytes | None = None if keys is None else keys[1]
        self._serve = serve
        self._served = served
        self._cap = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        # In flight, as the client counts them: served or being served, answer not written.
        self._unwritten: set[asyncio.Task[None]] = set()
        self._send_seq = 0
        self._recv_seq = 0

    async def run(self) -> None:
        """Until the client closes the channel or sends what is not a request; then the
        requests in flight finish (their answers go out while the channel is open)."""
        await self._ws.send_bytes(wire.encode_hello(self._nonce))
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg = await self._ws.receive()
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.ERROR and self._transport is not None:
                        # Closed under us (a ping unanswered, a bad frame): what is queued
                        # for the client will not be read, and the requests waiting to
                        # write to it would wait for ever.
                        self._transport.abort()
                    break
                try:
                    req = wire.decode_request(msg.data, self._recv_key, self._recv_seq)
                except wire.BadField as exc:  # sealed and in sequence: that request only
                    self._recv_seq += 1
                    await self._send_error(exc.id, BadRequest(str(exc)))
                    continue
                except wire.WireError as exc:
                    log.warning("peer channel closed: %s", exc)
                    await self._ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR,
                                         message=str(exc)[:100].encode())
                    break
                self._recv_seq += 1
                if len(self._unwritten) >= self._cap:
                    await self._send_error(req.id, Unavailable(
                        f"more than {self._cap} requests in flight on one channel"))
                    continue
                self._start(req, loop)
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """This node stops: no more requests are read (those in flight finish first). A
        client that does not take the close within CLOSE_S (stopped, or not reading: the
        close would wait for it to read what is written before) has its connection aborted,
        which also wakes the requests waiting to write to it."""
        with contextlib.suppress(Exception):  # TimeoutError: it did not
            await asyncio.wait_for(self._ws.close(code=aiohttp.WSCloseCode.GOING_AWAY),
                                   CLOSE_S)
        if self._transport is not None and self._transport.get_write_buffer_size():
            self._transport.abort()  # what is still queued is not being read

    def _start(self, req: wire.Request, loop: asyncio.AbstractEventLoop) -> None:
        """Serve one request at once, in the reader's turn, as far as it goes without waiting:
        a sub-search run inline is answered before the next message is read, with no task made
        and scheduled for it. What waits (a search thread, room to write) goes on in a task of
        its own, in flight (`_unwritten`) until its answer is written. Each request runs in
        its own copy of the context, as in a task (its request id is its own)."""
        ctx = contextvars.copy_context()
        coro = self._one(req)
        try:
            waits = ctx.run(coro.send, None)
        except StopIteration:
            return
        task = loop.create_task(_finish(coro, waits), context=ctx)
        self._tasks.add(task)
        self._unwritten.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._unwritten.discard)

    async def _one(self, req: wire.Request) -> None:
        rid = req.rid if request_id.valid(req.rid) else None
        request_id.current.set(rid)  # this task's own context
        t0 = time.perf_counter()
        status = 200
        try:
            try:
                out = await self._serve(req.op, req.name, req.body)
            except (KeyError, ValueError, TypeError, binascii.Error) as exc:  # as over HTTP
                raise BadRequest(
                    f"malformed peer request: {type(exc).__name__}: {exc}") from None
            if isinstance(out, bytes):
                type_, body = wire.FRAME, out
            else:
                type_, body = wire.JSON, orjson.dumps(out)
            if len(body) > MAX_CHANNEL_ANSWER:  # the client asks again over HTTP
                type_, body = wire.TOO_LARGE, b""
            await self._send(lambda seq: wire.encode_answer(seq, req.id, type_, body,
                                                            self._send_key))
        except AquilaError as err:
            status = err.status
            await self._send_error(req.id, err)
        except Exception:
            status = 500
            log.exception("unhandled error on a peer channel's %s of %s", req.op, req.name)
            await self._send_error(req.id, AquilaError("internal error; see the node's log"))
        finally:
            self._served(req.op, status, (time.perf_counter() - t0) * 1000)

    async def _send_error(self, id_: int, err: AquilaError) -> None:
        body = orjson.dumps({"error": {"code": err.code, "message": err.message}})
        await self._send(lambda seq: wire.encode_error(seq, id_, err.status, body,
                                                       self._send_key))

    async def _send(self, seal: Callable[[int], bytes]) -> None:
        """Write one message, `seal`ed with the next sequence number out, once the
        connection takes writes: while the client reads nothing, its requests stay in flight
        (against the cap) instead of their answers piling up for it. Written, a request is
        no longer in flight, as for the client once the answer arrives (counted until the
        write drained, a request the client had its answer to could fill the server's cap
        while the client's had room). Nothing yields between sealing and writing:
        send_bytes writes an uncompressed frame whole before it first yields."""
        if self._writer is not None:
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await self._writer.drain()
        task = asyncio.current_task()
        if task is not None:
            self._unwritten.discard(task)
        if self._ws.closed:
            return  # the client went away: nobody to answer
        msg = seal(self._send_seq)
        self._send_seq += 1
        transport = self._transport
        if transport is None:  # not given: through aiohttp's writer
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await self._ws.send_bytes(msg)  # closing under us: the client fails its requests
        elif not transport.is_closing():
            # The frame straight to the connection (one call, no coroutine): the channel's
            # WebSocket is uncompressed, and a server's frames are not masked. `ws.closed`
            # above keeps it from following a close frame; the drain above is the writer's.
            transport.write(_binary_frame(msg))


_LEN7 = struct.Struct("!BB")
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
_FIN_BINARY = 0x82  # a whole message in one frame (FIN), binary


def _binary_frame(msg: bytes) -> bytes:
    """A server's WebSocket frame of one binary message (RFC 6455 5.2: no mask, no
    extension bits), as aiohttp's writer makes it."""
    n = len(msg)
    if n < 126:
        head = _LEN7.pack(_FIN_BINARY, n)
    elif n < 1 << 16:
        head = _LEN16.pack(_FIN_BINARY, 126, n)
    else:
        head = _LEN64.pack(_FIN_BINARY, 127, n)
    return head + msg


async def _finish(coro: Coroutine[Any, Any, None], waits: Any) -> None:
    """Drive `coro`, started outside any task and waiting on `waits` (what it yielded: a
    future, or None for a bare yield), to its end in the task that runs this, as asyncio's
    Task would from its second step on: the future's outcome is the coroutine's to read
    (resumed, it asks the future itself); a cancellation of this task is thrown into it."""
    while True:
        try:
            if waits is None:
                await asyncio.sleep(0)
            else:
                # As a Task takes a yielded future: awaited here in the coroutine's stead.
                waits._asyncio_future_blocking = False
                await waits
        except asyncio.CancelledError as exc:
            try:
                waits = coro.throw(exc)
            except StopIteration:
                return
            continue
        except BaseException:
            if waits is None or not waits.done():
                raise
            # The future's own failure: the coroutine, resumed, reads it from the future.
        try:
            waits = coro.send(None)
        except StopIteration:
            return
