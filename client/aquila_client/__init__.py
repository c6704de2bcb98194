"""Python client for Aquila: `Client` and `AsyncClient`, numpy in and out, typed results,
one exception class per error code, failover across nodes.

    from aquila_client import Client
    with Client(["127.0.0.1:8470", "127.0.0.2:8470"]) as db:
        db.create_collection("docs", dim=384, metric="cosine")
        db.upsert("docs", vectors, ids=ids, metadata=[{"pos": "noun"}, ...])
        hits = db.search("docs", query, k=10, filter={"must": [{"key": "pos", "match": "noun"}]})
"""

from aquila_client._version import __version__
from aquila_client.async_client import AsyncClient
from aquila_client.client import Client
from aquila_client.errors import (
    AlreadyExists,
    AquilaError,
    BadRequest,
    DimensionMismatch,
    Forbidden,
    InvalidVector,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TransportError,
    Unauthorized,
    Unavailable,
)
from aquila_client.models import (
    ClusterInfo,
    Collection,
    CountResult,
    Document,
    IndexConfig,
    JoinResult,
    LeaveResult,
    Member,
    PlannedMove,
    QueryResult,
    RebalanceResult,
    ScrollPage,
    SearchResult,
    ShardMap,
    ShardMove,
    ShardPlacement,
    ShardState,
    UpsertResult,
)

__all__ = [
    "AlreadyExists", "AquilaError", "AsyncClient", "BadRequest", "Client", "ClusterInfo",
    "Collection", "CountResult", "DimensionMismatch", "Document", "Forbidden", "IndexConfig",
    "InvalidVector", "JoinResult", "LeaveResult", "Member", "NotFound", "PayloadTooLarge",
    "PlannedMove", "QueryResult", "RebalanceResult", "RequestTimeout", "ScrollPage",
    "SearchResult", "ShardMap", "ShardMove", "ShardPlacement", "ShardState", "TransportError",
    "Unauthorized", "Unavailable", "UpsertResult", "__version__",
]
