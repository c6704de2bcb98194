"""Every route of the contract as a pure `Call`: method, path, body, how to read the reply and
whether it may be retried on another node. The sync and async clients only send them.

Keeping this pure means the request shapes are built (and tested) once for both clients, and
anything decided before sending, such as generated ids, is fixed before the first attempt, so a
retry on the next node sends exactly the same request.
"""

from __future__ import annotations

import base64
import enum
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from aquila_client.errors import InvalidVector
from aquila_client.models import (
    ClusterInfo,
    Collection,
    CountResult,
    Document,
    JoinResult,
    LeaveResult,
    Metadata,
    RebalanceResult,
    ScrollPage,
    SearchResult,
    ShardMap,
    UpsertResult,
    as_str_list,
    collections_from_json,
)

T = TypeVar("T")

Include = Sequence[str]
VectorsIn = npt.ArrayLike


class Retry(enum.Enum):
    """What may be sent again to the next node after a failure."""

    #: Safe to repeat: reads, and writes whose repetition changes nothing (an upsert with the
    #: same ids, a PUT of the same collection settings, a delete of a list of ids). Retried
    #: after a connection failure, a timeout, a broken reply or a 503.
    IDEMPOTENT = "idempotent"
    #: The node's state would be the same after a repeat, but the answer would not (a second
    #: DELETE of a collection says 404), or a repeat starts work twice (rebalance). Retried
    #: only when the first attempt cannot have been acted on: the connection was never made, or
    #: the node answered 503 (a rejected request changes nothing).
    UNSENT = "unsent"
    #: About one node (health, join, leave): never sent to another.
    PINNED = "pinned"


@dataclass(frozen=True)
class Reply:
    status: int
    json: Any  # the decoded body, or None when it is not JSON
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Reply], T]
    body: bytes | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    retry: Retry = Retry.IDEMPOTENT
    node: str | None = None  # send only to this node ("host:port")
    timeout: float | None = None  # seconds, when the route needs more than the client's
    accept: frozenset[int] = frozenset()  # error statuses handed to `parse`, not raised


def _numpy_value(value: Any) -> Any:
    """numpy scalars and arrays in metadata or filters (np.float32(0.5), np.int64(3), an
    array of tags) as the JSON numbers and lists they hold; anything else is not JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON (metadata and filters are JSON)")


def dumps(body: Any) -> bytes:
    # allow_nan=False: JSON has no NaN, and sending one would be a malformed-JSON 400 instead
    # of the invalid_vector the caller should get (checked before this, see query_rows).
    return json.dumps(body, separators=(",", ":"), allow_nan=False,
                      default=_numpy_value).encode()


def seg(value: str) -> str:
    """One path segment, quoted: ids may hold '/', '?', '#', spaces or any other character.
    "." and ".." are quoted too ('.' is unreserved, so `quote` leaves it): as segments, URL
    libraries resolve them away (httpx sends GET .../documents/.. as GET /v1/collections/c)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty str, got {value!r}")
    if value in (".", ".."):
        return value.replace(".", "%2E")
    return quote(value, safe="")


def _json(reply: Reply) -> Any:
    return reply.json


# -- vectors ------------------------------------------------------------------------------
def as_matrix(vectors: VectorsIn, what: str) -> tuple[npt.NDArray[np.float32], bool]:
    """(rows × dim float32, C order, whether the input was one 1-D vector)."""
    arr = np.asarray(vectors)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{what} must be numbers, got an array of {arr.dtype}")
    if arr.ndim == 1:
        return np.ascontiguousarray(arr, dtype=np.float32).reshape(1, -1), True
    if arr.ndim != 2:
        raise ValueError(f"{what} must be one vector or a 2-D array (rows × dim), got {arr.ndim}-D")
    return np.ascontiguousarray(arr, dtype=np.float32), False


def vectors_b64(matrix: npt.NDArray[np.float32]) -> bytes:
    """The columnar form: little-endian float32, row after row, base64 (ASCII bytes)."""
    return base64.b64encode(np.ascontiguousarray(matrix, dtype="<f4").tobytes())


def query_rows(matrix: npt.NDArray[np.float32], what: str) -> list[list[float]]:
    """Rows for a JSON body. float32 → Python float is exact, so the node reads back the same
    float32 values. JSON cannot carry NaN or infinity: refused here with the server's class."""
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidVector(f"{what}[{bad}] holds NaN or infinity")
    rows: list[list[float]] = matrix.tolist()
    return rows


