"""The operations the cluster layer carries out, as typed requests: the HTTP layer parses and
validates a client's body into one of these (node/http/parse.py), and nothing past it sees the
body itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from aquila.cluster.model.bounds import MAX_DOCUMENT_METADATA
from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.filters import Predicate

CONSISTENCY = ("one", "quorum", "all")
MAX_ID_CHARS = 256
MAX_K = 1000


def valid_id(doc_id: Any) -> TypeGuard[str]:
    """A document id: a string of 1 to MAX_ID_CHARS characters."""
    return isinstance(doc_id, str) and 1 <= len(doc_id) <= MAX_ID_CHARS


@dataclass
class DocBatch:
    """Validated documents to upsert: ids, an n × dim float32 matrix, serialised metadata
    (each at most `MAX_DOCUMENT_METADATA` bytes, whichever parser made the batch)."""

    ids: list[str]
    vectors: np.ndarray  # n × dim float32
    metadata: list[bytes]  # JSON objects, serialised
    consistency: str

    def __post_init__(self) -> None:
        if self.metadata and max(map(len, self.metadata)) > MAX_DOCUMENT_METADATA:
            at = next(i for i, m in enumerate(self.metadata) if len(m) > MAX_DOCUMENT_METADATA)
            raise BadRequest(
                f"document {at} (id {self.ids[at]!r}): its metadata is "
                f"{len(self.metadata[at]):,} bytes serialised, at most "
                f"{MAX_DOCUMENT_METADATA:,}")


@dataclass(eq=False)  # by identity: the peer codec memoises its wire form per request
class SearchRequest:
    vectors: np.ndarray  # nq × dim float32 (0 × dim until `query_ids` are looked up)
    k: int
    nprobe: int | None
    filter: Any  # as the client gave it (a peer parses it again)
    predicate: Predicate | None
    include_metadata: bool
    include_vector: bool
    allow_partial: bool
    timeout_ms: int | None
    explain: bool = False  # answer with each shard's plan (how it was searched)
    # A search by stored documents: their vectors are the queries, and each is left out of
    # its own results (the read path looks them up, asks for k + 1 and drops the document).
    query_ids: list[str] | None = None
    # In place of nprobe: the recall each node picks its probes for (`model.recall`).
    recall: float | None = None


# Documents in one page of a scroll.
MAX_SCROLL_LIMIT = 1000


@dataclass(frozen=True)
class CountRequest:
    filter: Any  # as the client gave it (a peer parses it again)
    predicate: Predicate | None
    allow_partial: bool
    timeout_ms: int | None


@dataclass(frozen=True)
class ScrollPosition:
    """Where a scroll goes on: in `shard`, after the document id `after` (None: from the
    shard's first document). Shards are walked in order, a shard's documents in id order."""

    uid: str  # the collection's incarnation the scroll began in
    shard: int
    after: str | None


@dataclass(frozen=True)
class ScrollRequest:
    filter: Any
    predicate: Predicate | None
    limit: int
    position: ScrollPosition | None  # None: from the start (uid not known yet)
    include_metadata: bool
    include_vector: bool
    allow_partial: bool
    timeout_ms: int | None
