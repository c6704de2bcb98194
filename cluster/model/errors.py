"""One error hierarchy, shared by node/ and cluster/: every error knows its HTTP status, its
contract code, and whether a retry on another replica can help (qdrant's `is_transient`)."""

from __future__ import annotations


class AquilaError(Exception):
    status = 500
    code = "internal"
    transient = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(AquilaError):
    status, code = 400, "bad_request"


class DimensionMismatch(AquilaError):
    status, code = 400, "dimension_mismatch"


class InvalidVector(AquilaError):
    status, code = 400, "invalid_vector"


class Unauthorized(AquilaError):
    status, code = 401, "unauthorized"


class Forbidden(AquilaError):
    """A valid key that does not allow this (the read key on a write)."""

    status, code = 403, "forbidden"


class NotFound(AquilaError):
    status, code = 404, "not_found"


class AlreadyExists(AquilaError):
    status, code = 409, "already_exists"


class PayloadTooLarge(AquilaError):
    status, code = 413, "payload_too_large"


class Unavailable(AquilaError):
    status, code, transient = 503, "unavailable", True


ERRORS_BY_CODE: dict[str, type[AquilaError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        DimensionMismatch,
        InvalidVector,
        Unauthorized,
        Forbidden,
        NotFound,
        AlreadyExists,
        PayloadTooLarge,
        Unavailable,
    )
}


def from_code(code: str, message: str) -> AquilaError:
    """Rebuild a typed error from a peer's error body."""
    return ERRORS_BY_CODE.get(code, AquilaError)(message)


def expected(exc: BaseException) -> bool:
    """A failure the cluster meets in its normal life (bad input, a peer unreachable, slow
    or refusing, a deadline): worth one line in the log, never a traceback. Anything else is
    a bug, logged with its traceback."""
    return isinstance(exc, AquilaError | TimeoutError)