def _include(include: Include) -> list[str]:
    out = [str(x) for x in include]
    unknown = set(out) - {"metadata", "vector"}
    if unknown:
        raise ValueError(f"include is a list of 'metadata' and 'vector', got {sorted(unknown)}")
    return out


# -- collections --------------------------------------------------------------------------
def create_collection(
    name: str, dim: int, metric: str | None, shards: int | None, replication: int | None,
    index: str | None, nlist: int | None, nprobe: int | None,
) -> Call[Collection]:
    body: dict[str, Any] = {"dim": dim}
    for key, value in (("metric", metric), ("shards", shards), ("replication", replication)):
        if value is not None:
            body[key] = value
    idx = {k: v for k, v in (("type", index), ("nlist", nlist), ("nprobe", nprobe))
           if v is not None}
    if idx:
        body["index"] = idx
    # PUT with the same settings is idempotent (200); a retry after a lost 201 gets 200.
    return Call("PUT", f"/v1/collections/{seg(name)}", lambda r: Collection.from_json(r.json),
                dumps(body))


def get_collection(name: str) -> Call[Collection]:
    return Call("GET", f"/v1/collections/{seg(name)}", lambda r: Collection.from_json(r.json))


def list_collections() -> Call[list[Collection]]:
    return Call("GET", "/v1/collections", lambda r: collections_from_json(r.json))


def delete_collection(name: str) -> Call[bool]:
    return Call("DELETE", f"/v1/collections/{seg(name)}",
                lambda r: bool(r.json.get("deleted", False)), retry=Retry.UNSENT)


# -- documents ----------------------------------------------------------------------------
def upsert(
    collection: str, vectors: VectorsIn, ids: Sequence[str] | None,
    metadata: Sequence[Metadata | None] | None, consistency: str | None,
) -> Call[UpsertResult]:
    matrix, _ = as_matrix(vectors, "vectors")
    n = matrix.shape[0]
    if ids is None:
        # Generated here, before the first attempt, so that a retry upserts the same documents
        # instead of creating copies under new server-generated ids.
        id_list = [str(uuid.uuid4()) for _ in range(n)]
    else:
        id_list = as_str_list(ids, "ids")
        if len(id_list) != n:
            raise ValueError(f"{len(id_list)} ids for {n} vectors")
    rest: dict[str, Any] = {}
    if metadata is not None:
        meta = [{} if m is None else m for m in metadata]
        if len(meta) != n:
            raise ValueError(f"{len(meta)} metadata objects for {n} vectors")
        for i, m in enumerate(meta):
            if not isinstance(m, Mapping):
                raise TypeError(f"metadata[{i}] must be a dict, got {type(m).__name__}")
        rest["metadata"] = [dict(m) for m in meta]
    if consistency is not None:
        rest["consistency"] = consistency
    # The base64 text goes in as it is: it needs no JSON escaping, and running tens of MB of it
    # through the JSON encoder would cost more than everything else in the request.
    body = b"".join([b'{"ids":', dumps(id_list), b',"vectors_b64":"', vectors_b64(matrix), b'"',
                     b"," + dumps(rest)[1:] if rest else b"}"])
    return Call("POST", f"/v1/collections/{seg(collection)}/documents",
                lambda r: UpsertResult.from_json(r.json), body)


def get_document(collection: str, doc_id: str, vector: bool) -> Call[Document]:
    return Call("GET", f"/v1/collections/{seg(collection)}/documents/{seg(doc_id)}",
                lambda r: Document.from_json(r.json),
                params={"vector": "true"} if vector else {})


def delete_documents(collection: str, ids: Sequence[str]) -> Call[int]:
    body = {"ids": as_str_list(ids, "ids")}
    return Call("POST", f"/v1/collections/{seg(collection)}/documents/delete",
                lambda r: int(r.json["deleted"]), dumps(body))


def delete_document(collection: str, doc_id: str) -> Call[int]:
    # A repeat after a lost answer would say 404 for a delete that worked: not retried blind.
    return Call("DELETE", f"/v1/collections/{seg(collection)}/documents/{seg(doc_id)}",
                lambda r: int(r.json["deleted"]), retry=Retry.UNSENT)


