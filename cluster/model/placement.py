"""Pure placement of a new collection: shards × replication → nodes.

A shard map is `list[list[str]]`: index = shard number, value = the nodes holding a replica of
it, the first being the preferred replica (primary). `place` is used once, when a collection is
created; after that the map only changes through `cluster.movement.plan`, which moves as little
as it can when nodes come and go.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

ShardMap = list[list[str]]


def place(shards: int, replication: int, nodes: Sequence[str], *, salt: str = "") -> ShardMap:
    """Spread `shards` × min(`replication`, len(nodes)) replicas over `nodes`.

    The replicas are laid round the ring of sorted nodes one after the other, shard by shard, so
    the replicas of a shard are consecutive (hence distinct) nodes and the per-node counts differ
    by at most one. `salt` (the collection name) picks where on the ring to start, so that many
    one-shard collections do not all land on the first node. Then each shard's primary is chosen
    among its replicas so that primaries are spread evenly too. The order of `nodes` does not
    matter; duplicates are ignored.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if replication < 1:
        raise ValueError(f"replication must be at least 1, got {replication}")
    ring = sorted(set(nodes))
    if not ring:
        raise ValueError("cannot place shards on no nodes")
    n = len(ring)
    per_shard = min(replication, n)
    start = _ring_offset(salt, n)
    blocks = [[(start + s * per_shard + j) % n for j in range(per_shard)] for s in range(shards)]
    return [[ring[i] for i in block] for block in _with_spread_primaries(blocks, n)]


def replica_counts(maps: Iterable[ShardMap]) -> dict[str, int]:
    """How many replicas each node holds over all the given shard maps (absent = none)."""
    counts: dict[str, int] = {}
    for shard_map in maps:
        for replicas in shard_map:
            for node in replicas:
                counts[node] = counts.get(node, 0) + 1
    return counts


def primary_counts(maps: Iterable[ShardMap]) -> dict[str, int]:
    """How many shards each node is the primary (first replica) of."""
    counts: dict[str, int] = {}
    for shard_map in maps:
        for replicas in shard_map:
            if replicas:
                counts[replicas[0]] = counts.get(replicas[0], 0) + 1
    return counts


def _ring_offset(salt: str, n: int) -> int:
    # BLAKE2b, not hash(): the offset must be the same in every process and Python version.
    digest = hashlib.blake2b(salt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def _with_spread_primaries(blocks: list[list[int]], n: int) -> list[list[int]]:
    """Rotate each block so that every node is primary of ⌊S/n⌋ or ⌈S/n⌉ shards.

    Greedy, shard by shard: the replica with the fewest primaries so far, ties to the earliest
    in the block (so with nothing to even out, the block keeps its ring order). Because blocks
    are consecutive runs of the ring, this stays within one; the tests check it exhaustively
    for small rings and by property for the rest.
    """
    primaries = [0] * n
    out: list[list[int]] = []
    for block in blocks:
        i = min(range(len(block)), key=lambda j: (primaries[block[j]], j))
        primaries[block[i]] += 1
        out.append(block[i:] + block[:i])
    return out
