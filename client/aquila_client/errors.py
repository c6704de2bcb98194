"""One exception class per error code of the contract, plus the failures of the transport.

Every error an Aquila node answers is `{"error": {"code", "message"}}` with an HTTP status;
`error_from_response` turns it into the class of its code, so callers catch what they mean:
`except NotFound`, `except DimensionMismatch`, ... and `except AquilaError` for all of them.
"""

from __future__ import annotations

from typing import Any


class AquilaError(Exception):
    """Base of every error this client raises.

    `code` is the contract's code (`"not_found"`, ...), `status` the HTTP status (None when no
    node answered), `node` the `host:port` that answered or failed last."""

    code: str = "error"
    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 node: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.node = node
        # When every node was tried: what each of them said, in order (the last is this one).
        self.attempts: list[AquilaError] = []

    def __str__(self) -> str:
        where = f" (from {self.node})" if self.node else ""
        return f"{self.code}: {self.message}{where}"


class BadRequest(AquilaError):
    """400: malformed JSON, a missing or wrong field, a limit passed."""

    code, status = "bad_request", 400


class DimensionMismatch(AquilaError):
    """400: a vector's length is not the collection's dim."""

    code, status = "dimension_mismatch", 400


class InvalidVector(AquilaError):
    """400: NaN, infinity or a non-number in a vector (raised before sending for queries,
    whose JSON cannot carry NaN)."""

    code, status = "invalid_vector", 400


class Unauthorized(AquilaError):
    """401: no API key, or the wrong one."""

    code, status = "unauthorized", 401


class Forbidden(AquilaError):
    """403: the key is valid but may not do this (a read-only key on a write)."""

    code, status = "forbidden", 403


class NotFound(AquilaError):
    """404: no such collection or document."""

    code, status = "not_found", 404


class AlreadyExists(AquilaError):
    """409: a collection of that name exists with other settings."""

    code, status = "already_exists", 409


class PayloadTooLarge(AquilaError):
    """413: the body is over the node's limit; send smaller batches."""

    code, status = "payload_too_large", 413


class Unavailable(AquilaError):
    """503: not enough live replicas, or the node is not ready. Retried on the next node."""

    code, status = "unavailable", 503


class TransportError(AquilaError):
    """No usable HTTP answer: connection refused or reset, or a reply that is not the
    contract's JSON. `status` is None unless a node answered something unreadable."""

    code = "transport"


class RequestTimeout(TransportError):
    """The node did not answer within the client's timeout."""

    code = "timeout"


ERRORS_BY_CODE: dict[str, type[AquilaError]] = {
    cls.code: cls
    for cls in (BadRequest, DimensionMismatch, InvalidVector, Unauthorized, Forbidden, NotFound,
                AlreadyExists, PayloadTooLarge, Unavailable)
}

# When a body is not the contract's shape (a proxy's HTML page, say), the status still says
# which kind of failure it was.
_BY_STATUS: dict[int, type[AquilaError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: AlreadyExists,
    413: PayloadTooLarge, 503: Unavailable,
}


def error_from_response(status: int, body: Any, node: str | None = None) -> AquilaError:
    """The typed error for an HTTP error answer; `body` is the decoded JSON or None."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        code = err["code"]
        message = err.get("message")
        text = message if isinstance(message, str) and message else code
        cls = ERRORS_BY_CODE.get(code)
        if cls is not None:
            return cls(text, status=status, node=node)
        return AquilaError(text, status=status, code=code, node=node)
    cls = _BY_STATUS.get(status)
    text = f"HTTP {status} without the contract's error body"
    if cls is not None:
        return cls(text, status=status, node=node)
    return AquilaError(text, status=status, code=f"http_{status}", node=node)
