"""Prometheus metrics of one node, in a registry of its own (no module-level registry).

Requests are counted here as they are answered; everything else is read when scraped: the
cluster layer keeps plain counters in its own objects (gossip, reads, writes, hints, repair,
rebalancer, healer), which `ClusterNode.metrics_snapshot` gathers, and storage reports each
collection's figures (`Collection.figures`). The README says which question each answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from aquila.cluster.clock import Clock
from aquila.node import collector

INDEX_STATES = ("buffering", "training", "trained")


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=[label])
    for key, n in sorted(values.items()):
        c.add_metric([key], n)
    return c


class _Storage:
    """Each collection's part on this node: documents, index state and size, memory."""

    def __init__(self, figures: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        figures = sorted(self._figures().items())
        docs = GaugeMetricFamily("aquila_documents", "Live documents held by this node",
                                 labels=["collection"])
        vectors = GaugeMetricFamily("aquila_index_vectors", "Vectors in the collection's FAISS "
                                    "index on this node", labels=["collection"])
        state = GaugeMetricFamily("aquila_index_state", "1 for the state the collection's index "
                                  "is in on this node (buffering: exact search, too small to "
                                  "train; training; trained)", labels=["collection", "state"])
        faiss = GaugeMetricFamily("aquila_faiss_memory_bytes", "Estimated memory of the "
                                  "collection's FAISS index on this node", labels=["collection"])
        rocks = GaugeMetricFamily("aquila_rocksdb_memory_bytes", "Memory RocksDB reports for "
                                  "the collection's store on this node, by kind",
                                  labels=["collection", "kind"])
        labels = GaugeMetricFamily("aquila_labels", "The collection's labels on this node, by "
                                   "kind (given: what the arrays over labels are sized by)",
                                   labels=["collection", "kind"])
        compactions = CounterMetricFamily("aquila_index_compactions", "Compactions of the "
                                          "collection's index lists on this node (each list "
                                          "allocated to its size once writes paused)",
                                          labels=["collection"])
        added = GaugeMetricFamily("aquila_index_added_since_compaction", "Vectors added to "
                                  "the collection's trained index on this node since its lists "
                                  "were last allocated to their size (a training, compaction "
                                  "or load)", labels=["collection"])
        for name, f in figures:
            compactions.add_metric([name], f.get("compactions", 0))
            added.add_metric([name], f.get("added_since_compaction", 0))
            for kind, n in sorted(f.get("labels", {}).items()):
                labels.add_metric([name, kind], n)
            docs.add_metric([name], f["documents"])
            vectors.add_metric([name], f["vectors"])
            for s in INDEX_STATES:
                state.add_metric([name, s], 1 if f["index_state"] == s else 0)
            faiss.add_metric([name], f["faiss_bytes"])
            for kind, n in sorted(f["rocksdb_bytes"].items()):
                rocks.add_metric([name, kind], n)
        yield from (docs, vectors, state, faiss, rocks, labels, compactions, added)


class _SearchPlans:
    """Filtered-search planner paths taken (one per query and shard), read when scraped."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        yield _labelled("aquila_search_plans", "Shards searched with a filter, per query, by "
                        "planner path (exact, selector, postfilter, none)", "path",
                        self._counts())


class _Cluster:
    """The cluster layer's counters, read when scraped."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        for name, value in sorted(snap["gossip"].items()):
            yield _counter(f"aquila_gossip_{name}", f"Gossip {name.replace('_', ' ')}", value)
        members = GaugeMetricFamily("aquila_members", "Members by state, as this node sees "
                                    "them", labels=["state"])
        for state, n in sorted(snap["members"].items()):
            members.add_metric([state], n)
        yield members
        yield GaugeMetricFamily("aquila_health_score", "Lifeguard local health score (0 is "
                                "healthy)", value=snap["health"])
        yield GaugeMetricFamily("aquila_cluster_epoch", "Cluster state epoch", value=snap["epoch"])
        yield from self._data_path(snap)
        yield from self._movement(snap)

    @staticmethod
    def _data_path(snap: dict[str, Any]) -> Iterator[Metric]:
        reads, writes = snap["reads"], snap["writes"]
        yield _counter("aquila_searches", "Searches this node coordinated", reads["searches"])
        yield _counter("aquila_search_partial", "Searches answered without some shards "
                       "(partial: true)", reads["partial"])
        yield _counter("aquila_search_refused", "Searches refused with 503 because shards "
                       "were missing and allow_partial was false", reads["refused"])
        yield _counter("aquila_search_retries", "Shards asked again of another replica after "
                       "one failed (searches, counts, scrolls)", reads["retried"])
        yield _counter("aquila_search_hedges", "Shards asked of another replica too after a "
                       "slow answer (hedged; searches, counts, scrolls)", reads["hedged"])
        yield _labelled("aquila_write_refused", "Writes refused before sending: too few live "
                        "replicas for the consistency", "consistency", writes["refused"])
        yield _labelled("aquila_write_acks_short", "Writes sent but acknowledged by fewer "
                        "replicas than the consistency asks (503)", "consistency",
                        writes["short"])
        yield _counter("aquila_write_degraded", "Writes answered while some replica missed "
                       "them (kept as hints)", writes["degraded"])
        yield GaugeMetricFamily("aquila_hints_pending", "Hinted writes waiting for a replica",
                                value=snap["hints_pending"])
        yield _counter("aquila_hints_added", "Documents kept as hints for a replica that "
                       "missed them", snap["hints_added"])
        yield _counter("aquila_hints_replayed", "Hinted documents handed to their replica",
                       snap["hints_replayed"])
        yield _counter("aquila_hints_dropped", "Hinted writes dropped (store full)",
                       snap["hints_dropped"])

    @staticmethod
    def _movement(snap: dict[str, Any]) -> Iterator[Metric]:
        repair, moves, healer = snap["repair"], snap["moves"], snap["healer"]
        yield _counter("aquila_repair_comparisons", "Replica pairs whose digests anti-entropy "
                       "compared (a move's catch-up included)", repair["compared"])
        yield _counter("aquila_repair_differing", "Compared replica pairs that differed",
                       repair["differing"])
        yield _counter("aquila_repair_records", "Records sent to repair a replica",
                       repair["records"])
        yield _counter("aquila_repair_failures", "Comparisons that failed (replica "
                       "unreachable)", repair["failures"])
        outcome = CounterMetricFamily("aquila_rebalance_moves", "Replica moves this node "
                                      "drove, by outcome", labels=["outcome"])
        outcome.add_metric(["done"], moves["done"])
        outcome.add_metric(["failed"], moves["failed"])
        yield outcome
        yield _counter("aquila_rebalance_documents", "Records copied by replica moves",
                       moves["documents"])
        yield _counter("aquila_rebalance_bytes", "Bytes (vectors and metadata) copied by "
                       "replica moves", moves["bytes"])
        active = GaugeMetricFamily("aquila_rebalance_moves_active", "Moves this node is "
                                   "driving now, by stage", labels=["stage"])
        for stage, n in sorted(snap["moves_active"].items()):
            active.add_metric([stage], n)
        yield active
        yield _counter("aquila_heal_moves", "Replica moves started by self-healing",
                       healer["heal_moves"])
        yield _counter("aquila_orphans_dropped", "Shard copies dropped because the map no "
                       "longer assigns them", healer["orphans_dropped"])


class _Heap:
    """The process's C heap as glibc counts it, read at each scrape: what RSS holds beside
    the indexes and RocksDB's budget, split into what is allocated and what the heap keeps
    free (the churn benchmark reads it instead of stopping the node with gdb). The count
    walks every free chunk of every arena, each under its lock (0.1 s a million of them):
    `refresh` makes it on a thread before the registry is rendered on the loop."""

    def __init__(self, figures: Callable[[], dict[str, int]]) -> None:
        self._figures = figures
        self.latest: dict[str, int] = {}

    async def refresh(self) -> None:
        self.latest = await asyncio.to_thread(self._figures)

    def collect(self) -> Iterator[Metric]:
        heap = GaugeMetricFamily("aquila_malloc_bytes", "The C heap by glibc's mallinfo2, by "
                                 "kind: heap (the arenas' memory from the system), in_use "
                                 "(allocated in them), free (held free in them: a trim gives "
                                 "back its whole pages), mapped (blocks mapped apart), "
                                 "releasable (the main heap's free top)", labels=["kind"])
        for kind, n in sorted(self.latest.items()):
            heap.add_metric([kind], n)
        yield heap


class _Collector:
    """Python's garbage collector (`node.collector`): its pauses hold every thread."""

    def collect(self) -> Iterator[Metric]:
        got = collector.figures()
        runs = CounterMetricFamily("aquila_gc_collections", "Collections of Python's cyclic "
                                   "garbage collector, by generation", labels=["generation"])
        spent = CounterMetricFamily("aquila_gc_seconds", "Seconds in collections (each holds "
                                    "the GIL: the event loop and every thread wait), by "
                                    "generation", labels=["generation"])
        for generation, (n, seconds) in enumerate(zip(got["collections"], got["seconds"],
                                                      strict=True)):
            runs.add_metric([str(generation)], n)
            spent.add_metric([str(generation)], seconds)
        yield runs
        yield spent
        yield GaugeMetricFamily("aquila_gc_frozen_objects", "Objects of the node's start "
                                "moved out of the collector's sight once it was ready",
                                value=got["frozen"])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "aquila_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "aquila_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.training = Histogram(
            "aquila_index_training_seconds",
            "Time to train a collection's IVF index on this node",
            ["collection"],
            registry=self.registry,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.loop_lag = Histogram(
            "aquila_event_loop_lag_seconds",
            "How late the event loop woke a timer: work that held the loop",
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.loop_lag_last = Gauge(
            "aquila_event_loop_lag_last_seconds", "The last event-loop lag measured",
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._heap: _Heap | None = None
        collector.watch()
        self.registry.register(_Collector())  # type: ignore[arg-type]

    def watch_storage(self, figures: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry.register(_Storage(figures))  # type: ignore[arg-type]

    def watch_heap(self, figures: Callable[[], dict[str, int]]) -> None:
        self._heap = _Heap(figures)
        self.registry.register(self._heap)  # type: ignore[arg-type]

    def watch_plans(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_SearchPlans(counts))  # type: ignore[arg-type]

    def watch_cluster(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_Cluster(snapshot))  # type: ignore[arg-type]

    def trained(self, collection: str, seconds: float) -> None:
        self.training.labels(collection).observe(seconds)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        # Label lookups take a lock and build a key; the children are cached per label set.
        key = (method, route, status)
        child = self._children.get(key)
        if child is None:
            child = (self.requests.labels(method, route, str(status)), self.latency.labels(route))
            self._children[key] = child
        child[0].inc()
        child[1].observe(seconds)

    async def watch_loop_lag(self, clock: Clock, interval_s: float = 0.25) -> None:
        """Forever: sleep `interval_s` and record how much later than that the loop woke."""
        while True:
            t0 = clock.now()
            await clock.sleep(interval_s)
            lag = max(0.0, clock.now() - t0 - interval_s)
            self.loop_lag.observe(lag)
            self.loop_lag_last.set(lag)

    async def refresh(self) -> None:
        """What is read off the loop before a render: glibc's count of the heap."""
        if self._heap is not None:
            await self._heap.refresh()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
