"""The app's one middleware: each request's id (`cluster.model.request_id`), its access check,
its errors' shape, its metrics and its line in the log.

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
from aquila.node.http.api import check_request, failure_response
from aquila.node.keys import METRICS

log = logging.getLogger("aquila.node.http.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes polled by machines (probes, scrapers) or fetched by browsers with each page.
QUIET = frozenset({"/", "/healthz", "/readyz", "/metrics", "/ui", "/ui/{file}"})


# A random prefix per process and a counter: unique across nodes and restarts without a
# getrandom call per request (an id traces a request; it guards nothing).
_PREFIX = secrets.token_hex(4)
_COUNTER = itertools.count(int.from_bytes(secrets.token_bytes(4)))


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER) & 0xFFFFFFFF:08x}"


@web.middleware
async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware, outermost and alone (one coroutine and one route lookup a request,
    not one each for ids, errors and metrics): the request's id, who may call the route,
    every failure in the contract's shape (`api.failure_response`), the request's metrics and
    its log line."""
    path = request.path
    given = request.headers.get(request_id.HEADER)
    if given is not None and request_id.valid(given):
        rid: str | None = given
    else:  # background peer traffic has none; a public request always has one
        rid = None if path.startswith("/internal/") else new_request_id()
    token = request_id.current.set(rid)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    t0 = time.perf_counter()
    status = 500
    try:
        try:
            check_request(request, route)
            resp = await handler(request)
        except Exception as exc:  # noqa: BLE001 - every failure answered in one shape
            resp = failure_response(request, exc)  # raises a redirect again
        status = resp.status
        if rid is not None and not resp.prepared:
            resp.headers[request_id.HEADER] = rid
        return resp
    except web.HTTPException as exc:  # redirects and the like: aiohttp answers them
        status = exc.status
        if rid is not None:
            exc.headers[request_id.HEADER] = rid
        raise
    finally:
        seconds = time.perf_counter() - t0
        name = route or "unmatched"
        request.app[METRICS].observe(request.method, name, status, seconds)
        level = logging.DEBUG if rid is None or name in QUIET else logging.INFO
        if log.isEnabledFor(level):  # the line is built only when it is written
            access_line(level, request.method, path, name, status, seconds)
        request_id.current.reset(token)


def access_line(level: int, method: str, path: str, route: str, status: int,
                seconds: float, verb: str | None = None) -> None:
    """The request's line, as `log.log(level, ..., extra=...)` makes it, without its steps
    that the line does not need (the caller's frame, the check of each extra field's name
    against the record's): it is on every request, a peer channel's too (whose line shows
    `verb` CHANNEL in place of the method)."""
    ms = round(seconds * 1000, 2)
    record = logging.getLogRecordFactory()(
        log.name, level, "(unknown file)", 0, "%s %s %d %.1f ms",
        (verb or method, path, status, ms), None, "(unknown function)")
    fields = record.__dict__
    fields["event"] = "request"
    fields["method"] = method
    fields["route"] = route
    fields["status"] = status
    fields["ms"] = ms
    log.handle(record)
