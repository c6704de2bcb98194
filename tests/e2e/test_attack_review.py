"""Findings of the security review, against real `aquila serve` processes in the private
network namespace (see tests/e2e/test_attack_auth.py and test_attack_input.py for the
attacks the trust-boundary work already covers)."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import orjson

from aquila.cluster.membership.messages import User, encode
from tests.e2e.conftest import FAST
from tests.e2e.rogue import tombstones
from tests.procs import NodeProc, http, wait_until

READ = {"Authorization": "Bearer read-key"}


def _collections(node: NodeProc) -> list[str]:
    status, body = http("GET", node.url + "/v1/collections", headers=READ)
    assert status == 200, body
    return [c["name"] for c in body["collections"]]


def _metric(node: NodeProc, name: str) -> float:
    req = urllib.request.Request(node.url + "/metrics", headers=READ)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_a_node_keyed_by_a_read_key_alone_keeps_its_peer_traffic_closed(
    netns: None, tmp_path: Path,
) -> None:
    """With --read-key and neither an API key nor a secret (allowed on loopback), public
    writes were refused, yet /internal/* and gossip took anyone's: an unauthenticated state
    push created a collection, peer writes filled it, gossip could delete it."""
    n = NodeProc(tmp_path / "ro", host="127.0.0.2", node_id="ro", read_key="read-key", **FAST)
    entry = {"spec": {"name": "planted", "dim": 2, "shards": 1, "index": {"type": "flat"}},
             "replicas": [["ro"]], "epoch": 5, "origin": "rogue", "uid": "u"}
    try:
        n.start()
        for method, path, body in [
            ("POST", "/internal/v1/state", [entry]),
            ("POST", "/internal/v1/collections/planted/write",
             {"writes": [{"shard": 0, "docs": []}]}),
            ("POST", "/internal/v1/collections/planted/drop_shard", {"shard": 0}),
        ]:
            status, answer = http(method, n.url + path, body)
            assert status == 401 and answer["error"]["code"] == "unauthorized", (path, answer)
        # Gossip: a bare datagram carrying cluster-state entries is dropped unread.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(encode(User(orjson.dumps([entry]))), (n.host, n.port))
            s.sendto(encode(User(tombstones(["planted"]))), (n.host, n.port))
        wait_until(lambda: _metric(n, "aquila_gossip_bad_mac_total") >= 2, 10,
                   "the forged datagrams refused")
        assert _collections(n) == []
        assert http("GET", n.url + "/readyz")[0] == 200
    finally:
        n.stop()
