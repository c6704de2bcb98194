"""schemathesis hooks of the fuzz run (tests/test_fuzz_openapi.py), loaded through
SCHEMATHESIS_HOOKS: they steer generated requests towards stored data.

- Generated collection names rarely exist: half of the requests on documents and searches
  (all of them in the stateful phase) are sent to a collection known to exist instead (the
  one the test filled, "docs", and those the run created), never to the one the test
  guards, which no request may name.
- Generated vectors rarely have the collection's dim: lists of numbers sent to a known
  collection are cycled or cut to its dim, and a columnar upsert's base64 is made to hold
  one row of that dim per id, so they reach the store and the index.
- A search or count that refuses partial answers with a deadline of a few ms gets the
  contract's 503 `unavailable` when the deadline passes first, which on a loaded machine it
  may: such a deadline (a valid one) is raised to 5 s, so a 5xx still means a server error.

Anything else is left as generated (whatever made a negative case negative stays), and
schemathesis checks a changed case against the schema again.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np
import schemathesis

# Collection name → dim: the one the test filled, and those the run created (one worker).
DIMS: dict[str, int] = {"docs": 4}
DATA_PATHS = ("/documents", "/search", "/count", "/scroll")
# A deadline no search of the run's small collections misses, however loaded the machine.
_SURE_DEADLINE_MS = 5000


def _fit(v: Any, dim: int) -> Any:
    numbers = isinstance(v, list) and v and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    return (v * dim)[:dim] if numbers else v


def _fit_columnar(out: dict[str, Any], dim: int) -> None:
    """A columnar upsert's vectors as as many rows of `dim` as it has ids (their values
    made from the generated text, so they vary with it)."""
    ids = out.get("ids")
    rows = len(ids) if isinstance(ids, list) and ids else 1
    seed = zlib.crc32(out["vectors_b64"].encode())
    values = np.random.default_rng(seed).standard_normal(rows * dim).astype("<f4")
    out["vectors_b64"] = base64.b64encode(values.tobytes()).decode()


def _fit_body(body: dict[str, Any], dim: int) -> dict[str, Any]:
    out = dict(body)
    if isinstance(out.get("vectors_b64"), str) and "documents" not in out:
        _fit_columnar(out, dim)
    if "vector" in out:
        out["vector"] = _fit(out["vector"], dim)
    if isinstance(out.get("vectors"), list):
        out["vectors"] = [_fit(v, dim) for v in out["vectors"]]
    deadline = out.get("timeout_ms")
    if (out.get("allow_partial") is not True and isinstance(deadline, int)
            and not isinstance(deadline, bool) and 1 <= deadline < _SURE_DEADLINE_MS):
        out["timeout_ms"] = _SURE_DEADLINE_MS
    if isinstance(out.get("documents"), list):
        out["documents"] = [{**d, "vector": _fit(d["vector"], dim)}
                            if isinstance(d, dict) and "vector" in d else d
                            for d in out["documents"]]
    return out


def _phase(case: Any) -> str:
    phase = getattr(getattr(case, "meta", None), "phase", None)
    return str(getattr(phase, "name", ""))


def _retarget(case: Any) -> None:
    """Every other request on documents or searches goes to a known collection (chosen by
    a checksum of the case, so that a run is repeatable from its seed); in the stateful
    phase every one, since its scenarios start from an upsert (a POST) and follow the links
    from the documents it wrote."""
    params = case.path_parameters or {}
    if "name" not in params or params["name"] in DIMS:
        return
    if not any(part in case.operation.path for part in DATA_PATHS):
        return
    pick = zlib.crc32(repr((case.method, params, case.body)).encode())
    if pick % 2 or _phase(case) == "stateful":
        names = sorted(DIMS)
        case.path_parameters = {**params, "name": names[(pick // 2) % len(names)]}


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    _retarget(case)
    dim = DIMS.get((case.path_parameters or {}).get("name"))
    if dim is not None and isinstance(case.body, dict):
        case.body = _fit_body(case.body, dim)  # assigned, not mutated: schemathesis re-checks
    return case


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    if case.method.upper() != "PUT" or response.status_code not in (200, 201):
        return
    try:
        body = response.json()
    except ValueError:
        return
    if isinstance(body, dict) and isinstance(body.get("dim"), int):
        DIMS[body["name"]] = body["dim"]
