"""Typed results: one frozen dataclass per answer of the contract, built from its JSON.

Vectors come out as float32 numpy arrays (the server stores float32, so they are exact);
scores as float32 arrays, one per query. Each `from_json` checks the shape it reads, so a
reply that is not the contract's raises TransportError instead of a KeyError deep inside.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from aquila_client.errors import TransportError

Vectors = npt.NDArray[np.float32]
Metadata = dict[str, Any]


def _obj(raw: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise TransportError(f"{what}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _list(raw: Any, what: str) -> list[Any]:
    if not isinstance(raw, list):
        raise TransportError(f"{what}: expected a JSON array, got {type(raw).__name__}")
    return raw


def _get(raw: Mapping[str, Any], key: str, what: str) -> Any:
    try:
        return raw[key]
    except KeyError:
        raise TransportError(f"{what}: the reply has no {key!r}") from None


def _vector(raw: Any, what: str) -> Vectors:
    try:
        return np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError):
        raise TransportError(f"{what}: 'vector' is not a list of numbers") from None


# -- collections --------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexConfig:
    type: str
    nlist: int | None
    nprobe: int


@dataclass(frozen=True)
class ShardState:
    shard: int
    replicas: tuple[str, ...]
    count: int
    index_state: str  # "buffering" | "training" | "trained"


@dataclass(frozen=True)
class Collection:
    """A collection's description (`GET /v1/collections/{name}`)."""

    name: str
    dim: int
    metric: str
    shards: int
    replication: int
    index: IndexConfig
    count: int | None = None
    shard_states: tuple[ShardState, ...] = ()

    @classmethod
    def from_json(cls, raw: Any) -> Collection:
        d = _obj(raw, "collection")
        idx = _obj(d.get("index", {}), "collection index")
        states = tuple(
            ShardState(int(s["shard"]), tuple(s.get("replicas", ())), int(s.get("count", 0)),
                       str(s.get("index_state", "")))
            for s in (_obj(x, "shard state") for x in _list(d.get("shard_states", []), "shard_states"))
        )
        count = d.get("count")
        return cls(
            name=str(_get(d, "name", "collection")),
            dim=int(_get(d, "dim", "collection")),
            metric=str(d.get("metric", "l2")),
            shards=int(d.get("shards", len(states))),
            replication=int(d.get("replication", 1)),
            index=IndexConfig(str(idx.get("type", "")), idx.get("nlist"),
                              int(idx.get("nprobe", 0))),
            count=None if count is None else int(count),
            shard_states=states,
        )


# -- documents ----------------------------------------------------------------------------
@dataclass(frozen=True)
class UpsertResult:
    ids: list[str]
    upserted: int

    @classmethod
    def from_json(cls, raw: Any) -> UpsertResult:
        d = _obj(raw, "upsert")
        return cls([str(i) for i in _list(_get(d, "ids", "upsert"), "ids")],
                   int(_get(d, "upserted", "upsert")))


@dataclass(frozen=True)
class Document:
    """A stored document; `vector` is None unless it was asked for."""

    id: str
    metadata: Metadata | None
    vector: Vectors | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, raw: Any) -> Document:
        d = _obj(raw, "document")
        vec = d.get("vector")
        meta = d.get("metadata")
        return cls(str(_get(d, "id", "document")), meta if isinstance(meta, dict) else None,
                   None if vec is None else _vector(vec, "document"))


# -- search -------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryResult:
    """The hits of one query, best first: `ids[i]` scored `scores[i]` with `metadata[i]`.

    `scores` is squared L2 distance for "l2" (smaller is better), inner product for "ip" and
    cosine similarity for "cosine" (larger is better). `vectors` is (len(ids), dim) when the
    search included "vector", else None."""

    ids: list[str]
    scores: npt.NDArray[np.float32]
    metadata: list[Metadata | None]
    vectors: Vectors | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[str, float, Metadata | None]]:
        for i, doc_id in enumerate(self.ids):
            yield doc_id, float(self.scores[i]), self.metadata[i]

    @classmethod
    def from_json(cls, raw: Any) -> QueryResult:
        hits = [_obj(h, "hit") for h in _list(raw, "results[i]")]
        ids = [str(_get(h, "id", "hit")) for h in hits]
        scores = np.asarray([float(_get(h, "score", "hit")) for h in hits], dtype=np.float32)
        meta = [h.get("metadata") if isinstance(h.get("metadata"), dict) else None for h in hits]
        vectors = None
        if hits and all("vector" in h for h in hits):
            vectors = _vector([h["vector"] for h in hits], "hit")
        return cls(ids, scores, meta, vectors)


@dataclass(frozen=True)
class SearchResult:
    """One `QueryResult` per query, in query order (index it, or iterate over it).

    `partial` and `missing_shards`: shards that had no live replica (their documents are not in
    the answer). `nprobe`: the most probes a node used, when it says (a search by `recall`);
    `nprobes`: the probes used per shard."""

    results: list[QueryResult]
    partial: bool
    missing_shards: list[int]
    took_ms: float
    nprobe: int | None = None
    nprobes: dict[int, int] | None = None

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> QueryResult:
        return self.results[i]

    def __iter__(self) -> Iterator[QueryResult]:
        return iter(self.results)

    @property
    def ids(self) -> list[list[str]]:
        return [r.ids for r in self.results]

    @classmethod
    def from_json(cls, raw: Any) -> SearchResult:
        d = _obj(raw, "search")
        nprobe = d.get("nprobe")
        return cls(
            results=[QueryResult.from_json(r) for r in _list(_get(d, "results", "search"),
                                                              "results")],
            partial=bool(d.get("partial", False)),
            missing_shards=[int(s) for s in _list(d.get("missing_shards", []), "missing_shards")],
            took_ms=float(d.get("took_ms", 0.0)),
            nprobe=None if nprobe is None else int(nprobe),
            nprobes=None if d.get("nprobes") is None else {
                int(_obj(p, "nprobes")["shard"]): int(p["nprobe"])
                for p in _list(d["nprobes"], "nprobes")},
        )


