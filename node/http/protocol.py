"""Errors aiohttp answers itself, before any route or middleware runs (a request line or a
header over its limits, a malformed request, a method it cannot parse), in the contract's
shape: `{"error": {"code", "message"}}` as JSON, not aiohttp's plain text. A client's
malformed request is logged on one line, not with a traceback at error level: anyone who
can reach the port could otherwise fill the log with them."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.web_request import BaseRequest

from aquila.node.http.api import HTTP_CODES, json_response

log = logging.getLogger(__name__)

_MESSAGE_CHARS = 200  # of the parser's message, quoted back


class _JsonErrors(web.RequestHandler):
    """A connection's handler whose own error answers are JSON (see the module)."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            text = "internal error; see the node's log"
        else:
            text = f"malformed HTTP request: {exc or message or status}"[:_MESSAGE_CHARS]
            log.info("refused from %s: %s", request.remote, text)
        if request.writer.output_size > 0:  # a response had begun: the connection is broken
            raise ConnectionError("a response was sent already; cannot send the error")
        code = HTTP_CODES.get(status, "bad_request" if status < 500 else "internal")
        resp = json_response({"error": {"code": code, "message": text}}, status)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        handler = super().__call__()
        handler.__class__ = _JsonErrors  # same slots: only `handle_error` differs
        return handler


def json_errors(runner: web.BaseRunner) -> None:
    """Make the connections of `runner` (set up, not yet serving) answer aiohttp's own errors
    in the contract's shape."""
    server = runner.server
    if server is None:
        raise RuntimeError("the runner is not set up")
    server.__class__ = _JsonErrorServer
