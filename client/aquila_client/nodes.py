"""Failover across nodes, as pure decisions: which nodes a call goes to and in what order,
whether a failure may be retried on the next one, and the error raised when none answered.

Every node serves the whole API, so any of them can take any call. The client sticks to the
node that answered last (a dead node then costs one failed attempt, not one per call), and a
call tries each node at most once.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from aquila_client.calls import Call, Retry
from aquila_client.errors import AquilaError, RequestTimeout, TransportError

NODE_PORT = 8470


def base_url(addr: str) -> str:
    """'host:port' (or a full http(s) URL) → 'http://host:port' without a trailing slash.
    A bare 'host' is a node on Aquila's port, 8470 (the default of `aquila serve`); a URL
    without a port keeps its scheme's (80 or 443: a node behind a proxy)."""
    if not isinstance(addr, str) or not addr.strip():
        raise ValueError(f"a node address is 'host:port', got {addr!r}")
    text = addr.strip()
    bare = "://" not in text
    if bare:
        text = "http://" + text
    parts = urlsplit(text)
    if bare and parts.hostname and parts.port is None and not parts.netloc.endswith(":"):
        text = f"http://{parts.netloc}:{NODE_PORT}{text[len('http://') + len(parts.netloc):]}"
        parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a node address is 'host:port' or an http(s) URL, got {addr!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a node address has no path, got {addr!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in node address {addr!r}") from None
    return f"{parts.scheme}://{parts.netloc}"


def node_list(nodes: str | Sequence[str]) -> list[str]:
    items = [nodes] if isinstance(nodes, str) else list(nodes)
    if not items:
        raise ValueError("give at least one node address")
    urls: list[str] = []
    for item in items:
        url = base_url(item)
        if url not in urls:
            urls.append(url)
    return urls


class Failure(enum.Enum):
    NOT_SENT = "not_sent"  # no connection was made: the node never saw the request
    MAYBE_SENT = "maybe_sent"  # it may have been acted on (timeout, reset mid-reply)
    UNAVAILABLE = "unavailable"  # the node answered 503: it changed nothing


def classify(exc: httpx.RequestError) -> Failure:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return Failure.NOT_SENT
    return Failure.MAYBE_SENT


def may_retry(call: Call[Any], failure: Failure) -> bool:
    if call.node is not None or call.retry is Retry.PINNED:
        return False
    if call.retry is Retry.IDEMPOTENT:
        return True
    return failure is not Failure.MAYBE_SENT


class Ring:
    """The nodes and which one to try first; shared by the sync and the async client."""

    def __init__(self, nodes: str | Sequence[str]) -> None:
        self.urls = node_list(nodes)
        self.current = 0  # index of the node that answered last

    def order(self, call: Call[Any]) -> list[str]:
        if call.node is not None:
            return [base_url(call.node)]
        if call.retry is Retry.PINNED:
            return [self.urls[self.current]]
        n = len(self.urls)
        return [self.urls[(self.current + i) % n] for i in range(n)]

    def answered(self, url: str) -> None:
        if url in self.urls:
            self.current = self.urls.index(url)


def node_of(url: str) -> str:
    return url.split("://", 1)[-1]


def transport_error(exc: httpx.RequestError, url: str) -> TransportError:
    cls = RequestTimeout if isinstance(exc, httpx.TimeoutException) else TransportError
    detail = str(exc) or type(exc).__name__
    return cls(f"{type(exc).__name__}: {detail}", node=node_of(url))


def final_error(errors: list[AquilaError]) -> AquilaError:
    """The error to raise when no node gave an answer. A node's own answer (503) says more
    than a dead node's silence, so the last answer wins over transport failures; its message
    names what every node said, so a caller sees at once that the whole cluster was tried."""
    answered = [e for e in errors if e.status is not None]
    last = answered[-1] if answered else errors[-1]
    if len(errors) == 1:
        return last
    said = "; ".join(f"{e.node}: {e.code}: {e.message}" for e in errors)
    out = type(last)(f"no node could answer ({said})", status=last.status, code=last.code,
                     node=last.node)
    out.attempts = list(errors)
    return out
