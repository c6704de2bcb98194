"""Reading a request body within its limit, compressed bodies included.

aiohttp would inflate gzip and deflate bodies by itself and apply the body limit to what it
had inflated; the app turns that off (`auto_decompress=False`) and bodies are read here
instead: the limit applies to the decompressed size, counted while the body is inflated a
step at a time, so a small compressed body that inflates to gigabytes (a "zip bomb") is
refused with 413 after inflating just past the limit."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

from aiohttp import StreamReader, hdrs, web

from aquila.cluster.model.errors import BadRequest, PayloadTooLarge

# Inflate at most this much per step, yielding to the event loop between steps.
_STEP = 1 << 20
# A body that sends nothing for this long is refused (400): a client trickling a body, or
# never finishing it, must not hold a handler and its buffer for ever (slowloris).
IDLE_TIMEOUT_S = 30.0
_GZIP_WBITS = 16 + zlib.MAX_WBITS


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"body exceeds the limit of {limit} bytes (decompressed)")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, decompressed per its Content-Encoding (gzip, deflate or none); 413 once it
    passes `limit` bytes, 400 when it does not decompress or uses another encoding."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding in ("", "identity"):
        return await _read_plain(request.content, limit)
    if encoding in ("gzip", "x-gzip", "deflate"):
        return await _inflate(request.content, encoding, limit)
    raise BadRequest(f"Content-Encoding {encoding!r} is not supported (gzip or deflate are)")


async def _chunks(content: StreamReader) -> AsyncIterator[bytes]:
    """The body's chunks as they come; BadRequest when none comes for IDLE_TIMEOUT_S."""
    while True:
        if content.is_eof():
            # The whole body has arrived (a small one comes with its headers): readany does
            # not wait, so no timer is armed and cancelled per chunk.
            chunk = await content.readany()
        else:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    chunk = await content.readany()
            except TimeoutError:
                raise BadRequest(
                    f"no part of the body arrived for {IDLE_TIMEOUT_S:g} s") from None
        if not chunk:
            return
        yield chunk


async def _read_plain(content: StreamReader, limit: int) -> bytes:
    if content.is_eof():
        # The whole body has arrived (a small one, a search's, comes with its headers):
        # taken at once, without the chunk generator and its steps.
        whole = content.read_nowait()
        if len(whole) > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        return whole
    # Chunks joined once at the end: growing one buffer and copying it out again costs a
    # bulk upsert's megabytes twice.
    parts: list[bytes] = []
    size = 0
    async for chunk in _chunks(content):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _inflate(content: StreamReader, encoding: str, limit: int) -> bytes:
    out = bytearray()
    inflater: zlib._Decompress | None = None
    async for chunk in _chunks(content):
        if inflater is None:
            inflater = zlib.decompressobj(_wbits(encoding, chunk))
        data = chunk
        try:
            while data:
                out += inflater.decompress(data, min(_STEP, limit + 1 - len(out)))
                if len(out) > limit:
                    raise _too_large(limit)
                data = inflater.unconsumed_tail
                if data:
                    await asyncio.sleep(0)  # a long run of output: let others in
            if inflater.eof and inflater.unused_data:
                raise BadRequest(f"data after the end of the {encoding} stream")
        except zlib.error as exc:
            raise BadRequest(f"body does not decompress as {encoding}: {exc}") from None
    if inflater is None:
        return b""
    try:
        out += inflater.flush()
    except zlib.error as exc:
        raise BadRequest(f"body does not decompress as {encoding}: {exc}") from None
    if len(out) > limit:
        raise _too_large(limit)
    if not inflater.eof:
        raise BadRequest(f"truncated {encoding} body")
    return bytes(out)


def _wbits(encoding: str, first: bytes) -> int:
    if encoding != "deflate":
        return _GZIP_WBITS
    # HTTP's deflate is zlib-wrapped (RFC 1950), but some clients send raw deflate: the
    # first byte of a zlib stream names method 8 in its low bits (as aiohttp also checks).
    return zlib.MAX_WBITS if first and first[0] & 0x0F == 8 else -zlib.MAX_WBITS
