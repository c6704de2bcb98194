"""An answer's body, sent a piece at a time when it is large.

aiohttp sends a `Response`'s bytes in one step: it joins them to the headers (a copy) and
hands them to the transport, which copies what the socket does not take at once into its
buffer. 75 MiB of search results (100 queries of k 1,000 with their vectors) held the
event loop 0.36-0.53 s that way, gossip and every other request waiting. A body past
`STREAM_FROM` goes as a payload that aiohttp writes 64 KiB at a time, yielding to the loop
between pieces and waiting while the client is slow to read."""

from __future__ import annotations

import io

from aiohttp import payload, web

# Bodies up to this size are sent in one step (a few milliseconds at most).
STREAM_FROM = 1 << 20


def body_response(body: bytes, content_type: str, status: int = 200) -> web.Response:
    """A response of `body`; safe to build off the event loop (it touches no loop)."""
    if len(body) <= STREAM_FROM:
        return web.Response(body=body, status=status, content_type=content_type)
    # BytesIO shares the bytes until written to: no copy of the body here.
    return web.Response(body=payload.BytesIOPayload(io.BytesIO(body), content_type=content_type),
                        status=status)
