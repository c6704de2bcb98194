"""The read path: a get from the first replica that has the document; a search fanned out to
one replica of every shard (`fanout`), merged (`merge`), and answered whole or partial (by
vectors, or by stored documents whose vectors the gets fetch); a count fanned out the same
way; and a scroll, a page at a time, shard after shard."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson

from aquila.cluster.clock import Clock
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.bounds import MAX_PAGE_METADATA
from aquila.cluster.model.cursor import encode_cursor
from aquila.cluster.model.documents import (
    RESULTS_ON_THREAD,
    Found,
    Hit,
    StaleFound,
    answer_weight,
    check_answer_metadata,
    results_json,
)
from aquila.cluster.model.errors import AquilaError, NotFound, Unavailable
from aquila.cluster.model.offload import Offload, inline
from aquila.cluster.model.operations import (
    CountRequest,
    ScrollPosition,
    ScrollRequest,
    SearchRequest,
)
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.replication.fanout import (
    FanoutResult,
    Rows,
    Single,
    fan_out,
    gather_shards,
    single_node,
)
from aquila.cluster.replication.replica import LocalReplica, Replicas
from aquila.cluster.state.entries import CollectionEntry


@dataclass
class ReadStats:
    """Counters of the searches this node coordinated (read by the node's /metrics)."""

    searches: int = 0
    partial: int = 0  # answered without some shards (allow_partial)
    refused: int = 0  # 503: shards missing and allow_partial false
    # Shards asked again of another replica after one failed (retried) or too after a slow
    # answer (hedged), by searches, counts and scrolls.
    retried: int = 0
    hedged: int = 0


class ReadPath:
    def __init__(self, view: MemberView, replicas: Replicas, clock: Clock,
                 search_timeout_s: float = 10.0) -> None:
        self.stats = ReadStats()
        self._view = view
        self._replicas = replicas
        self._clock = clock
        self.search_timeout_s = search_timeout_s
        self._candidates: dict[str, tuple[Any, dict[int, list[str]], list[int]]] = {}
        # Per collection (as `_candidates`): whether a search asks another node than this one,
        # and the one node that serves every shard when it is the only replica of each.
        self._fans_out: dict[str, bool] = {}
        self._single: dict[str, Single | None] = {}
        # Where a big answer's JSON is built (the node's parse threads; in place in process).
        self.offload: Offload = inline

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
        self._fans_out[entry.spec.name] = any(
            c[0] != self._replicas.node_id for c in candidates.values())
        self._single[entry.spec.name] = single_node(candidates)
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
        k = req.k
        if req.query_ids is not None:
            # By stored documents: their vectors are the queries; one more hit each, since
            # each document finds itself (dropped below).
            req = replace(req, vectors=await self._stored_vectors(entry, req.query_ids),
                          k=k + 1)
        candidates, unreachable = self.search_candidates(entry)
        replicas = self._replicas
        me = replicas.node_id
        # Asking peers too, this node's own part may run on the event loop when small (see
        # `Collection.search`), once the peers' requests are on their way: it overlaps their
        # work, and the hop to a search thread and back costs more than such a part. Alone, a
        # node's search goes to the search threads (they take every core).
        inline = self._fans_out.get(spec.name, False)
        # A search by recall gathers the plans too: they say which nprobe each node used.
        by_recall = req.recall is not None
        plans: dict[int, dict[str, Any]] | None = {} if req.explain or by_recall else None

        # Asking peers too, this node's own part is searched without reading its hits'
        # documents: only those that survive the merge with the peers' hits are read (about
        # a third of them on three nodes). Not with a filter (its own search path).
        local = replicas.local
        found_ok = inline and req.predicate is None and isinstance(local, LocalReplica)

        async def ask(node: str, shards: list[int], budget: float) -> Rows | Found:
            here = inline and node == me
            if here:
                await asyncio.sleep(0)  # the peers' requests leave first
            got: dict[int, dict[str, Any]] | None = None if plans is None else {}
            rows: Rows | Found
            if here and found_ok:
                assert isinstance(local, LocalReplica)
                rows = await local.search_found(spec, req, shards, budget, got, inline=True)
            else:
                rows = await replicas.of(node).search(spec, req, shards, budget, got,
                                                      inline=here)
            if plans is not None and got is not None:
                for s, p in got.items():  # the first answer for a shard is the one used
                    plans.setdefault(s, {**p, "node": node})
            return rows

        async def read(found: Found, keys: list[int]) -> list[Hit | None]:
            assert isinstance(local, LocalReplica)
            return await local.read_found(spec, found, keys, req.include_vector)

        result: FanoutResult | None = None
        if found_ok:
            try:
                result = await fan_out(
                    candidates, ask, len(req.vectors), req.k, spec.metric != "l2",
                    self._clock, timeout_s, self._single[spec.name], read)
            except StaleFound:
                # Labels given again during the search (rare: a release after a snapshot):
                # once more, this node's hits read as they are searched.
                found_ok = False
                if plans is not None:
                    plans.clear()
                # Within the search's one deadline: what the first try took is spent.
                timeout_s = max(0.0, timeout_s - (self._clock.now() - t0))
        if result is None:
            result = await fan_out(
                candidates, ask, len(req.vectors), req.k, spec.metric != "l2", self._clock,
                timeout_s, self._single[spec.name],
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
        rows = result.rows
        if req.query_ids is not None:
            rows = [[h for h in row if h.id != own][:k]
                    for own, row in zip(req.query_ids, rows, strict=True)]
        if req.include_metadata:
            check_answer_metadata(rows)
        build = functools.partial(results_json, rows, req.include_metadata,
                                  req.include_vector)
        results = (await self.offload(build) if answer_weight(rows, spec.dim, req.include_vector)
                   > RESULTS_ON_THREAD else build())
        out = {
            "results": results,
            "partial": bool(missing),
            "missing_shards": missing,
            "took_ms": round((self._clock.now() - t0) * 1000, 3),
        }
        if plans is not None and req.explain:
            out["plans"] = [plans[s] for s in sorted(plans)]
        if plans is not None and by_recall:
            out |= nprobes_used(plans)
        return out

    async def _stored_vectors(self, entry: CollectionEntry, ids: list[str]) -> np.ndarray:
        """The stored vectors of these documents, through the read path's get (404 for one
        that does not exist), a few lookups at a time."""
        spec = entry.spec
        gate = asyncio.Semaphore(_LOOKUPS_AT_ONCE)

        async def one(doc_id: str) -> bytes:
            async with gate:
                hit = await self.get(entry, shard_of(doc_id, spec.shards), doc_id)
            if hit is None:
                raise NotFound(f"document {doc_id!r} does not exist in {spec.name!r}")
            if len(hit.vector) != 4 * spec.dim:
                raise Unavailable(f"a replica answered document {doc_id!r} without its vector")
            return hit.vector

        unique = list(dict.fromkeys(ids))
        found = dict(zip(unique, await asyncio.gather(*(one(i) for i in unique)), strict=True))
        raw = b"".join(found[i] for i in ids)
        return np.frombuffer(raw, dtype="<f4").reshape(len(ids), spec.dim).astype(np.float32)

    def _count_retries(self, retried: int, hedged: int) -> None:
        """Counts and scrolls ask replicas as searches do: their retries and hedges count."""
        self.stats.retried += retried
        self.stats.hedged += hedged

    async def count(self, entry: CollectionEntry, req: CountRequest) -> dict[str, Any]:
        """Each shard counted by one of its replicas (retried, hedged and bounded in time as
        a search is); a shard with no replica that answered is listed as missing."""
        spec = entry.spec
        timeout_s = req.timeout_ms / 1000 if req.timeout_ms else self.search_timeout_s
        candidates, unreachable = self.search_candidates(entry)
        replicas = self._replicas

        async def ask(node: str, shards: list[int], budget: float) -> dict[int, int]:
            return await replicas.of(node).count(spec, req, shards, budget)

        got = await gather_shards(candidates, ask, _only, self._clock, timeout_s,
                                  self._single[spec.name])
        self._count_retries(got.retried, got.hedged)
        missing = sorted(set(got.missing) | set(unreachable))
        if missing and not req.allow_partial:
            raise Unavailable(f"shard(s) {missing} have no live replica that answered; "
                              f"{'; '.join(got.errors) or 'no replica alive'}")
        return {"count": sum(n for counts in got.answers for n in counts.values()),
                "partial": bool(missing), "missing_shards": missing}

    async def scroll(self, entry: CollectionEntry, req: ScrollRequest) -> dict[str, Any]:
        """A page of the collection: shards in order, a shard's documents in id order, from
        the request's cursor on. Each shard's page comes from one replica (retried and
        hedged as a search's shards are). A shard with no replica that answered is a 503
        (the same cursor may be tried again), or, with `allow_partial`, skipped: listed in
        `missing_shards`, and its documents are not in this scroll."""
        spec = entry.spec
        pos = req.position
        if pos is not None and pos.uid != entry.uid:
            raise NotFound(f"the cursor is of an earlier incarnation of {spec.name!r} (it was "
                           "deleted and created again): start again with a null cursor")
        shard, after = (0, None) if pos is None else (pos.shard, pos.after)
        timeout_s = req.timeout_ms / 1000 if req.timeout_ms else self.search_timeout_s
        deadline = self._clock.now() + timeout_s
        candidates, _ = self.search_candidates(entry)
        replicas = self._replicas
        docs: list[Hit] = []
        missing: list[int] = []
        visited = held = 0  # held: bytes of metadata in `docs`
        while (shard < spec.shards and len(docs) < req.limit and held < MAX_PAGE_METADATA
               and visited < SCROLL_SHARDS_PER_PAGE):
            left = deadline - self._clock.now()
            if left <= 0:
                break
            visited += 1
            ask = functools.partial(_scroll_one, replicas, spec, req, after, req.limit - len(docs))
            got = await gather_shards({shard: candidates.get(shard, [])}, ask, _same,
                                      self._clock, left)
            self._count_retries(got.retried, got.hedged)
            if not got.answers:
                if not req.allow_partial:
                    raise Unavailable(
                        f"shard {shard} has no live replica that answered; "
                        f"{'; '.join(got.errors) or 'no replica alive'}. The same cursor may "
                        "be tried again; allow_partial skips the shard")
                missing.append(shard)
                shard, after = shard + 1, None
                continue
            page, nxt = got.answers[0]
            docs.extend(page)
            held += sum(len(h.metadata) for h in page)
            if nxt is not None:
                after = nxt
                break
            shard, after = shard + 1, None
        cursor = None
        if shard < spec.shards:
            cursor = encode_cursor(spec.name, ScrollPosition(entry.uid, shard, after))

        def build() -> list[dict[str, Any]]:
            return [_doc_json(h, req.include_metadata, req.include_vector) for h in docs]

        heavy = answer_weight([docs], spec.dim, req.include_vector) > RESULTS_ON_THREAD
        return {
            "documents": await self.offload(build) if heavy else build(),
            "next_cursor": cursor,
            "partial": bool(missing),
            "missing_shards": missing,
        }


# Shards one scroll page may go through (each a request to a replica that looks at a bounded
# number of records): a filter that matches little still costs a bounded amount per page.
SCROLL_SHARDS_PER_PAGE = 8
# Lookups of query documents in flight at once (a search by up to 1,000 stored ids).
_LOOKUPS_AT_ONCE = 32


async def _scroll_one(
    replicas: Replicas, spec: CollectionSpec, req: ScrollRequest, after: str | None,
    limit: int, node: str, shards: list[int], budget: float,
) -> tuple[list[Hit], str | None]:
    return await replicas.of(node).scroll(spec, req, shards[0], after, limit, budget)


def _only(counts: dict[int, int], shards: list[int]) -> dict[int, int]:
    return {s: counts[s] for s in shards if s in counts}


def _same(page: tuple[list[Hit], str | None], shards: list[int]
          ) -> tuple[list[Hit], str | None]:
    return page  # one shard per request: never cut


def _doc_json(h: Hit, metadata: bool, vector: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": h.id}
    if metadata:
        out["metadata"] = orjson.Fragment(h.metadata or b"{}")
    if vector:
        out["vector"] = np.frombuffer(h.vector, dtype="<f4").tolist()
    return out


def nprobes_used(plans: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """What a search by recall says of its probes: per shard, the nprobe the node that
    answered for it chose, and the largest of them (one figure for the whole answer)."""
    per = [{"shard": s, "node": p.get("node", ""), "nprobe": int(p.get("nprobe", 1))}
           for s, p in sorted(plans.items())]
    return {"nprobe": max((x["nprobe"] for x in per), default=1), "nprobes": per}
