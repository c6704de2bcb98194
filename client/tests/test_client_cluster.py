"""The client across a real 3-node cluster under faults (private network namespace only): a
node killed mid-use, the calls going on through the others; join and leave of a fourth node."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Driver
from live import (
    API_KEY,
    Deployment,
    cluster_node,
    cosine_top,
    create,
    in_private_netns,
    sample_rows,
    seed,
    start_cluster3,
)
from tests.procs import wait_until

import aquila_client as aq

N = 600


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Deployment]:
    if not in_private_netns():
        pytest.skip("multi-node tests run inside a private network namespace "
                    "(scripts/test.sh as root)")
    dep = start_cluster3(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_node_killed_mid_use(cluster: Deployment, mode: str) -> None:
    n1 = cluster.nodes[0]
    s, base, ids, meta = sample_rows(N)
    # "safe": every shard on all three nodes; "single": one replica each, some on n1.
    create(n1, "safe", 384, metric="cosine", shards=3, replication=3, index={"type": "flat"})
    create(n1, "single", 384, metric="cosine", shards=3, replication=1, index={"type": "flat"})
    seed(n1, "safe", base, ids, meta)
    seed(n1, "single", base, ids, meta)
    db = Driver(mode, cluster.addrs, api_key=API_KEY, timeout=10)
    try:
        queries = s.queries[:5]
        want, _ = cosine_top(base, queries, 10)
        before = db.search("safe", queries, k=10)
        assert before.ids == [[ids[j] for j in row] for row in want]
        assert db.client.current_node == f"http://{n1.addr}"

        n1.kill()  # SIGKILL, mid-use: the client's current node is gone

        after = db.search("safe", queries, k=10, allow_partial=False)
        assert after.ids == before.ids and not after.partial
        assert db.client.current_node != f"http://{n1.addr}"  # failed over, and stays there
        doc = db.get_document("safe", ids[3], vector=True)
        assert doc.vector is not None and doc.vector.tobytes() == base[3].tobytes()
        assert "safe" in [c.name for c in db.list_collections()]
        assert db.delete_documents("safe", [ids[0]]) == 1

        # Shards whose only replica was on n1: partial answers, or 503 when asked for all.
        n1_id = "n1"
        lost = [p.shard for p in db.shards().collections["single"] if p.replicas == (n1_id,)]
        assert lost, "placement put no 'single' shard on n1"
        part = db.search("single", queries, k=10)
        assert part.partial and part.missing_shards == lost
        with pytest.raises(aq.Unavailable) as info:
            db.search("single", queries, k=10, allow_partial=False)
        # Every node asked once; the live ones' 503 is what is raised, not the dead one's silence.
        said = {e.node: e.code for e in info.value.attempts}
        assert said == {cluster.addrs[0]: "transport", cluster.addrs[1]: "unavailable",
                        cluster.addrs[2]: "unavailable"}

        # A paused node keeps its socket open and answers nothing: the client's timeout.
        n2 = cluster.nodes[1]
        n2.signal(signal.SIGSTOP)
        impatient = Driver(mode, [n2.addr], api_key=API_KEY, timeout=0.5)
        try:
            with pytest.raises(aq.RequestTimeout) as waited:
                impatient.healthz()
            assert waited.value.node == n2.addr
        finally:
            n2.signal(signal.SIGCONT)
            impatient.close()
    finally:
        db.close()


def test_join_and_leave_a_fourth_node(cluster: Deployment, tmp_path: Path) -> None:
    n4 = cluster_node(tmp_path, 4, seeded=False)  # a one-node cluster of its own
    cluster.nodes.append(n4)
    n4.start()
    with aq.Client(cluster.addrs[:3], api_key=API_KEY, trust_env=False, timeout=60) as db:
        assert db.readyz(node=n4.addr) is True
        res = db.join([cluster.addrs[0]], node=n4.addr)
        assert res.joined >= 1
        cluster.wait_states({"n4": "alive"}, observers=cluster.nodes[:3])
        assert {m.id for m in db.cluster(node=n4.addr).members} >= {"n1", "n2", "n3", "n4"}
        create(cluster.nodes[0], "four", 8, shards=8)
        rng = np.random.default_rng(3)
        seed(cluster.nodes[0], "four", rng.standard_normal((40, 8)).astype(np.float32),
             [f"d{i}" for i in range(40)], [{} for _ in range(40)])
        left = db.leave(node=n4.addr, max_wait=120)
        assert left.left
        wait_until(lambda: cluster.states(cluster.nodes[0]).get("n4") == "left", 30,
                   "n1 to see n4 left")
        placements = db.shards().collections["four"]
        assert all("n4" not in p.replicas for p in placements)
        assert db.get_collection("four").count == 40
