"""The outermost middleware: each request's id (`cluster.model.request_id`) and its line in
the log.

A public request keeps the client's `X-Request-Id` when it is well-formed, or gets a new one;
either way the response carries it back. A peer request (`/internal/*`) adopts the id of the
client request it serves (the peer client sends it), and has none when it is the cluster's
own background work (gossip, anti-entropy, hand-offs). Requests serving a client are logged at
info; probes, scrapes, the dashboard's files and background peer traffic at debug.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from aquila.cluster.model import request_id

log = logging.getLogger("aquila.node.http.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes polled by machines (probes, scrapers) or fetched by browsers with each page.
QUIET = frozenset({"/healthz", "/readyz", "/metrics", "/ui", "/ui/{file}"})


# A random prefix per process and a counter: unique across nodes and restarts without a
# getrandom call per request (an id traces a request; it guards nothing).
_PREFIX = secrets.token_hex(4)
_COUNTER = itertools.count(int.from_bytes(secrets.token_bytes(4)))


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER) & 0xFFFFFFFF:08x}"


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    internal = request.path.startswith("/internal/")
    given = request.headers.get(request_id.HEADER)
    # Background peer traffic has none; a public request always has one.
    fresh = None if internal else new_request_id()
    rid = given if request_id.valid(given) else fresh
    token = request_id.current.set(rid)
    t0 = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        if rid is not None and not resp.prepared:
            resp.headers[request_id.HEADER] = rid
        return resp
    except web.HTTPException as exc:  # redirects and the like: error_middleware answers the rest
        status = exc.status
        if rid is not None:
            exc.headers[request_id.HEADER] = rid
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        quiet = rid is None or route in QUIET
        ms = round((time.perf_counter() - t0) * 1000, 2)
        log.log(logging.DEBUG if quiet else logging.INFO, "%s %s %d %.1f ms", request.method,
                request.path, status, ms,
                extra={"event": "request", "method": request.method, "route": route,
                       "status": status, "ms": ms})
        request_id.current.reset(token)
