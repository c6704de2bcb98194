"""Where a pure function of much data runs: `Offload` is the node's way to run it on a
thread (`Blocking.parse`), set at its start; `inline` runs it in place (in-process tests and
simulations, which have no threads to spare and no loop to keep free)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Offload = Callable[..., Awaitable[Any]]


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)
