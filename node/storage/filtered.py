"""Filtered search over a collection's local index (blocking; runs on a search thread under the
collection's read lock): the filter's match set per shard (`Shard.matches`, cached), a plan per
shard (`planner`), the shards grouped by path and each group searched once for the whole batch
of queries, the groups' answers merged into the k best matches per query.

What a group's search needs beyond the match sets (a FAISS selector of the matching keys, the
matches' gathered vectors, their count per inverted list) is kept in a `GroupCache` per
collection, under stamps that change when a write touches a matching document or the index
is swapped, so a stream of searches with one filter builds each once.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import orjson

from aquila.cluster.model.documents import Hit
from aquila.cluster.model.filters import Filter
from aquila.cluster.model.spec import CollectionSpec
from aquila.node.storage.index import (
    LABEL_BITS,
    VectorIndex,
    faiss,
    faiss_metric,
    global_keys,
)
from aquila.node.storage.matches import MatchSet, canonical
from aquila.node.storage.planner import (
    EXACT,
    NONE,
    POSTFILTER,
    SELECTOR,
    IndexShape,
    ShardPlan,
    choose,
    probes,
)
from aquila.node.storage.search import candidates, resolve
from aquila.node.storage.shard import Shard
from aquila.node.storage.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
_MASK = (1 << LABEL_BITS) - 1
# Coarse lists fetched first, as a multiple of nprobe / share of matches (more are fetched for
# the queries whose lists turn out to hold fewer matches than that suggests).
COARSE_SLACK = 2.0
# Post-filtering asks for this many times k / (share of matches) candidates, then four times
# as many for the queries still short of k matches, twice; a query short even then (its lists
# hold far fewer matches than the shard as a whole) is finished with a selector.
CANDIDATE_SLACK = 1.5
CANDIDATE_ROUNDS = 3


@dataclass(frozen=True)
class FilterQuery:
    """A parsed filter and its canonical key. Equal, and so batched together and cached as one,
    by key only."""

    key: str
    flt: Filter = field(compare=False)

    @staticmethod
    def of(flt: Filter) -> FilterQuery:
        return FilterQuery(canonical(flt), flt)


class Searchable(Protocol):
    spec: CollectionSpec
    index: VectorIndex
    shards: dict[int, Shard]
    store: Store
    groups: GroupCache


class GroupCache:
    """A small LRU, bounded in entries and bytes, of what searching a group of shards for one
    filter needs; an entry is used only under the stamp it was built for."""

    def __init__(self, capacity: int = 64, max_bytes: int = 128 << 20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Hashable, Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, stamp: Hashable,
            build: Callable[[], tuple[T, int]]) -> T:
        """The value under `key` built for `stamp`, or `build()`'s (value, bytes), kept."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] == stamp:
                self._entries.move_to_end(key)
                return hit[1]  # type: ignore[no-any-return]
        value, size = build()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            if size <= self.max_bytes and self.capacity > 0:
                self._entries[key] = (stamp, value, size)
                self._bytes += size
                while len(self._entries) > self.capacity or self._bytes > self.max_bytes:
                    self._bytes -= self._entries.popitem(last=False)[1][2]
        return value


def match_sets(
    coll: Searchable, predicate: FilterQuery | Callable[[Any], bool], wanted: tuple[int, ...]
) -> dict[int, tuple[MatchSet, bool]]:
    """Per shard, the match set and whether it was cached. A predicate that is not a parsed
    filter is evaluated on every document, and nothing is cached."""
    if isinstance(predicate, FilterQuery):
        return {s: coll.shards[s].matches(predicate.flt, predicate.key) for s in wanted}
    out = {}
    for s in wanted:
        shard = coll.shards[s]
        mask = np.zeros(shard.next_label, dtype=bool)
        hits = [lab for lab, meta in shard.meta.items() if predicate(orjson.loads(meta or b"{}"))]
        mask[np.asarray(hits, dtype=np.int64)] = True
        out[s] = (MatchSet.of_mask(mask), False)
    return out


