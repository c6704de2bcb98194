"""Prometheus metrics of one node, in a registry of its own (no module-level registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class _Collections:
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "aquila_documents", "Live documents held by this node", labels=["collection"]
        )
        for name, n in sorted(self._counts().items()):
            g.add_metric([name], n)
        yield g


class _SearchPlans:
    """Filtered-search planner paths taken (one per query and shard), read when scraped."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("aquila_search_plans", "Shards searched, per query, by planner "
                                "path (exact, selector, postfilter, none)", labels=["path"])
        for path, n in sorted(self._counts().items()):
            c.add_metric([path], n)
        yield c


class _Cluster:
    """Gossip counters, member states, hinted hand-off and Lifeguard health, read when
    scraped."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        for name, value in sorted(snap["gossip"].items()):
            c = CounterMetricFamily(f"aquila_gossip_{name}", f"Gossip {name.replace('_', ' ')}")
            c.add_metric([], value)
            yield c
        members = GaugeMetricFamily("aquila_members", "Members by state", labels=["state"])
        for state, n in sorted(snap["members"].items()):
            members.add_metric([state], n)
        yield members
        yield GaugeMetricFamily("aquila_health_score", "Lifeguard local health score (0 is "
                                "healthy)", value=snap["health"])
        yield GaugeMetricFamily("aquila_hints_pending", "Hinted writes waiting for a replica",
                                value=snap["hints_pending"])
        c = CounterMetricFamily("aquila_hints_dropped", "Hinted writes dropped (store full)")
        c.add_metric([], snap["hints_dropped"])
        yield c
        yield GaugeMetricFamily("aquila_cluster_epoch", "Cluster state epoch", value=snap["epoch"])


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

        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def watch_collections(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_Collections(counts))  # type: ignore[arg-type]

    def watch_plans(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_SearchPlans(counts))  # type: ignore[arg-type]

    def watch_cluster(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_Cluster(snapshot))  # type: ignore[arg-type]

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        # Label lookups take a lock and build a key; the children are cached per label set.
        key = (method, route, status)
        child = self._children.get(key)
        if child is None:
            child = (self.requests.labels(method, route, str(status)), self.latency.labels(route))
            self._children[key] = child
        child[0].inc()
        child[1].observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