# -- search, count, scroll ----------------------------------------------------------------
def search(
    collection: str, vectors: VectorsIn | None, id: str | None, ids: Sequence[str] | None,
    k: int | None, nprobe: int | None, recall: float | None, filter: Mapping[str, Any] | None,
    include: Include | None, allow_partial: bool | None, timeout_ms: int | None,
    client_timeout: float,
) -> Call[SearchResult]:
    given = [name for name, v in (("vectors", vectors), ("id", id), ("ids", ids)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of vectors, id or ids"
                         + (f" (got {', '.join(given)})" if given else ""))
    if nprobe is not None and recall is not None:
        raise ValueError("give nprobe or recall, not both")
    body: dict[str, Any] = {}
    if vectors is not None:
        matrix, one = as_matrix(vectors, "vectors")
        rows = query_rows(matrix, "vectors")
        if one:
            body["vector"] = rows[0]
        else:
            body["vectors"] = rows
    elif id is not None:
        body["id"] = id
    else:
        assert ids is not None
        body["ids"] = as_str_list(ids, "ids")
    # Only what was asked goes out: the node's defaults stay the node's, and a v1 node (which
    # refuses unknown fields) still takes every search that does not use a v2 field.
    for key, value in (("k", k), ("nprobe", nprobe), ("recall", recall),
                       ("allow_partial", allow_partial), ("timeout_ms", timeout_ms)):
        if value is not None:
            body[key] = value
    if filter is not None:
        body["filter"] = dict(filter)
    if include is not None:
        body["include"] = _include(include)
    # The HTTP wait must outlast the node's own deadline, or the client gives up on an answer
    # the node is about to send (partial or complete).
    timeout = None
    if timeout_ms is not None and timeout_ms / 1000 + 1 > client_timeout:
        timeout = timeout_ms / 1000 + 1
    return Call("POST", f"/v1/collections/{seg(collection)}/search",
                lambda r: SearchResult.from_json(r.json), dumps(body), timeout=timeout)


def count(collection: str, filter: Mapping[str, Any] | None) -> Call[CountResult]:
    body: dict[str, Any] = {} if filter is None else {"filter": dict(filter)}
    return Call("POST", f"/v1/collections/{seg(collection)}/count",
                lambda r: CountResult.from_json(r.json), dumps(body))


def scroll(
    collection: str, filter: Mapping[str, Any] | None, limit: int | None, cursor: str | None,
    include: Include | None,
) -> Call[ScrollPage]:
    body: dict[str, Any] = {"cursor": cursor}
    if filter is not None:
        body["filter"] = dict(filter)
    if limit is not None:
        body["limit"] = limit
    if include is not None:
        body["include"] = _include(include)
    return Call("POST", f"/v1/collections/{seg(collection)}/scroll",
                lambda r: ScrollPage.from_json(r.json), dumps(body))


# -- cluster and operations ---------------------------------------------------------------
def cluster_info(node: str | None) -> Call[ClusterInfo]:
    return Call("GET", "/v1/cluster", lambda r: ClusterInfo.from_json(r.json), node=node,
                retry=Retry.PINNED if node else Retry.IDEMPOTENT)


def shards() -> Call[ShardMap]:
    return Call("GET", "/v1/cluster/shards", lambda r: ShardMap.from_json(r.json))


def join(seeds: Sequence[str], node: str | None) -> Call[JoinResult]:
    body = {"seeds": as_str_list(seeds, "seeds")}
    # Joining is about the node that receives it: never sent to another one.
    return Call("POST", "/v1/cluster/join", lambda r: JoinResult.from_json(r.json), dumps(body),
                retry=Retry.PINNED, node=node)


def leave(node: str | None, timeout: float | None) -> Call[LeaveResult]:
    # Sent to another node it would make *that* node leave. It answers once every shard has
    # moved, which can take much longer than a search.
    return Call("POST", "/v1/cluster/leave", lambda r: LeaveResult.from_json(r.json),
                retry=Retry.PINNED, node=node, timeout=timeout)


def rebalance(dry_run: bool) -> Call[RebalanceResult]:
    return Call("POST", "/v1/cluster/rebalance", lambda r: RebalanceResult.from_json(r.json),
                dumps({"dry_run": dry_run}), retry=Retry.IDEMPOTENT if dry_run else Retry.UNSENT)


def healthz(node: str | None) -> Call[bool]:
    return Call("GET", "/healthz", lambda r: r.status == 200, retry=Retry.PINNED, node=node,
                accept=frozenset({503}))


def readyz(node: str | None) -> Call[bool]:
    # 503 is the answer "not ready yet", not an error of the request.
    return Call("GET", "/readyz", lambda r: r.status == 200, retry=Retry.PINNED, node=node,
                accept=frozenset({503}))


def metrics(node: str | None) -> Call[str]:
    return Call("GET", "/metrics", lambda r: r.text, retry=Retry.PINNED if node else
                Retry.IDEMPOTENT, node=node)


def openapi() -> Call[dict[str, Any]]:
    return Call("GET", "/openapi.json", lambda r: dict(r.json))