def search_planned(
    coll: Searchable,
    q: np.ndarray,
    k: int,
    nprobe: int,
    predicate: FilterQuery | Callable[[Any], bool],
    wanted: tuple[int, ...],
    with_vectors: bool,
    force: str | None = None,
) -> tuple[list[list[Hit]], list[dict[str, Any]]]:
    """The k best matching documents per query over these shards, and each shard's plan
    (`force`: one path for every shard that has matches; tests and benchmarks)."""
    index = coll.index
    sets = match_sets(coll, predicate, wanted)
    shape = IndexShape(index.trained, index.nlist, index.ntotal,
                       max(1, min(nprobe, index.nlist)), coll.spec.dim)
    plans = []
    for s in wanted:
        ms, cached = sets[s]
        live = coll.shards[s].count
        path = choose(ms.count, live, shape)
        if force is not None and path != NONE:
            path = force
        plans.append(ShardPlan(s, path, ms.count, live, cached))
    groups: dict[str, tuple[int, ...]] = {}
    for p in plans:
        groups[p.path] = (*groups.get(p.path, ()), p.shard)
    # A compressed index's candidates are re-ranked with their stored vectors (`resolve`).
    want = candidates(coll, k)
    run = _Run(coll, q, want, shape, predicate, sets)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    notes: dict[str, dict[str, Any]] = {}
    if index.ntotal:
        if EXACT in groups:
            parts.append(run.exact(groups[EXACT]))
        for path in (SELECTOR, POSTFILTER):
            if path in groups:
                scores, keys, note = run.indexed(path, groups[path])
                parts.append((scores, keys))
                notes[path] = note
    scores, keys = _merge(parts, len(q), want, coll.spec.metric != "l2")
    out = [p.json() | notes.get(p.path, {}) for p in plans]
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: filtered search of %d queries: %s", coll.spec.name, len(q), out)
    return resolve(coll, scores, keys, with_vectors,
                   rescore=(q, k) if want > k else None), out


