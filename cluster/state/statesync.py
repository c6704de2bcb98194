"""The cluster-state part of a gossip push-pull, incremental: versions first, entries after.

Sending the whole state both ways every push-pull costs, with 100 collections of 64 shards at
replication 3, about half a megabyte per exchange (see CAPACITY.md); almost all of it is
what the other side already has. So a push-pull carries:

- request (the side that starts it): a digest, one (name, epoch, origin, content hash) row
  per entry, about 60 bytes each, plus the entries that changed here recently (pushed to a
  few peers, like a rumour);
- reply: the entries the requester's digest shows it lacks or holds older, and the
  replier's own digest, from which the requester learns what the replier lacks and pushes
  those in its next requests.

A node of the previous version sends and expects the whole state as a JSON list of entries;
it still gets one (see `StateDelegate`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from aquila.cluster.model.bounds import (
    MAX_EPOCH,
    MAX_NODE_ID_CHARS,
    BoundsError,
    checked_int,
    checked_list,
    checked_str,
)
from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.spec import check_name
from aquila.cluster.state.entries import ClusterState, CollectionEntry

FORMAT = 2
REQUEST, REPLY = "request", "reply"

Version = tuple[int, str, str]

# Rows of a digest, and entries of one message, a peer may send: far more collections than a
# cluster holds (each entry's shards are bounded on their own), few enough that checking them
# stays cheap.
MAX_SYNC_ROWS = 100_000
# The content hash of `CollectionEntry.version`: blake2b, 8 bytes, as hex.
HASH_CHARS = 16


@dataclass(frozen=True)
class Sync:
    kind: str  # REQUEST or REPLY
    digest: dict[str, Version]
    entries: list[CollectionEntry]


def digest_rows(state: ClusterState) -> list[list[Any]]:
    return [[name, *e.version] for name, e in state.collections.items()]


def newer_than(state: ClusterState, digest: dict[str, Version]) -> list[CollectionEntry]:
    """Our entries that the holder of `digest` lacks or holds an older version of."""
    out = []
    for name, e in state.collections.items():
        theirs = digest.get(name)
        if theirs is None or theirs < e.version:
            out.append(e)
    return out


def encode_sync(kind: str, state: ClusterState, entries: Iterable[CollectionEntry]) -> bytes:
    return orjson.dumps({
        "format": FORMAT,
        "kind": kind,
        "digest": digest_rows(state),
        "entries": [e.to_json() for e in entries],
    })


def decode_sync(data: bytes) -> Sync | list[CollectionEntry]:
    """A push-pull state: `Sync`, or the previous version's full list of entries.

    It comes from a peer, so every part is checked as `ClusterState.decode_entries` checks
    entries: names, epochs, origins and hashes of the digest too. Raises ValueError
    (BoundsError) for anything else.
    """
    obj = orjson.loads(data)
    if isinstance(obj, list):
        return _entries(obj)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise BoundsError("not a cluster-state sync message")
    kind = obj.get("kind")
    if kind not in (REQUEST, REPLY):
        raise BoundsError(f"unknown sync kind {str(kind)[:40]!r}")
    rows = checked_list(obj.get("digest"), MAX_SYNC_ROWS, "sync digest")
    digest: dict[str, Version] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4):
            raise BoundsError("a digest row is [name, epoch, origin, hash]")
        try:
            name = check_name(row[0])
        except BadRequest as exc:
            raise BoundsError(exc.message) from None
        digest[name] = (
            checked_int(row[1], 0, MAX_EPOCH, "digest epoch"),
            checked_str(row[2], MAX_NODE_ID_CHARS, "digest origin", min_chars=1),
            checked_str(row[3], HASH_CHARS, "digest hash"),
        )
    return Sync(kind, digest, _entries(obj.get("entries")))


def _entries(raw: Any) -> list[CollectionEntry]:
    """Entries from a peer, checked as `ClusterState.decode_entries` checks them."""
    return [CollectionEntry.from_json(d).check_routable()
            for d in checked_list(raw, MAX_SYNC_ROWS, "sync entries")]
