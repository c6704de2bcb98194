"""What the sync and async clients share: settings, headers, reading a reply, and the
per-attempt decision of the failover loop (the loop itself differs only by `await`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

import httpx

from aquila_client._version import __version__
from aquila_client.calls import Call, Reply
from aquila_client.errors import AquilaError, TransportError, error_from_response
from aquila_client.nodes import Failure, Ring, classify, may_retry, node_of, transport_error

T = TypeVar("T")

DEFAULT_NODE = "127.0.0.1:8470"


class Attempt(Exception):
    """A failed attempt on one node: the error, and whether the next node may be tried."""

    def __init__(self, error: AquilaError, retry: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry = retry


class ClientBase:
    def __init__(
        self,
        nodes: str | Sequence[str] = DEFAULT_NODE,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts are positive numbers of seconds")
        self._ring = Ring(nodes)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self._headers = {"User-Agent": f"aquila-client/{__version__}",
                         "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    @property
    def nodes(self) -> list[str]:
        """The nodes' base URLs, in the order given."""
        return list(self._ring.urls)

    @property
    def current_node(self) -> str:
        """The node tried first: the one that answered last."""
        return self._ring.urls[self._ring.current]

    def _timeout(self, call: Call[Any]) -> httpx.Timeout:
        total = call.timeout if call.timeout is not None else self.timeout
        return httpx.Timeout(total, connect=min(self.connect_timeout, total))

    def _headers_for(self, call: Call[Any]) -> dict[str, str]:
        if call.body is None:
            return {}
        return {"Content-Type": "application/json"}

    def _on_transport_error(self, call: Call[Any], exc: httpx.RequestError,
                            url: str) -> Attempt:
        return Attempt(transport_error(exc, url), may_retry(call, classify(exc)))

    def _on_response(self, call: Call[T], resp: httpx.Response, url: str) -> T:
        """The call's value from this answer, or Attempt."""
        reply = _reply(resp)
        status = resp.status_code
        if status >= 400 and status not in call.accept:
            err = error_from_response(status, reply.json, node_of(url))
            if status != 503:
                self._ring.answered(url)  # it is up: an error about the request, not the node
            raise Attempt(err, status == 503 and may_retry(call, Failure.UNAVAILABLE))
        self._ring.answered(url)
        try:
            return call.parse(reply)
        except TransportError as exc:
            exc.node = node_of(url)
            raise Attempt(exc, False) from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise Attempt(TransportError(
                f"{call.method} {call.path}: the reply is not the contract's shape "
                f"({type(exc).__name__}: {exc})", status=status, node=node_of(url)), False) from None


def _reply(resp: httpx.Response) -> Reply:
    body: Any = None
    if resp.content:
        try:
            body = json.loads(resp.content)
        except ValueError:  # includes UnicodeDecodeError
            body = None
    return Reply(resp.status_code, body, resp.content)
