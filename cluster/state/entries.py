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

from aquila.cluster.model.errors import NotFound
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

    @staticmethod
    def from_json(d: dict[str, Any]) -> CollectionEntry:
        moving = tuple(
            Moving(m["from"], m["to"], float(m.get("progress", 0.0)), str(m.get("driver", "")))
            if m else None
            for m in d.get("moving", [])
        )
        return CollectionEntry(
            CollectionSpec.from_json(d["spec"]),
            tuple(tuple(r) for r in d["replicas"]),
            int(d["epoch"]),
            str(d["origin"]),
            bool(d.get("deleted", False)),
            moving,
            str(d.get("uid", "")),
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
        return replace(entry, epoch=self.epoch + 1, origin=origin, **changes)

    def encode(self) -> bytes:
        return orjson.dumps([e.to_json() for e in self.collections.values()])

    @staticmethod
    def decode_entries(raw: bytes) -> list[CollectionEntry]:
        return [CollectionEntry.from_json(d) for d in orjson.loads(raw)]
