"""Cluster state: the collections and their shard maps, versioned and merged by epoch.

Each collection is a last-writer-wins register: a change takes epoch = (highest epoch this
node has seen) + 1, and two entries are ordered by (epoch, origin node id), so concurrent
changes from different nodes resolve the same way everywhere and every node converges to the
same map whatever order the updates arrive in. Deletes are kept as tombstones so an old
entry gossiped late cannot resurrect the collection.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from aquila.cluster.model.bounds import (
    MAX_EPOCH,
    MAX_NODE_ID_CHARS,
    MAX_REPLICAS_PER_SHARD,
    MAX_UID_CHARS,
    BoundsError,
    checked_int,
    checked_list,
    checked_str,
)
from aquila.cluster.model.errors import BadRequest, NotFound, Unavailable
from aquila.cluster.model.spec import CollectionSpec, check_name


@dataclass(frozen=True)
class Moving:
    """The map's mark on a shard whose replica is on its way from one node to another
    (rebalance, leave, self-healing); the move itself is a `rebalance_plan.Move`."""

    from_node: str | None
    to_node: str
    progress: float = 0.0
    driver: str = ""  # the node carrying the move out (a move nobody drives is cleared)

    def to_json(self) -> dict[str, Any]:
        return {**self.public(), "driver": self.driver}

    def public(self) -> dict[str, Any]:
        """As GET /v1/cluster/shards shows it."""
        return {"from": self.from_node, "to": self.to_node, "progress": round(self.progress, 4)}


@dataclass(frozen=True)
class CollectionEntry:
    spec: CollectionSpec
    replicas: tuple[tuple[str, ...], ...]  # per shard, the nodes holding it (first = preferred)
    epoch: int
    origin: str  # node that made this version
    deleted: bool = False
    moving: tuple[Moving | None, ...] = ()
    # Identity of this incarnation of the collection: a collection deleted and created again
    # under the same name (even with the same settings) must not find the old one's data.
    uid: str = ""

    @functools.cached_property
    def version(self) -> tuple[int, str, str]:
        """Order of versions: epoch, then origin node; then a digest of the content, so that
        even two different entries under one (epoch, origin) — a node restarted before its
        state reached the disk — resolve the same way on every node."""
        digest = hashlib.blake2b(orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS),
                                 digest_size=8).hexdigest()
        return (self.epoch, self.origin, digest)

    def move_of(self, shard: int) -> Moving | None:
        return self.moving[shard] if shard < len(self.moving) else None

    def shards_of(self, node: str) -> list[int]:
        """Shards this node holds, or is receiving in a move (it must accept their writes)."""
        out = []
        for s, reps in enumerate(self.replicas):
            mv = self.move_of(s)
            if node in reps or (mv is not None and mv.to_node == node):
                out.append(s)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "replicas": [list(r) for r in self.replicas],
            "epoch": self.epoch,
            "origin": self.origin,
            "deleted": self.deleted,
            "moving": [m.to_json() if m else None for m in self.moving],
            "uid": self.uid,
        }

    def check_routable(self) -> CollectionEntry:
        """This entry, if its map can be routed by: a live collection lists the nodes of each
        of its shards (reads, writes and placement index the map by shard). BoundsError
        otherwise; said of entries from peers, whose map this node would adopt."""
        if not self.deleted and (len(self.replicas) != self.spec.shards
                                 or not all(self.replicas)):
            raise BoundsError(
                f"the map of {self.spec.name!r} must list the nodes of each of its "
                f"{self.spec.shards} shards"
            )
        return self

    @staticmethod
    def from_json(d: Any) -> CollectionEntry:
        """An entry as `to_json` wrote it. Entries arrive from peers (gossip, push-pull, state
        pushes): every field is checked, the spec as a PUT body is, and a BoundsError (a
        ValueError) says what is wrong."""
        if not isinstance(d, dict):
            raise BoundsError("a cluster-state entry is an object")
        try:
            spec = CollectionSpec.from_json(d.get("spec"))
        except BadRequest as exc:
            raise BoundsError(exc.message) from None
        replicas = tuple(
            tuple(_node_id(n) for n in checked_list(r, MAX_REPLICAS_PER_SHARD, "replicas"))
            for r in checked_list(d.get("replicas"), spec.shards, "replicas")
        )
        deleted = d.get("deleted", False)
        if not isinstance(deleted, bool):
            raise BoundsError("'deleted' must be a boolean")
        return CollectionEntry(
            spec,
            replicas,
            checked_int(d.get("epoch"), 0, MAX_EPOCH, "epoch"),
            _node_id(d.get("origin")),
            deleted,
            tuple(_move(m) for m in checked_list(d.get("moving", []), spec.shards, "moving")),
            checked_str(d.get("uid", ""), MAX_UID_CHARS, "uid"),
        )


def _node_id(v: Any) -> str:
    return checked_str(v, MAX_NODE_ID_CHARS, "node id", min_chars=1)


def _move(m: Any) -> Moving | None:
    if m is None:
        return None
    if not isinstance(m, dict):
        raise BoundsError("a move is an object or null")
    progress = m.get("progress", 0.0)
    if isinstance(progress, bool) or not isinstance(progress, int | float) \
            or not 0.0 <= progress <= 1.0:
        raise BoundsError("a move's progress is a number from 0 to 1")
    return Moving(
        None if m.get("from") is None else _node_id(m.get("from")),
        _node_id(m.get("to")),
        float(progress),
        checked_str(m.get("driver", ""), MAX_NODE_ID_CHARS, "driver"),
    )


@dataclass
class ClusterState:
    collections: dict[str, CollectionEntry] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        return max((e.epoch for e in self.collections.values()), default=0)

    def live(self) -> dict[str, CollectionEntry]:
        return {n: e for n, e in sorted(self.collections.items()) if not e.deleted}

    def get(self, name: str) -> CollectionEntry | None:
        e = self.collections.get(name)
        return None if e is None or e.deleted else e

    def entry(self, name: str) -> CollectionEntry:
        """The live entry of `name`: BadRequest for an invalid name, NotFound if none."""
        e = self.get(check_name(name))
        if e is None:
            raise NotFound(f"collection {name!r} does not exist")
        return e

    def entry_for_write(
        self, name: str, expect_uid: str | None = None, expect_spec: CollectionSpec | None = None
    ) -> CollectionEntry:
        """The entry a write to collection `name` applies to: this node's own map decides
        its settings and incarnation, never the sender. A sender that believes in another
        incarnation (a coordinator that missed a delete-and-recreate, a replayed request) or
        names a collection this map does not know (yet) gets a transient error and changes
        nothing; the coordinator hands the write off and retries once the maps agree."""
        entry = self.get(name)
        if entry is None:
            raise Unavailable(f"collection {name!r} is not in this node's cluster map (yet)")
        if (expect_uid is not None and expect_uid != entry.uid) or (
            expect_spec is not None and expect_spec != entry.spec
        ):
            raise Unavailable(
                f"the write is for another incarnation of {name!r} than this node's map has "
                f"(epoch {entry.epoch}); the maps have not converged yet"
            )
        return entry

    def merge(self, entries: Iterable[CollectionEntry]) -> list[CollectionEntry]:
        """Keep the newer of ours and theirs per collection; returns the entries that won."""
        changed = []
        for e in entries:
            mine = self.collections.get(e.spec.name)
            if mine is None or e.version > mine.version:
                self.collections[e.spec.name] = e
                changed.append(e)
        return changed

    def next_entry(self, entry: CollectionEntry, origin: str, **changes: Any) -> CollectionEntry:
        """A new version of `entry` made by `origin`, ordered after everything seen so far."""
        if self.epoch >= MAX_EPOCH:  # unreachable by counting; refused rather than wrapped
            raise BoundsError(f"the cluster-state epoch has reached its maximum {MAX_EPOCH}")
        return replace(entry, epoch=self.epoch + 1, origin=origin, **changes)

    def encode(self) -> bytes:
        return orjson.dumps([e.to_json() for e in self.collections.values()])

    @staticmethod
    def decode_entries(raw: bytes) -> list[CollectionEntry]:
        """Entries from a peer (ValueError when any is malformed or out of bounds)."""
        entries = orjson.loads(raw)
        if not isinstance(entries, list):
            raise BoundsError("cluster state is a list of entries")
        return [CollectionEntry.from_json(d).check_routable() for d in entries]
