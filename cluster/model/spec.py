"""Collection settings: parsing and validating the PUT body, pure."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from aquila.cluster.model.errors import BadRequest

# Matched with fullmatch: `$` would also accept a trailing newline ("a\n").
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
METRICS = ("l2", "ip", "cosine")
INDEX_TYPES = ("ivf_flat", "ivf_sq8", "ivf_pq", "flat")
MAX_DIM = 65536
MAX_SHARDS = 1024
MAX_REPLICATION = 16


@dataclass(frozen=True)
class IndexSpec:
    type: str = "ivf_flat"
    # None: chosen from the size of the index when it trains (about 4·√n; one index per node
    # over its local shards).
    nlist: int | None = None
    nprobe: int = 16


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    dim: int
    metric: str = "l2"
    shards: int = 8
    replication: int = 1
    index: IndexSpec = IndexSpec()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> CollectionSpec:
        """A spec as `to_json` wrote it, checked as a PUT body is: it may come from a peer
        (BadRequest when it is not a valid spec, its name included)."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise BadRequest("a collection spec is an object with a string 'name'")
        return parse_spec(d["name"], d)


def check_name(name: Any) -> str:
    """`name` if it is a valid collection name: the only names that reach a path on disk."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadRequest(f"collection name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
    return name


def _int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{key}' must be an integer from {lo} to {hi}")
    if not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be from {lo} to {hi}, got {v}")
    return v


def parse_spec(name: str, body: Any) -> CollectionSpec:
    """The spec a PUT /v1/collections/{name} body asks for, or BadRequest."""
    check_name(name)
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(body) - {"dim", "metric", "shards", "replication", "index", "name"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "dim" not in body:
        raise BadRequest("'dim' is required")
    dim = _int(body, "dim", None, 1, MAX_DIM)
    metric = body.get("metric", "l2")
    if metric not in METRICS:
        raise BadRequest(f"'metric' must be one of {', '.join(METRICS)}")
    shards = _int(body, "shards", 8, 1, MAX_SHARDS)
    replication = _int(body, "replication", 1, 1, MAX_REPLICATION)
    raw_index = body.get("index", {})
    if raw_index is None:
        raw_index = {}
    if not isinstance(raw_index, dict):
        raise BadRequest("'index' must be an object")
    unknown = set(raw_index) - {"type", "nlist", "nprobe"}
    if unknown:
        raise BadRequest(f"unknown index field(s): {', '.join(sorted(unknown))}")
    itype = raw_index.get("type", "ivf_flat")
    if itype not in INDEX_TYPES:
        raise BadRequest(f"'index.type' must be one of {', '.join(INDEX_TYPES)}")
    nlist = raw_index.get("nlist")
    if nlist is not None:
        nlist = _int(raw_index, "nlist", None, 1, 1 << 20)
    nprobe = _int(raw_index, "nprobe", 16, 1, 1 << 20)
    if itype == "ivf_pq" and pq_m(dim) is None:
        raise BadRequest(f"ivf_pq needs a dim with a divisor from 2 to 64; {dim} has none")
    return CollectionSpec(name, dim, metric, shards, replication, IndexSpec(itype, nlist, nprobe))


def pq_m(dim: int) -> int | None:
    """Sub-quantizers for ivf_pq: the divisor of dim nearest to dim/8 (8 dims each), ≤ 64."""
    best = None
    for m in range(2, min(64, dim) + 1):
        if dim % m == 0 and (best is None or abs(dim / m - 8) < abs(dim / best - 8)):
            best = m
    return best
