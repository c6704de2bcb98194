"""The public operations, coordinated by whichever node receives the request: collections in
the cluster state, writes routed to the shards' replicas and acknowledged per consistency,
gets from a live replica, searches fanned out and merged. A one-node cluster is the same code
with every shard local."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import numpy as np
import orjson

from cluster.backend import ShardBackend
from cluster.bounds import MAX_COUNT, BoundsError, checked_int
from cluster.clock import Clock
from cluster.docs import Hit, Incoming, decode_hits, encode_writes, hit_json
from cluster.errors import AlreadyExists, AquilaError, BadRequest, NotFound, Unavailable
from cluster.fanout import fan_out
from cluster.hints import Hints
from cluster.hlc import HybridClock
from cluster.membership import Member, State
from cluster.peers import Peers
from cluster.placement import place
from cluster.requests import DocBatch, check_id, parse_documents, parse_ids, parse_search
from cluster.runtime import ClusterRuntime
from cluster.sharding import shard_of
from cluster.spec import MAX_SHARDS, CollectionSpec, check_name
from cluster.state import CollectionEntry

log = logging.getLogger(__name__)


class MemberView(Protocol):
    def members(self) -> list[Member]: ...


Offload = Callable[..., Awaitable[Any]]


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def needed_acks(consistency: str, replicas: int) -> int:
    if consistency == "one":
        return 1
    if consistency == "all":
        return replicas
    return replicas // 2 + 1


INDEX_STATES = ("buffering", "training", "trained")


def peer_stats(raw: Any) -> dict[int, dict[str, Any]]:
    """A peer's per-shard stats, checked (BoundsError otherwise): they reach the client."""
    if not isinstance(raw, dict):
        raise BoundsError("shard stats are an object")
    out: dict[int, dict[str, Any]] = {}
    for s, v in raw.items():
        shard = checked_int(int(s), 0, MAX_SHARDS - 1, "shard")
        if not isinstance(v, dict) or v.get("index_state") not in INDEX_STATES:
            raise BoundsError("a shard's stats name its index_state")
        out[shard] = {**v, "count": checked_int(v.get("count"), 0, MAX_COUNT, "count")}
    return out


