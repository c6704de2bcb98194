"""The id of the client request that a piece of work serves, so that one grep follows a
request through the logs of every node it reaches.

The node that receives a public request takes the client's `X-Request-Id` when it is
well-formed (or makes one) and sets `current` for the request's task; tasks it starts copy
the context, so fan-out, writes and a rebalance it spawns carry it too. The peer client sends
it as a header, and a peer's internal routes adopt it for their own task. Only an id that
matches `ID_RE` is ever taken from the network: it lands in log lines and response headers.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Any, TypeGuard

HEADER = "X-Request-Id"
# Bounded and free of anything a log line or a header could be split or forged with.
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

current: ContextVar[str | None] = ContextVar("aquila_request_id", default=None)


def valid(raw: Any) -> TypeGuard[str]:
    return isinstance(raw, str) and ID_RE.fullmatch(raw) is not None