@dataclass(frozen=True)
class CountResult:
    count: int
    partial: bool
    missing_shards: list[int]

    @classmethod
    def from_json(cls, raw: Any) -> CountResult:
        d = _obj(raw, "count")
        return cls(int(_get(d, "count", "count")), bool(d.get("partial", False)),
                   [int(s) for s in _list(d.get("missing_shards", []), "missing_shards")])


@dataclass(frozen=True)
class ScrollPage:
    """One page of a scroll; pass `next_cursor` back for the next one (None: the end)."""

    documents: list[Document]
    next_cursor: str | None

    @classmethod
    def from_json(cls, raw: Any) -> ScrollPage:
        d = _obj(raw, "scroll")
        cursor = d.get("next_cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise TransportError("scroll: 'next_cursor' is not a string or null")
        return cls([Document.from_json(x) for x in _list(_get(d, "documents", "scroll"),
                                                          "documents")], cursor)


# -- cluster ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    id: str
    addr: str
    state: str  # "alive" | "suspect" | "dead" | "left"
    incarnation: int


@dataclass(frozen=True)
class ClusterInfo:
    """`GET /v1/cluster` of the node that answered (`node_id`, `node_addr`)."""

    node_id: str
    node_addr: str
    epoch: int
    members: list[Member]

    @classmethod
    def from_json(cls, raw: Any) -> ClusterInfo:
        d = _obj(raw, "cluster")
        me = _obj(_get(d, "node", "cluster"), "cluster node")
        members = [_obj(m, "member") for m in _list(_get(d, "members", "cluster"), "members")]
        return cls(str(me.get("id")), str(me.get("addr")), int(d.get("epoch", 0)),
                   [Member(str(m["id"]), str(m.get("addr", "")), str(m.get("state", "")),
                           int(m.get("incarnation", 0))) for m in members])


@dataclass(frozen=True)
class ShardMove:
    """A shard replica moving between nodes; `progress` 0..1 while it runs."""

    from_node: str
    to_node: str
    progress: float | None = None


@dataclass(frozen=True)
class ShardPlacement:
    shard: int
    replicas: tuple[str, ...]
    moving: ShardMove | None


@dataclass(frozen=True)
class ShardMap:
    """`GET /v1/cluster/shards`: where every shard of every collection lives."""

    epoch: int
    collections: dict[str, list[ShardPlacement]]

    @classmethod
    def from_json(cls, raw: Any) -> ShardMap:
        d = _obj(raw, "shards")
        out: dict[str, list[ShardPlacement]] = {}
        for name, rows in _obj(_get(d, "collections", "shards"), "collections").items():
            placements = []
            for r in (_obj(x, "shard") for x in _list(rows, name)):
                mv = r.get("moving")
                move = None
                if isinstance(mv, dict):
                    progress = mv.get("progress")
                    move = ShardMove(str(mv.get("from")), str(mv.get("to")),
                                     None if progress is None else float(progress))
                placements.append(ShardPlacement(int(r["shard"]), tuple(r.get("replicas", ())),
                                                 move))
            out[str(name)] = placements
        return cls(int(d.get("epoch", 0)), out)


@dataclass(frozen=True)
class PlannedMove:
    collection: str
    shard: int
    from_node: str
    to_node: str


def _moves(raw: Any) -> list[PlannedMove]:
    return [PlannedMove(str(m["collection"]), int(m["shard"]), str(m["from"]), str(m["to"]))
            for m in (_obj(x, "move") for x in _list(raw, "moves"))]


@dataclass(frozen=True)
class RebalanceResult:
    """The moves a rebalance planned (and, unless dry_run, started)."""

    moves: list[PlannedMove]

    @classmethod
    def from_json(cls, raw: Any) -> RebalanceResult:
        return cls(_moves(_get(_obj(raw, "rebalance"), "moves", "rebalance")))


@dataclass(frozen=True)
class LeaveResult:
    moves: list[PlannedMove]
    left: bool

    @classmethod
    def from_json(cls, raw: Any) -> LeaveResult:
        d = _obj(raw, "leave")
        return cls(_moves(d.get("moves", [])), bool(d.get("left", True)))


@dataclass(frozen=True)
class JoinResult:
    """`joined`: how many seeds answered; `members`: members the node knows after joining."""

    joined: int
    members: int

    @classmethod
    def from_json(cls, raw: Any) -> JoinResult:
        d = _obj(raw, "join")
        return cls(int(d.get("joined", 0)), int(d.get("members", 0)))


def collections_from_json(raw: Any) -> list[Collection]:
    return [Collection.from_json(c)
            for c in _list(_get(_obj(raw, "collections"), "collections", "list"), "collections")]


def as_str_list(values: Sequence[Any], what: str) -> list[str]:
    """Ids as a list of str; a non-str is a mistake the caller should hear about."""
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(v).__name__}")
    return out
