"""Three real nodes: /metrics scraped before and after traffic and a fault (a node paused
with SIGSTOP, then let go), and the series an operator would look at moved the way the events
went: requests by route, searches partial and refused, writes short of their consistency,
refused and degraded, hints pending then handed back, members by state, anti-entropy, index
training, memory and event-loop lag."""

from __future__ import annotations

import signal
import urllib.request
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Cluster
from tests.procs import NodeProc, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
DIM = 8


def scrape(node: NodeProc) -> Samples:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(node.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def v(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def docs(start: int, n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(start)
    return [{"id": f"d{i}", "vector": rng.standard_normal(DIM).tolist(), "metadata": {"i": i}}
            for i in range(start, start + n)]


def write(node: NodeProc, name: str, batch: list[dict[str, Any]], consistency: str) -> int:
    return node.call("POST", f"/v1/collections/{name}/documents",
                     {"documents": batch, "consistency": consistency}, timeout=30)[0]


def search(node: NodeProc, name: str, **extra: Any) -> tuple[int, Any]:
    q = np.random.default_rng(1).standard_normal(DIM).tolist()
    return node.call("POST", f"/v1/collections/{name}/search", {"vector": q, "k": 5, **extra},
                     timeout=30)


def test_metrics_move_with_traffic_and_a_fault(netns: None, tmp_path: Any) -> None:
    c = Cluster(tmp_path, 3, train_min=200, anti_entropy_interval_s=1, dead_grace_s=0)
    c.start()
    n1, n3 = c.nodes[0], c.nodes[2]
    try:
        before = scrape(n1)
        for name, replication in (("r2", 2), ("r1", 1)):
            status, body = n1.call("PUT", f"/v1/collections/{name}", {
                "dim": DIM, "shards": 6, "replication": replication,
                "index": {"type": "ivf_flat"}})
            assert status == 201, body
        for start in range(0, 1200, 400):
            assert write(n1, "r2", docs(start, 400), "all") == 200
        assert write(n1, "r1", docs(0, 300), "one") == 200
        for _ in range(5):
            assert search(n1, "r2")[0] == 200

        def trained() -> Samples | None:
            s = scrape(n1)
            done = (v(s, "aquila_index_state", collection="r2", state="trained") == 1
                    and v(s, "aquila_repair_comparisons_total") > 0)
            return s if done else None

        traffic = wait_until(trained, 60, "r2 trained on n1 and an anti-entropy pass")
        route = "/v1/collections/{name}/documents"
        assert v(traffic, "aquila_http_requests_total", method="POST", route=route,
                 status="200") - v(before, "aquila_http_requests_total", method="POST",
                                   route=route, status="200") == 4
        assert v(traffic, "aquila_http_request_seconds_count", route=route) >= 4
        assert v(traffic, "aquila_searches_total") == 5
        assert v(traffic, "aquila_index_training_seconds_count", collection="r2") >= 1
        assert v(traffic, "aquila_documents", collection="r2") > 0
        assert v(traffic, "aquila_faiss_memory_bytes", collection="r2") > 0
        assert v(traffic, "aquila_rocksdb_memory_bytes", collection="r2", kind="memtables") > 0
        assert v(traffic, "aquila_event_loop_lag_seconds_count") > v(
            before, "aquila_event_loop_lag_seconds_count")
        assert v(traffic, "aquila_members", state="alive") == 3
        assert v(traffic, "aquila_write_degraded_total") == 0
        assert v(traffic, "aquila_hints_pending") == 0

        # The fault: n3 stops answering. Before it is suspected a write that needs every
        # replica waits for it in vain (short); once it is, that write is refused up front, a
        # write that one replica acknowledges is answered but leaves hints, and searches lose
        # n3's shards of r1.
        n3.signal(signal.SIGSTOP)
        assert write(n1, "r2", docs(5000, 50), "all") == 503
        c.wait_states({"n3": "dead"}, [n1])
        assert write(n1, "r2", docs(6000, 50), "all") == 503
        assert write(n1, "r2", docs(7000, 50), "one") == 200
        status, res = search(n1, "r1", timeout_ms=2000)
        assert status == 200 and res["partial"], res
        assert search(n1, "r1", allow_partial=False, timeout_ms=2000)[0] == 503
        fault = scrape(n1)
        assert v(fault, "aquila_write_acks_short_total", consistency="all") == 1
        assert v(fault, "aquila_write_refused_total", consistency="all") == 1
        assert v(fault, "aquila_write_degraded_total") >= 1
        assert v(fault, "aquila_hints_pending") > 0
        assert v(fault, "aquila_hints_added_total") >= v(fault, "aquila_hints_pending")
        assert v(fault, "aquila_search_partial_total") == 1
        assert v(fault, "aquila_search_refused_total") == 1
        assert v(fault, "aquila_members", state="dead") == 1
        assert v(fault, "aquila_members", state="alive") == 2
        assert v(fault, "aquila_http_requests_total", method="POST", route=route,
                 status="503") == 2

        # Let go: n3 is alive again and gets the writes it missed.
        n3.signal(signal.SIGCONT)
        c.wait_states({"n3": "alive"}, [n1])

        def handed_back() -> Samples | None:
            s = scrape(n1)  # replayed counts a batch once n3 has acknowledged it
            done = (v(s, "aquila_hints_pending") == 0 and v(s, "aquila_hints_replayed_total")
                    == v(fault, "aquila_hints_pending"))
            return s if done else None

        after = wait_until(handed_back, 60, "the hints handed to n3")
        assert v(after, "aquila_members", state="alive") == 3
        assert v(after, "aquila_members", state="dead") == 0
    finally:
        n3.signal(signal.SIGCONT)
        c.stop()
