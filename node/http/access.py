"""Who may call which public route: the API key, the read key, and the open probes.

Peer routes (`/internal/*`) are never opened by these keys: they are authenticated by the
peer signature (node/http/internal_api.py). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac

from aquila.cluster.model.errors import Forbidden, Unauthorized
from aquila.node.config import NodeConfig

# Open to anyone, key or not: liveness and readiness probes (load balancers, compose), and
# the dashboard's static files (they hold no data; the page asks for the key to read any) and
# the root, which redirects to it.
OPEN_ROUTES = frozenset({
    ("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/ui"), ("GET", "/ui/{file}"),
})
# What the read key may call besides every GET (and HEAD): routes that read through a POST
# body. Keyed by the route's pattern; a new read route is added here.
READ_ROUTES = frozenset({
    ("POST", "/v1/collections/{name}/search"),
    ("POST", "/v1/collections/{name}/count"),
    ("POST", "/v1/collections/{name}/scroll"),
})


def is_read(method: str, route: str) -> bool:
    return method in ("GET", "HEAD") or (method, route) in READ_ROUTES


def _same(given: str, key: str) -> bool:
    # Bytes, so any header text compares (compare_digest refuses non-ASCII str);
    # surrogatepass keeps the encoding one-to-one.
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass")
    )


def check_access(config: NodeConfig, method: str, route: str, authorization: str) -> None:
    """Raise Unauthorized (401) or Forbidden (403) unless the request may go on.

    `route` is the matched route's pattern ("/v1/collections/{name}"), or the path itself
    when nothing matched; `authorization` the Authorization header ("" when absent)."""
    if not (config.api_key or config.read_key):
        return
    if route.startswith("/internal/") or (method, route) in OPEN_ROUTES:
        return
    if method == "HEAD" and ("GET", route) in OPEN_ROUTES:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme == "Bearer" and token:
        if config.api_key and _same(token, config.api_key):
            return
        if config.read_key and _same(token, config.read_key):
            if is_read(method, route):
                return
            raise Forbidden(f"the read key may not {method} {route}: it gives reads only")
    raise Unauthorized("missing or wrong API key (Authorization: Bearer <key>)")
