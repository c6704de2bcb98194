"""Hinted hand-off: writes a replica missed while it was down or unreachable, kept by the
coordinator that could not deliver them and replayed when the replica is alive again. Bounded;
what does not fit (or is lost with a coordinator restart) anti-entropy repairs later."""

from __future__ import annotations

from collections import defaultdict

from aquila.cluster.model.documents import Incoming


class Hints:
    def __init__(self, max_docs: int = 200_000) -> None:
        self.max_docs = max_docs
        self._by_node: dict[str, dict[tuple[str, int], dict[str, Incoming]]] = defaultdict(dict)
        self._count = 0
        self.dropped = 0
        # Documents taken in, and handed to their replica (counted by WritePath): /metrics.
        self.added = 0
        self.replayed = 0

    def add(self, node: str, collection: str, shard: int, docs: list[Incoming]) -> None:
        held = self._by_node[node]
        bucket = held.get((collection, shard), {})
        for d in docs:
            old = bucket.get(d.id)
            if old is None:
                if self._count >= self.max_docs:
                    self.dropped += 1
                    continue
                self._count += 1
                self.added += 1
            if old is None or (d.version, d.writer) > (old.version, old.writer):
                bucket[d.id] = d
        if bucket:
            held[(collection, shard)] = bucket
        elif not held:
            del self._by_node[node]

    def take(self, node: str) -> dict[tuple[str, int], list[Incoming]]:
        """Everything held for `node`, removed from the store (re-add what fails)."""
        held = self._by_node.pop(node, {})
        out = {key: list(docs.values()) for key, docs in held.items()}
        self._count -= sum(len(v) for v in out.values())
        return out

    def pending(self, node: str | None = None) -> int:
        if node is not None:
            return sum(len(v) for v in self._by_node.get(node, {}).values())
        return self._count

    def nodes(self) -> list[str]:
        return [n for n, v in self._by_node.items() if v]
