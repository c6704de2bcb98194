"""The operations the cluster layer carries out, as typed requests: the HTTP layer parses and
validates a client's body into one of these (node/http/parse.py), and nothing past it sees the
body itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from aquila.cluster.model.filters import Predicate

CONSISTENCY = ("one", "quorum", "all")
MAX_ID_CHARS = 256
MAX_K = 1000


def valid_id(doc_id: Any) -> TypeGuard[str]:
    """A document id: a string of 1 to MAX_ID_CHARS characters."""
    return isinstance(doc_id, str) and 1 <= len(doc_id) <= MAX_ID_CHARS


@dataclass
class DocBatch:
    """Validated documents to upsert: ids, an n × dim float32 matrix, serialised metadata."""

    ids: list[str]
    vectors: np.ndarray  # n × dim float32
    metadata: list[bytes]  # JSON objects, serialised
    consistency: str


@dataclass(eq=False)  # by identity: the peer codec memoises its wire form per request
class SearchRequest:
    vectors: np.ndarray  # nq × dim float32
    k: int
    nprobe: int | None
    filter: Any  # as the client gave it (a peer parses it again)
    predicate: Predicate | None
    include_metadata: bool
    include_vector: bool
    allow_partial: bool
    timeout_ms: int | None
    explain: bool = False  # answer with each shard's plan (how it was searched)
