"""The node's log: one line per event, as JSON (`--log-format json`, for machines) or text
(for a terminal), each with the node's id and the id of the client request it serves
(`cluster.model.request_id`), so that one grep follows a request across nodes.

Fields given with `extra={...}` become fields of the JSON line (`key=value` in text). A
traceback stays on its event's line (escaped newlines in text), so that no line of the log
is a fragment of another event.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from aquila.cluster.model import request_id
from aquila.cluster.model.errors import expected

FORMATS = ("json", "text")

# Attributes every LogRecord has: anything else on a record came from `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "request_id", "node",
}


def _expected(exc: BaseException | None) -> bool:
    """The cluster's expected failures, and a client's malformed HTTP (aiohttp logs those
    with a traceback) or a connection it dropped."""
    return exc is not None and (expected(exc) or isinstance(exc, HttpProcessingError
                                                             | ConnectionResetError))


class _Context(logging.Filter):
    """Stamps every record with the node id and the current request id, and turns the
    traceback of an expected failure, wherever it was logged, into a few words."""

    def __init__(self) -> None:
        super().__init__()
        self.node: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.current.get()
        record.node = self.node
        exc = record.exc_info[1] if record.exc_info else None
        if _expected(exc):
            record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {exc}", ()
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


# The formatted second of the last line (one tuple: threads log too): lines come many a
# second (one per request), and formatting a date is most of what a line costs to format.
_second: tuple[float, str] = (-1.0, "")


def _timestamp(record: logging.LogRecord) -> str:
    global _second
    secs, frac = divmod(record.created, 1.0)
    ms = min(999, int(frac * 1000))  # truncated, as isoformat(timespec="milliseconds")
    last = _second
    if secs != last[0]:
        t = datetime.datetime.fromtimestamp(secs, datetime.UTC)
        last = _second = (secs, t.strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{last[1]}.{ms:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        node = getattr(record, "node", None)
        if node:
            out["node"] = node
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        for k, v in _extras(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        fields = dict(_extras(record))
        node = getattr(record, "node", None)
        rid = getattr(record, "request_id", None)
        if rid:
            fields = {"request_id": rid, **fields}
        if node:
            fields = {"node": node, **fields}
        parts += [f"{k}={v}" for k, v in fields.items()]
        line = " ".join(str(p) for p in parts)
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info)
        return line.replace("\r", "\\r").replace("\n", "\\n")


class TurnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines to a stream (stderr), those made on the event loop's thread below WARNING
    written together once the loop's turn ends: one write for every request a turn
    answered, not one per access line. A write lets go of the GIL, and the loop then waits
    to have it back from a search thread running Python (resolving its hits). A line of
    another thread, or a warning, is written at once, after the lines still waiting (the
    order of the lines is kept); `flush` (logging's shutdown too) writes those."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        # The loop whose turn's end writes the lines waiting (None: no flush to come). A
        # line of another loop schedules its own: this one may close before its flush runs.
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if record.levelno < logging.WARNING:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # not the loop's thread
                    loop = None
                if loop is not None:
                    if loop is not self._flush_on:
                        loop.call_soon(self.flush)
                        self._flush_on = loop
                    self._waiting.append(line)
                    return
            self._waiting.append(line)  # written now, after the lines still waiting
            self.flush()
        except RecursionError:  # as StreamHandler.emit
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_on = None
            if self._waiting:
                text = "".join(self._waiting)
                self._waiting.clear()
                self.stream.write(text)
            super().flush()


_context = _Context()


def configure(level: str, fmt: str) -> None:
    """Route every logger of the process to stderr in this format, at this level."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = TurnHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_context)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # No line shows the process's name, its id, the thread or the caller's file and line:
    # none is looked up per record (the logging HOWTO's "Optimization"; the caller's is a
    # walk up the stack, on every request's access line).
    logging.logMultiprocessing = False
    logging.logProcesses = False
    logging.logThreads = False
    logging._srcfile = None


def set_node(node_id: str) -> None:
    """The node id stamped on every line from now on (known once the data dir is read)."""
    _context.node = node_id