class Coordinator:
    def __init__(
        self,
        node_id: str,
        runtime: ClusterRuntime,
        backend: ShardBackend,
        peers: Peers,
        members: MemberView,
        clock: Clock,
        *,
        search_timeout_s: float = 10.0,
        peer_timeout_s: float = 10.0,
    ) -> None:
        self.node_id = node_id
        self.runtime = runtime
        self.backend = backend
        self.peers = peers
        self.view = members
        self.clock = clock
        self.hlc = HybridClock()
        self.search_timeout_s = search_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self._background: set[asyncio.Task[Any]] = set()
        self.hints = Hints()
        # Runs blocking work (validating a big batch) off the event loop; node/ wires its
        # thread boundary in, plain calls by default.
        self.offload: Offload = _call
        self._members_cache: dict[str, Member] = {}
        self._candidates: dict[str, tuple[Any, dict[int, list[str]], list[int]]] = {}
        self._members_at = float("-inf")

    # -- membership helpers ---------------------------------------------------------------
    def _members(self) -> dict[str, Member]:
        """The member table, at most 50 ms old: the hot paths look it up per shard, and a
        replica found dead a moment late costs only a retry on the next one."""
        now = self.clock.now()
        if now - self._members_at > 0.05:
            self._members_cache = {m.id: m for m in self.view.members()}
            self._members_at = now
        return self._members_cache

    def addr_of(self, node: str) -> str | None:
        m = self._members().get(node)
        if m is None:  # perhaps newer than the cache: look again
            self._members_at = float("-inf")
            m = self._members().get(node)
        return m.addr if m is not None else None

    async def ask_peer(
        self, node: str, method: str, name: str, path: str, body: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109 - handed to the HTTP client
    ) -> Any:
        """A peer's internal route for collection `name` (`/internal/v1/collections/{name}/
        {path}`); Unavailable when the node is not (or no longer) a member."""
        addr = self.addr_of(node)
        if addr is None:
            raise Unavailable(f"node {node} is unknown")
        return await self.peers.request(
            addr, method, f"/internal/v1/collections/{name}/{path}", body, to=node,
            timeout=self.peer_timeout_s if timeout is None else timeout,
        )

    def live_nodes(self) -> list[str]:
        return sorted(m.id for m in self.view.members() if m.state == State.ALIVE)

    def ordered_replicas(self, replicas: Iterable[str]) -> list[str]:
        """Usable replicas, best first: this node, then alive, then suspect; dead never."""
        members = self._members()
        rank = {State.ALIVE: 1, State.SUSPECT: 2}
        usable = []
        for i, node in enumerate(replicas):
            if node == self.node_id:
                usable.append((0, i, node))
                continue
            m = members.get(node)
            if m is not None and m.state in rank:
                usable.append((rank[m.state], i, node))
        return [n for _, _, n in sorted(usable)]

    def search_candidates(
        self, entry: CollectionEntry
    ) -> tuple[dict[int, list[str]], list[int]]:
        """Per shard, its usable replicas in preference order, and the shards with none.
        Memoised per version of the map and of the member cache: it is on every search."""
        self._members()  # refresh the member cache if it is stale
        key = (entry.version, self._members_at)
        hit = self._candidates.get(entry.spec.name)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        all_ = {s: self.ordered_replicas(reps) for s, reps in enumerate(entry.replicas)}
        candidates = {s: c for s, c in all_.items() if c}
        unreachable = [s for s, c in all_.items() if not c]
        self._candidates[entry.spec.name] = (key, candidates, unreachable)
        return candidates, unreachable

    def entry(self, name: str) -> CollectionEntry:
        e = self.runtime.state.get(check_name(name))
        if e is None:
            raise NotFound(f"collection {name!r} does not exist")
        return e

    # -- collections ----------------------------------------------------------------------
    async def create_collection(self, spec: CollectionSpec) -> tuple[dict[str, Any], bool]:
        existing = self.runtime.state.get(spec.name)
        if existing is not None:
            if existing.spec != spec:
                raise AlreadyExists(f"collection {spec.name!r} exists with other settings")
            return await self.describe(existing), False
        nodes = self.live_nodes() or [self.node_id]
        replicas = place(spec.shards, spec.replication, nodes, salt=spec.name)
        entry = self.runtime.state.next_entry(
            CollectionEntry(spec, (), 0, self.node_id, uid=uuid.uuid4().hex),
            self.node_id,
            replicas=tuple(tuple(r) for r in replicas),
            moving=tuple(None for _ in replicas),
        )
        self.runtime.publish(entry)
        await self.push_entry(entry)
        await self.runtime.wait_reconciled(60)
        return await self.describe(entry), True

    async def push_entry(self, entry: CollectionEntry, *, require_all: bool = False) -> None:
        """Send a state change straight to every live member, so that it is there before the
        client's next request reaches them (gossip and push-pull repair anything missed).

        With `require_all`, retry until every alive member has acknowledged it, or raise."""
        body = [entry.to_json()]
        for attempt in range(5 if require_all else 1):
            targets = [m for m in self.view.members()
                       if m.id != self.node_id and m.state in (State.ALIVE, State.SUSPECT)]
            results = await asyncio.gather(
                *(self.peers.request(m.addr, "POST", "/internal/v1/state", body, to=m.id,
                                     timeout=5)
                  for m in targets),
                return_exceptions=True,
            )
            failed = [m.id for m, r in zip(targets, results, strict=True)
                      if isinstance(r, BaseException) and m.state == State.ALIVE]
            if not failed or not require_all:
                return
            await self.clock.sleep(0.2 * (attempt + 1))
        raise Unavailable(f"node(s) {failed} did not acknowledge the new shard map")

    async def node_stats(
        self, node: str, name: str, timeout: float | None = None  # noqa: ASYNC109
    ) -> dict[int, dict[str, Any]]:
        """Per local shard of `node`: {"count", "index_state"}."""
        if node == self.node_id:
            return self.backend.shard_stats(name)
        raw = await self.ask_peer(node, "GET", name, "stats", timeout=timeout)
        return peer_stats(raw)

    def owns(self, name: str, shard: int) -> bool:
        """Does the map give this node the shard (as a replica or a move's target)?"""
        entry = self.runtime.state.get(name)
        return entry is not None and shard in entry.shards_of(self.node_id)

    async def drop_local_shard(self, name: str, shard: int) -> None:
        if self.owns(name, shard):
            raise Unavailable(f"shard {shard} of {name!r} is still assigned to this node")
        await self.backend.drop_shard(name, shard)

    async def drop_remote_shard(self, node: str, name: str, shard: int) -> None:
        if node == self.node_id:
            await self.drop_local_shard(name, shard)
            return
        if self.addr_of(node) is None:
            return  # gone: its copy goes with it, or is dropped as an orphan if it returns
        await self.ask_peer(node, "POST", name, "drop_shard", {"shard": shard})

    async def list_collections(self) -> list[dict[str, Any]]:
        # Concurrently: each asks the replicas for counts, and a paused one costs a timeout.
        entries = list(self.runtime.state.live().values())
        return list(await asyncio.gather(*(self.describe(e) for e in entries)))

    async def get_collection(self, name: str) -> dict[str, Any]:
        return await self.describe(self.entry(name))

    async def describe(self, entry: CollectionEntry) -> dict[str, Any]:
        stats = await self.shard_stats(entry)
        shard_states = []
        for s, reps in enumerate(entry.replicas):
            st = stats.get(s, {})
            shard_states.append({
                "shard": s,
                "replicas": list(reps),
                "count": int(st.get("count", 0)),
                "index_state": st.get("index_state", "buffering"),
            })
        return {
            **entry.spec.to_json(),
            "count": sum(x["count"] for x in shard_states),
            "shard_states": shard_states,
        }

    async def shard_stats(self, entry: CollectionEntry) -> dict[int, dict[str, Any]]:
        """Per shard, the stats of its best reachable replica."""
        name = entry.spec.name
        nodes = sorted({n for reps in entry.replicas for n in self.ordered_replicas(reps)})
        answers = await asyncio.gather(
            *(self.node_stats(n, name, timeout=2) for n in nodes), return_exceptions=True
        )
        by_node = {n: a for n, a in zip(nodes, answers, strict=True) if isinstance(a, dict)}
        out: dict[int, dict[str, Any]] = {}
        for s, reps in enumerate(entry.replicas):
            for node in self.ordered_replicas(reps):
                if s in by_node.get(node, {}):
                    out[s] = by_node[node][s]
                    break
        return out

    async def delete_collection(self, name: str) -> None:
        entry = self.entry(name)
        tomb = self.runtime.state.next_entry(entry, self.node_id, deleted=True)
        self.runtime.publish(tomb)
        await self.push_entry(tomb)
        await self.runtime.wait_reconciled(60)

    # -- writes ---------------------------------------------------------------------------
    async def upsert(self, name: str, body: Any) -> dict[str, Any]:
        entry = self.entry(name)
        docs = body.get("documents") if isinstance(body, dict) else None
        if isinstance(docs, list) and len(docs) > 2000:  # big batches are checked off the loop
            batch = await self.offload(parse_documents, body, entry.spec.dim)
        else:
            batch = parse_documents(body, entry.spec.dim)
        return await self.upsert_batch(entry, batch)

    async def upsert_batch(self, entry: CollectionEntry, batch: DocBatch) -> dict[str, Any]:
        """Version and route a validated batch (see `upsert`, and the API's fast path)."""
        by_shard: dict[int, list[Incoming]] = defaultdict(list)
        for doc_id, vec, meta in zip(batch.ids, batch.vectors, batch.metadata, strict=True):
            by_shard[shard_of(doc_id, entry.spec.shards)].append(
                Incoming(doc_id, vec, meta, self.hlc.next(), self.node_id)
            )
        await self.route_writes(entry, dict(by_shard), batch.consistency)
        return {"ids": batch.ids, "upserted": len(batch.ids)}

    async def delete_documents(self, name: str, body: Any) -> int:
        entry = self.entry(name)
        return await self._delete(entry, parse_ids(body), body.get("consistency", "quorum"))

    async def delete_document(self, name: str, doc_id: str) -> None:
        entry = self.entry(name)
        if await self._delete(entry, [check_id(doc_id)], "quorum") == 0:
            raise NotFound(f"document {doc_id!r} does not exist in {name!r}")

    async def _delete(self, entry: CollectionEntry, ids: list[str], consistency: str) -> int:
        if consistency not in ("one", "quorum", "all"):
            raise BadRequest("'consistency' must be one of one, quorum, all")
        by_shard: dict[int, list[Incoming]] = defaultdict(list)
        for doc_id in ids:
            by_shard[shard_of(doc_id, entry.spec.shards)].append(
                Incoming(doc_id, None, b"", self.hlc.next(), self.node_id)
            )
        results = await self.route_writes(entry, dict(by_shard), consistency)
        return sum(deleted for _, deleted in results.values())

    def write_targets(self, entry: CollectionEntry, shard: int) -> list[str]:
        """Every replica that should receive a write of this shard, a move's target too."""
        nodes = list(entry.replicas[shard])
        mv = entry.move_of(shard)
        if mv is not None and mv.to_node not in nodes:
            nodes.append(mv.to_node)
        return nodes

    async def route_writes(
        self, entry: CollectionEntry, by_shard: dict[int, list[Incoming]], consistency: str
    ) -> dict[int, tuple[int, int]]:
        """Send each node one request with its shards' documents; return once every shard
        has the acknowledgements the consistency asks for, else 503."""
        need: dict[int, int] = {}
        per_node: dict[str, dict[int, list[Incoming]]] = defaultdict(dict)
        for shard, docs in by_shard.items():
            replicas = entry.replicas[shard]
            need[shard] = needed_acks(consistency, len(replicas))
            usable = self.ordered_replicas(self.write_targets(entry, shard))
            if sum(1 for n in usable if n in replicas) < need[shard]:
                raise Unavailable(
                    f"shard {shard} has {len(usable)} live replica(s) of {len(replicas)}; "
                    f"consistency {consistency!r} needs {need[shard]}"
                )
            for node in usable:
                per_node[node][shard] = docs
        # Only now that no shard refuses the write: a refused write leaves nothing behind.
        for shard, docs in by_shard.items():
            reached = {n for n, shards in per_node.items() if shard in shards}
            for node in set(self.write_targets(entry, shard)) - reached:
                self.hints.add(node, entry.spec.name, shard, docs)
        acks: dict[int, int] = defaultdict(int)
        results: dict[int, tuple[int, int]] = {}
        tasks = {
            asyncio.ensure_future(self.write_to_node(node, entry, shards)): node
            for node, shards in per_node.items()
        }
        errors: list[str] = []
        pending = set(tasks)
        try:
            while pending and any(acks[s] < need[s] for s in need):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    node = tasks[t]
                    if t.exception() is not None:
                        exc = t.exception()
                        if isinstance(exc, AquilaError) and not exc.transient:
                            raise exc
                        errors.append(f"{node}: {exc}")
                        self._hint_all(node, entry, per_node[node])
                        continue
                    for shard, (applied, deleted) in t.result().items():
                        if shard in need and node in entry.replicas[shard]:
                            acks[shard] += 1
                            prev = results.get(shard, (0, 0))
                            results[shard] = (max(prev[0], applied), max(prev[1], deleted))
        finally:
            for t in pending:  # slower replicas finish in the background
                self._background.add(t)
                t.add_done_callback(self._background.discard)
                t.add_done_callback(
                    functools.partial(self._hint_on_failure, tasks[t], entry, per_node[tasks[t]])
                )
        short = [s for s in need if acks[s] < need[s]]
        if short:
            raise Unavailable(
                f"shard(s) {short} did not reach consistency {consistency!r}: {'; '.join(errors)}"
            )
        return results

    def _hint_on_failure(
        self,
        node: str,
        entry: CollectionEntry,
        by_shard: dict[int, list[Incoming]],
        task: asyncio.Future[Any],
    ) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._hint_all(node, entry, by_shard)

    def _hint_all(
        self, node: str, entry: CollectionEntry, by_shard: dict[int, list[Incoming]]
    ) -> None:
        for shard, docs in by_shard.items():
            self.hints.add(node, entry.spec.name, shard, docs)

    async def replay_hints(self, node: str) -> int:
        """Deliver what `node` missed; what fails is kept for the next try."""
        delivered = 0
        for (name, shard), docs in self.hints.take(node).items():
            entry = self.runtime.state.get(name)
            if entry is None or node not in self.write_targets(entry, shard):
                continue  # deleted, or the shard moved away: nothing to hand off
            try:
                for i in range(0, len(docs), 1000):
                    await self.write_to_node(node, entry, {shard: docs[i : i + 1000]})
                    delivered += len(docs[i : i + 1000])
            except AquilaError:
                self.hints.add(node, name, shard, docs)
        if delivered:
            log.info("handed %d hinted write(s) to %s", delivered, node)
        return delivered

    async def write_to_node(
        self, node: str, entry: CollectionEntry, by_shard: dict[int, list[Incoming]]
    ) -> dict[int, tuple[int, int]]:
        if node == self.node_id:
            # The same check a replica makes: `entry` may be older than the map by now.
            current = self.runtime.entry_for_write(entry.spec.name, entry.uid, entry.spec)
            await self.runtime.open_for_write(current, by_shard)
            return await self.backend.write(current.spec, by_shard)
        body = {"spec": entry.spec.to_json(), "uid": entry.uid,
                "writes": encode_writes(by_shard)}
        out = await self.ask_peer(node, "POST", entry.spec.name, "write", body)
        # A peer's counts reach the client's answer: bounded like everything from a peer.
        return {checked_int(int(s), 0, entry.spec.shards - 1, "shard"):
                (checked_int(v[0], 0, MAX_COUNT, "count"), checked_int(v[1], 0, MAX_COUNT, "count"))
                for s, v in out["shards"].items()}

    # -- reads ----------------------------------------------------------------------------
    async def get_document(self, name: str, doc_id: str, with_vector: bool) -> dict[str, Any]:
        entry = self.entry(name)
        shard = shard_of(check_id(doc_id), entry.spec.shards)
        hit = await self._get(entry, shard, doc_id)
        if hit is None:
            raise NotFound(f"document {doc_id!r} does not exist in {name!r}")
        out: dict[str, Any] = {"id": doc_id, "metadata": orjson.Fragment(hit.metadata or b"{}")}
        if with_vector:
            out["vector"] = np.frombuffer(hit.vector, dtype="<f4").tolist()
        return out

    async def _get(self, entry: CollectionEntry, shard: int, doc_id: str) -> Hit | None:
        """From the first replica that has it: a replica that missed the write (it is
        catching up) answers "absent", and the next one is asked before saying 404."""
        errors = []
        answered = False
        for node in self.ordered_replicas(entry.replicas[shard]):
            try:
                hit = await self._get_from(node, entry, shard, doc_id)
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

    async def _get_from(
        self, node: str, entry: CollectionEntry, shard: int, doc_id: str
    ) -> Hit | None:
        if node == self.node_id:
            return await self.backend.get(entry.spec, shard, doc_id)
        raw = await self.ask_peer(node, "POST", entry.spec.name, "get",
                                  {"shard": shard, "id": doc_id})
        if raw is None or raw.get("doc") is None:
            return None
        return decode_hits([[raw["doc"]]])[0][0]

    async def search(self, name: str, body: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        entry = self.entry(name)
        spec = entry.spec
        req = parse_search(body, spec.dim)
        timeout_s = req.timeout_ms / 1000 if req.timeout_ms else self.search_timeout_s
        candidates, unreachable = self.search_candidates(entry)
        nq = len(req.vectors)
        remote_body: dict[str, Any] = {}  # built once, on the first remote ask

        async def ask(node: str, shards: list[int], budget: float) -> list[list[Hit]]:
            if node == self.node_id:
                return await self.backend.search(
                    spec, req.vectors, req.k, req.nprobe, req.predicate, shards,
                    req.include_vector,
                )
            if not remote_body:
                remote_body.update(
                    vectors=base64.b64encode(req.vectors.astype("<f4").tobytes()).decode(),
                    nq=nq, k=req.k, nprobe=req.nprobe, filter=req.filter,
                    include=["metadata"] * req.include_metadata + ["vector"] * req.include_vector,
                )
            out = await self.ask_peer(node, "POST", name, "search",
                                      {**remote_body, "shards": shards}, timeout=budget)
            return decode_hits(out["results"])

        result = await fan_out(
            candidates, ask, nq, req.k, spec.metric != "l2", self.clock, timeout_s
        )
        missing = sorted(set(result.missing) | set(unreachable))
        if missing and not req.allow_partial:
            raise Unavailable(
                f"shard(s) {missing} have no live replica that answered; "
                f"{'; '.join(result.errors) or 'no replica alive'}"
            )
        return {
            "results": [[hit_json(h, req.include_metadata, req.include_vector) for h in row]
                        for row in result.rows],
            "partial": bool(missing),
            "missing_shards": missing,
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
        }
