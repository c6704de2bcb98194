"""The synchronous client: one method per route of the contract, over one pooled
`httpx.Client` (no event loop per call)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from aquila_client import calls
from aquila_client.base import DEFAULT_NODE, Attempt, ClientBase
from aquila_client.calls import Call, Include, VectorsIn
from aquila_client.errors import AquilaError, TransportError
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
)
from aquila_client.nodes import final_error

T = TypeVar("T")


class Client(ClientBase):
    """A client for an Aquila cluster.

    `nodes`: one "host:port" or several; a call that fails on one node for a transient reason
    (connection refused or reset, timeout, 503) goes to the next. `api_key` is sent as
    `Authorization: Bearer <key>`. `timeout` (seconds) bounds each attempt; `connect_timeout`
    the connection part of it. Use it as a context manager, or call `close()`.
    """

    def __init__(
        self,
        nodes: str | Sequence[str] = DEFAULT_NODE,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        trust_env: bool = True,
    ) -> None:
        super().__init__(nodes, api_key=api_key, timeout=timeout, connect_timeout=connect_timeout)
        self._http = httpx.Client(headers=self._headers, transport=transport, trust_env=trust_env)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        errors: list[AquilaError] = []
        for url in self._ring.order(call):
            try:
                try:
                    resp = self._http.request(
                        call.method, url + call.path, content=call.body, params=call.params,
                        headers=self._headers_for(call), timeout=self._timeout(call),
                    )
                except httpx.RequestError as exc:
                    raise self._on_transport_error(call, exc, url) from None
                return self._on_response(call, resp, url)
            except Attempt as failed:
                errors.append(failed.error)
                if not failed.retry:
                    # An answer about the request itself (404, 400, ...), or a failure after
                    # which a repeat would not be safe: this is the outcome.
                    failed.error.attempts = list(errors)
                    raise failed.error from None
        raise final_error(errors)

    # -- collections ----------------------------------------------------------------------
    def create_collection(
        self, name: str, dim: int, *, metric: str | None = None, shards: int | None = None,
        replication: int | None = None, index: str | None = None, nlist: int | None = None,
        nprobe: int | None = None,
    ) -> Collection:
        """Create a collection (the same settings again is a no-op; others: AlreadyExists).
        Unset settings take the node's defaults (l2, 8 shards, replication 1, ivf_flat)."""
        return self._run(calls.create_collection(name, dim, metric, shards, replication, index,
                                                 nlist, nprobe))

    def get_collection(self, name: str) -> Collection:
        return self._run(calls.get_collection(name))

    def list_collections(self) -> list[Collection]:
        return self._run(calls.list_collections())

    def delete_collection(self, name: str) -> bool:
        return self._run(calls.delete_collection(name))

    # -- documents ------------------------------------------------------------------------
    def upsert(
        self, collection: str, vectors: VectorsIn, *, ids: Sequence[str] | None = None,
        metadata: Sequence[Metadata | None] | None = None, consistency: str | None = None,
    ) -> UpsertResult:
        """Insert or replace documents: `vectors` is (n, dim) (or one vector), sent as float32
        in the columnar form. Without `ids`, UUIDs are made here so a retry stays idempotent.
        One request, stored whole or not at all; split very large arrays into batches."""
        return self._run(calls.upsert(collection, vectors, ids, metadata, consistency))

    def get_document(self, collection: str, id: str, *, vector: bool = False) -> Document:
        """The document, with its float32 vector when `vector=True`; NotFound when absent."""
        return self._run(calls.get_document(collection, id, vector))

    def delete_documents(self, collection: str, ids: Sequence[str]) -> int:
        """Delete these ids (absent ones are skipped); the number deleted."""
        return self._run(calls.delete_documents(collection, ids))

    def delete_document(self, collection: str, id: str) -> int:
        """Delete one document; NotFound when absent."""
        return self._run(calls.delete_document(collection, id))

    # -- search, count, scroll ------------------------------------------------------------
    def search(
        self, collection: str, vectors: VectorsIn | None = None, *, id: str | None = None,
        ids: Sequence[str] | None = None, k: int | None = None, nprobe: int | None = None,
        recall: float | None = None, filter: Mapping[str, Any] | None = None,
        include: Include | None = None, allow_partial: bool | None = None,
        timeout_ms: int | None = None,
    ) -> SearchResult:
        """Nearest neighbours of each query: `vectors` (one vector or a (q, dim) matrix), or
        the stored vectors of `id`/`ids` (that document is left out of its own results).
        One `QueryResult` per query; `partial`/`missing_shards` say if shards were missing."""
        return self._run(calls.search(collection, vectors, id, ids, k, nprobe, recall, filter,
                                      include, allow_partial, timeout_ms, self.timeout))

    def count(self, collection: str, *, filter: Mapping[str, Any] | None = None) -> CountResult:
        return self._run(calls.count(collection, filter))

    def scroll(
        self, collection: str, *, filter: Mapping[str, Any] | None = None,
        limit: int | None = None, cursor: str | None = None, include: Include | None = None,
    ) -> ScrollPage:
        """One page of documents; pass `page.next_cursor` back for the next (None: done)."""
        return self._run(calls.scroll(collection, filter, limit, cursor, include))

    def scroll_all(
        self, collection: str, *, filter: Mapping[str, Any] | None = None,
        limit: int | None = None, include: Include | None = None,
    ) -> Iterator[Document]:
        """Every document (matching `filter`), following the cursors page after page."""
        cursor: str | None = None
        while True:
            page = self.scroll(collection, filter=filter, limit=limit, cursor=cursor,
                               include=include)
            yield from page.documents
            if page.next_cursor is None:
                return
            if page.next_cursor == cursor and not page.documents:
                raise TransportError(f"scroll of {collection!r} did not advance past {cursor!r}")
            cursor = page.next_cursor

    # -- cluster ----------------------------------------------------------------------------
    def cluster(self, *, node: str | None = None) -> ClusterInfo:
        """Membership as `node` (default: any node) sees it."""
        return self._run(calls.cluster_info(node))

    def shards(self) -> ShardMap:
        return self._run(calls.shards())

    def join(self, seeds: Sequence[str], *, node: str | None = None) -> JoinResult:
        """Join `node` (default: the current node) to the cluster of `seeds`."""
        return self._run(calls.join(seeds, node))

    def leave(self, *, node: str | None = None, max_wait: float | None = None) -> LeaveResult:
        """Make `node` (default: the current node) hand its shards over and leave. Waits for
        the moves: `max_wait` (seconds) defaults to the client's timeout."""
        return self._run(calls.leave(node, max_wait))

    def rebalance(self, *, dry_run: bool = False) -> RebalanceResult:
        """Plan (and unless `dry_run`, start) moves that even out the shards."""
        return self._run(calls.rebalance(dry_run))

    # -- operations -------------------------------------------------------------------------
    def healthz(self, *, node: str | None = None) -> bool:
        """Whether `node` (default: the current node) serves; TransportError if unreachable."""
        return self._run(calls.healthz(node))

    def readyz(self, *, node: str | None = None) -> bool:
        """Whether `node` is ready (joined, shards loaded); TransportError if unreachable."""
        return self._run(calls.readyz(node))

    def metrics(self, *, node: str | None = None) -> str:
        """Prometheus text of `node` (default: any node)."""
        return self._run(calls.metrics(node))

    def openapi(self) -> dict[str, Any]:
        return self._run(calls.openapi())
