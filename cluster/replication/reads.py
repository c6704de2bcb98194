"""The read path: a get from the first replica that has the document, and a search fanned out
to one replica of every shard (`fanout`), merged (`merge`), and answered whole or partial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from aquila.cluster.clock import Clock
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.documents import Hit, hit_json
from aquila.cluster.model.errors import AquilaError, NotFound, Unavailable
from aquila.cluster.model.operations import SearchRequest
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.replication.fanout import fan_out
from aquila.cluster.replication.replica import Replicas
from aquila.cluster.state.entries import CollectionEntry


@dataclass
class ReadStats:
    """Counters of the searches this node coordinated (read by the node's /metrics)."""

    searches: int = 0
    partial: int = 0  # answered without some shards (allow_partial)
    refused: int = 0  # 503: shards missing and allow_partial false
    retried: int = 0  # shards asked again of another replica after one failed
    hedged: int = 0  # shards asked of another replica too after a slow answer


class ReadPath:
    def __init__(self, view: MemberView, replicas: Replicas, clock: Clock,
                 search_timeout_s: float = 10.0) -> None:
        self.stats = ReadStats()
        self._view = view
        self._replicas = replicas
        self._clock = clock
        self.search_timeout_s = search_timeout_s
        self._candidates: dict[str, tuple[Any, dict[int, list[str]], list[int]]] = {}

    def search_candidates(
        self, entry: CollectionEntry
    ) -> tuple[dict[int, list[str]], list[int]]:
        """Per shard, its usable replicas in preference order, and the shards with none.
        Memoised per version of the map and of the member view: it is on every search."""
        self._view.table()  # refresh the member cache if it is stale
        key = (entry.version, self._view.generation)
        hit = self._candidates.get(entry.spec.name)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        all_ = {s: self._view.ordered(reps) for s, reps in enumerate(entry.replicas)}
        candidates = {s: c for s, c in all_.items() if c}
        unreachable = [s for s, c in all_.items() if not c]
        self._candidates[entry.spec.name] = (key, candidates, unreachable)
        return candidates, unreachable

    async def get_document(
        self, entry: CollectionEntry, doc_id: str, with_vector: bool
    ) -> dict[str, Any]:
        hit = await self.get(entry, shard_of(doc_id, entry.spec.shards), doc_id)
        if hit is None:
            raise NotFound(f"document {doc_id!r} does not exist in {entry.spec.name!r}")
        out: dict[str, Any] = {"id": doc_id, "metadata": orjson.Fragment(hit.metadata or b"{}")}
        if with_vector:
            out["vector"] = np.frombuffer(hit.vector, dtype="<f4").tolist()
        return out

    async def get(self, entry: CollectionEntry, shard: int, doc_id: str) -> Hit | None:
        """From the first replica that has it: a replica that missed the write (it is
        catching up) answers "absent", and the next one is asked before saying 404."""
        errors = []
        answered = False
        for node in self._view.ordered(entry.replicas[shard]):
            try:
                hit = await self._replicas.of(node).get(entry.spec, shard, doc_id)
            except AquilaError as exc:
                if not exc.transient:
                    raise
                errors.append(str(exc))
                continue
            if hit is not None:
                return hit
            answered = True
        if answered:
            return None
        raise Unavailable(f"no live replica of shard {shard} answered: {'; '.join(errors)}")

    async def search(self, entry: CollectionEntry, req: SearchRequest) -> dict[str, Any]:
        t0 = self._clock.now()
        spec = entry.spec
        timeout_s = req.timeout_ms / 1000 if req.timeout_ms else self.search_timeout_s
        candidates, unreachable = self.search_candidates(entry)
        replicas = self._replicas
        plans: dict[int, dict[str, Any]] | None = {} if req.explain else None

        async def ask(node: str, shards: list[int], budget: float) -> list[list[Hit]]:
            if plans is None:
                return await replicas.of(node).search(spec, req, shards, budget)
            got: dict[int, dict[str, Any]] = {}
            rows = await replicas.of(node).search(spec, req, shards, budget, got)
            for s, p in got.items():  # the first answer for a shard is the one used
                plans.setdefault(s, {**p, "node": node})
            return rows

        result = await fan_out(
            candidates, ask, len(req.vectors), req.k, spec.metric != "l2", self._clock, timeout_s
        )
        missing = sorted(set(result.missing) | set(unreachable))
        stats = self.stats
        stats.searches += 1
        stats.retried += result.retried
        stats.hedged += result.hedged
        if missing and not req.allow_partial:
            stats.refused += 1
            raise Unavailable(
                f"shard(s) {missing} have no live replica that answered; "
                f"{'; '.join(result.errors) or 'no replica alive'}"
            )
        if missing:
            stats.partial += 1
        out = {
            "results": [[hit_json(h, req.include_metadata, req.include_vector) for h in row]
                        for row in result.rows],
            "partial": bool(missing),
            "missing_shards": missing,
            "took_ms": round((self._clock.now() - t0) * 1000, 3),
        }
        if plans is not None:
            out["plans"] = [plans[s] for s in sorted(plans)]
        return out