class _Run:
    """One batch's filtered search, group by group."""

    def __init__(self, coll: Searchable, q: np.ndarray, k: int, shape: IndexShape,
                 predicate: Any, sets: dict[int, tuple[MatchSet, bool]]) -> None:
        self.coll, self.q, self.k, self.shape = coll, q, k, shape
        self.index = coll.index
        self.sets = {s: ms for s, (ms, _) in sets.items()}
        self.key = predicate.key if isinstance(predicate, FilterQuery) else None
        self._coarse: tuple[np.ndarray, np.ndarray] | None = None

    def _cached(self, what: str, group: tuple[int, ...], build: Callable[[], tuple[T, int]]
                ) -> T:
        if self.key is None:  # an ad-hoc predicate: nothing to share with later searches
            return build()[0]
        stamp = (self.index.generation, tuple(self.sets[s].stamp for s in group))
        return self.coll.groups.get((what, self.key, group), stamp, build)

    def _keys(self, group: tuple[int, ...]) -> np.ndarray:
        return np.concatenate([global_keys(s, self.sets[s].labels()) for s in group])

    # -- few matches: score them directly ---------------------------------------------
    def exact(self, group: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        def build() -> tuple[tuple[np.ndarray, np.ndarray], int]:
            keys = self._keys(group)
            vectors = self.index.vectors_of(keys)
            return (keys, vectors), keys.nbytes + vectors.nbytes

        keys, vectors = self._cached("exact", group, build)
        kk = min(self.k, len(keys))
        metric = faiss_metric(self.coll.spec.metric)
        scores, rows = faiss.knn(self.q, vectors, kk, metric=metric)
        return scores, np.where(rows >= 0, keys[np.maximum(rows, 0)], -1)

    # -- many or nearly all: the index --------------------------------------------------
    def indexed(self, path: str, group: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        matches = sum(self.sets[s].count for s in group)
        documents = sum(self.coll.shards[s].count for s in group)
        everyone = len(group) == len(self.coll.shards)
        if not self.index.trained:  # flat: every vector is a candidate, no lists to choose
            lists = dist = None
            note: dict[str, Any] = {}
        else:
            dist, lists, probed = self._lists(group, matches, documents)
            note = {"nprobe": int(probed.max()), "nprobe_mean": round(float(probed.mean()), 1)}
        if path == SELECTOR:
            sel = self._selector(group)
            scores, keys = self._search(self.q, min(self.k, matches), dist, lists, sel)
            return scores, keys, note
        shards = None if everyone else self.index.shards_selector(group, self._below(group))
        scores, keys, asked, left = self._postfilter(dist, lists, shards, matches, documents,
                                                     group)
        if len(left):
            s2, k2 = self._search(self.q[left], scores.shape[1],
                                  None if dist is None else dist[left],
                                  None if lists is None else lists[left],
                                  self._selector(group))
            scores[left], keys[left] = s2, k2
            note["finished_with_selector"] = len(left)
        return scores, keys, note | {"candidates": asked}

    def _below(self, group: tuple[int, ...]) -> int:
        return max(self.coll.shards[s].next_label for s in group)

    def _selector(self, group: tuple[int, ...]) -> Any:
        def build() -> tuple[Any, int]:
            below = self._below(group)
            sel = self.index.selector({s: self.sets[s].labels() for s in group}, below)
            return sel, (below << self.index.bits) // 8

        return self._cached("selector", group, build)

    def _search(self, q: np.ndarray, k: int, dist: np.ndarray | None,
                lists: np.ndarray | None, sel: Any) -> tuple[np.ndarray, np.ndarray]:
        if lists is None or dist is None:
            return self.index.search(q, k, 1, selector=sel)
        return self.index.search_lists(q, k, dist, lists, sel)

    def _lists(self, group: tuple[int, ...], matches: int, documents: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query, the lists to probe (nearest first, -1 past its own count), their coarse
        distances, and how many each probes (`planner.probes`)."""
        index, nlist, nprobe = self.index, self.shape.nlist, self.shape.nprobe

        def build() -> tuple[np.ndarray, int]:
            counts = np.zeros(nlist, dtype=np.int64)
            for s in group:
                where = index.lists_of(s)
                labels = self.sets[s].labels()
                ls = where[labels[labels < len(where)]]
                counts += np.bincount(ls[ls >= 0], minlength=nlist)[:nlist]
            return counts, counts.nbytes

        per_list = self._cached("lists", group, build)
        sizes = index.list_sizes()
        share = documents / max(1, index.ntotal)
        want = min(nlist, max(nprobe, math.ceil(COARSE_SLACK * nprobe * documents
                                                / max(1, matches))))
        dist, lists = self._coarse_lists(want)
        need, short = probes(lists, per_list, sizes, nprobe, share)
        if short.any() and lists.shape[1] < nlist:  # those queries get every list there is
            d2, l2 = index.coarse(self.q[short], nlist)
            n2, _ = probes(l2, per_list, sizes, nprobe, share)
            width = max(int(need.max()), int(n2.max()))
            dist, lists = _widen(dist, width), _widen(lists, width)
            dist[short], lists[short] = d2[:, :width], l2[:, :width]
            need[short] = n2
        width = int(need.max())
        lists = lists[:, :width].copy()
        lists[np.arange(width)[None, :] >= need[:, None]] = -1
        return np.ascontiguousarray(dist[:, :width]), lists, need

    def _coarse_lists(self, want: int) -> tuple[np.ndarray, np.ndarray]:
        if self._coarse is None or self._coarse[1].shape[1] < want:
            self._coarse = self.index.coarse(self.q, want)
        return self._coarse

    def _postfilter(self, dist: np.ndarray | None, lists: np.ndarray | None, shards: Any,
                    matches: int, documents: int, group: tuple[int, ...]
                    ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        """Unfiltered candidates, non-matches dropped; four times as many again for the
        queries short of k matches whose lists had more to give. Also the queries still
        short after CANDIDATE_ROUNDS."""
        k = min(self.k, matches)
        nq = len(self.q)
        asked = min(max(self.index.ntotal, 1),
                    math.ceil(CANDIDATE_SLACK * k * documents / max(1, matches)) + 8)
        out_s = np.full((nq, k), np.nan, dtype=np.float32)
        out_k = np.full((nq, k), -1, dtype=np.int64)
        rows = np.arange(nq)
        for r in range(CANDIDATE_ROUNDS):
            if r:
                asked = min(self.index.ntotal, asked * 4)
            sub_d = None if dist is None else dist[rows]
            sub_l = None if lists is None else lists[rows]
            scores, keys = self._search(self.q[rows], asked, sub_d, sub_l, shards)
            ok = self._member(keys, group)
            found = ok.sum(axis=1)
            spent = (keys[:, -1] < 0) | (asked >= self.index.ntotal)
            done = (found >= k) | spent
            for i in np.flatnonzero(done):
                pick = np.flatnonzero(ok[i])[:k]
                out_s[rows[i], : len(pick)] = scores[i, pick]
                out_k[rows[i], : len(pick)] = keys[i, pick]
            rows = rows[~done]
            if not len(rows):
                break
        return out_s, out_k, asked, rows

    def _member(self, keys: np.ndarray, group: tuple[int, ...]) -> np.ndarray:
        ok = np.zeros(keys.shape, dtype=bool)
        flat_keys, flat_ok = keys.reshape(-1), ok.reshape(-1)
        shard_of = flat_keys >> LABEL_BITS
        for s in group:
            pick = (shard_of == s) & (flat_keys >= 0)
            flat_ok[pick] = self.sets[s].contains(flat_keys[pick] & _MASK)
        return ok


def _widen(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[1] >= width:
        return a.copy()
    fill = -1 if a.dtype.kind == "i" else np.inf
    out = np.full((a.shape[0], width), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], nq: int, k: int,
           larger_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k best of every group's answer (key -1: none)."""
    if not parts:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    if len(parts) == 1:
        return parts[0]
    scores = np.concatenate([s for s, _ in parts], axis=1)
    keys = np.concatenate([kk for _, kk in parts], axis=1)
    worst = -np.inf if larger_is_better else np.inf
    ranked = np.where(keys >= 0, scores, worst)
    order = np.argsort(-ranked if larger_is_better else ranked, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)
