"""Search latency at width, from a measured per-node latency distribution (scripts/simulate.py).

A search asks every node holding a shard of the collection and waits for the slowest
(`cluster/fanout.py`). Drawing each node's answer time from the latencies measured on one real
node (scripts/measure_node.py latency), independently per node and per request, gives the
distribution of the fan-out's latency at any width:

- one replica: the maximum of `width` draws;
- hedged (two replicas): a shard still unanswered after `hedge` ms is asked of its next
  replica and the first answer wins, as fan_out does once per search;
- fastest of r: every replica is asked at once (r times the load) and the first answer wins.

The coordinator's own cost (one HTTP request per node, one merge) is added as measured per
request. Draws are independent: a machine-wide stall that slows every node at once, or load
that grows with r, is not modelled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aquila.cluster.replication.fanout import HEDGE_MAX_S, HEDGE_SHARE

WIDTHS = (1, 10, 100, 1000)
QUERIES = 20_000
DEFAULT_TIMEOUT_S = 10.0  # node/config.py search_timeout_ms


def fan_out_ms(
    samples: np.ndarray,
    width: int,
    rng: np.random.Generator,
    *,
    replicas: int = 1,
    hedge_ms: float | None = None,
    queries: int = QUERIES,
) -> np.ndarray:
    """Latency of `queries` searches over `width` shard groups, in ms."""
    out = np.empty(queries)
    chunk = max(1, 2_000_000 // (width * max(replicas, 2)))
    for start in range(0, queries, chunk):
        q = min(chunk, queries - start)
        first = rng.choice(samples, size=(q, width))
        if replicas > 1 and hedge_ms is None:
            per = rng.choice(samples, size=(q, width, replicas)).min(axis=2)
        elif hedge_ms is not None:
            second = hedge_ms + rng.choice(samples, size=(q, width))
            per = np.minimum(first, second)
        else:
            per = first
        out[start:start + q] = per.max(axis=1)
    return out


def run_all(latency: dict[str, Any], seed: int = 1, overhead_ms: float | None = None) -> dict[str, Any]:
    samples = np.asarray(latency["latency"]["clients_1_ms"], dtype=float)
    rng = np.random.default_rng(seed)
    p95 = float(np.percentile(samples, 95))
    default_hedge_ms = min(DEFAULT_TIMEOUT_S * HEDGE_SHARE, HEDGE_MAX_S) * 1000
    per_request = overhead_ms if overhead_ms is not None else float(
        latency["latency"].get("fanout_overhead_ms_per_node", 0.0))
    configs: list[tuple[str, dict[str, Any]]] = [
        ("1 replica, slowest node only (no coordinator cost)", {"free": True}),
        ("1 replica", {}),
        (f"2 replicas, hedged after {default_hedge_ms:.0f} ms (fanout.py default)",
         {"replicas": 2, "hedge_ms": default_hedge_ms}),
        (f"2 replicas, hedged after the node p95 ({p95:.1f} ms)",
         {"replicas": 2, "hedge_ms": p95}),
        ("2 replicas, fastest of both", {"replicas": 2}),
        ("3 replicas, fastest of three", {"replicas": 3}),
    ]
    rows = []
    for width in WIDTHS:
        for label, options in configs:
            kw = {k: v for k, v in options.items() if k != "free"}
            cost = 0.0 if options.get("free") else per_request * width
            lat = fan_out_ms(samples, width, rng, **kw) + cost
            rows.append({
                "width": width, "config": label,
                "p50_ms": round(float(np.percentile(lat, 50)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "load_per_query": width * (kw.get("replicas", 1) if "hedge_ms" not in kw else 1),
            })
    return {
        "node_samples": len(samples),
        "node_p50_ms": round(float(np.percentile(samples, 50)), 2),
        "node_p95_ms": round(p95, 2),
        "node_p99_ms": round(float(np.percentile(samples, 99)), 2),
        "coordinator_ms_per_node": per_request,
        "rows": rows,
    }


def table(results: dict[str, Any]) -> str:
    configs = list(dict.fromkeys(r["config"] for r in results["rows"]))
    head = "| nodes asked | " + " | ".join(configs) + " |"
    rows = [head, "|---:|" + "---:|" * len(configs)]
    for width in WIDTHS:
        cells = []
        for c in configs:
            r = next(x for x in results["rows"] if x["width"] == width and x["config"] == c)
            cells.append(f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}")
        rows.append(f"| {width:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + (
        f"\n\np50 / p99 in ms. One node: p50 {results['node_p50_ms']} ms, p95"
        f" {results['node_p95_ms']} ms, p99 {results['node_p99_ms']} ms"
        f" ({results['node_samples']:,} searches); coordinator cost"
        f" {results['coordinator_ms_per_node']} ms per node asked."
    )
