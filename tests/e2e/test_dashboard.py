"""Three real nodes with an API key and JSON logs: the dashboard in headless Chromium (what it
shows against the API, the key prompt, a search from its box, a rebalance's moves), and one
request followed by its id through the logs of the nodes it reached.

The screenshot is saved under the test's tmp_path, and also in AQUILA_SCREENSHOT_DIR when set
(docs/dashboard.png was taken so)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import Browser, chromium_path
from tests.datasets import load_sample
from tests.e2e.conftest import Cluster, in_private_netns
from tests.procs import NodeProc, wait_until

KEY = "dashboard-key"
N_DOCS = 1500


def fill(node: NodeProc) -> None:
    status, body = node.call("PUT", "/v1/collections/wordnet", {
        "dim": 384, "metric": "cosine", "shards": 6, "replication": 2,
        "index": {"type": "flat"}})
    assert status == 201, body
    s = load_sample()
    for start in range(0, N_DOCS, 500):
        docs = [{"id": s.base_meta[i]["id"], "vector": s.base[i].tolist(),
                 "metadata": {"pos": s.base_meta[i]["pos"], "text": s.base_meta[i]["text"]}}
                for i in range(start, start + 500)]
        status, body = node.call("POST", "/v1/collections/wordnet/documents",
                                 {"documents": docs})
        assert status == 200, body


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """n1 and n2 hold a collection; n3 joins after, so a rebalance has moves to make (slowed
    down so that the dashboard can be seen showing them)."""
    if not in_private_netns():
        pytest.skip("multi-node tests run inside a private network namespace: scripts/test.sh")
    c = Cluster(tmp_path_factory.mktemp("dash"), 3, api_key=KEY, log_format="json",
                transfer_docs_per_s=60)
    n1, n2, n3 = c.nodes
    try:
        n1.start()
        n2.start()
        c.wait_states({"n1": "alive", "n2": "alive"}, [n1, n2])
        fill(n2)
        n3.start()
        c.wait_states({"n1": "alive", "n2": "alive", "n3": "alive"})
        yield c
    finally:
        c.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if chromium_path() is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's)")
    b = Browser(tmp_path / "chromium")
    try:
        yield b
    finally:
        b.close()


def rows(b: Browser, table: str, key: str, cell: str) -> dict[str, str]:
    return dict(b.evaluate(
        f"[...document.querySelectorAll('#{table} tbody tr')].map(tr =>"
        f" [tr.dataset.{key}, tr.querySelector('.{cell}').textContent])") or [])


def api_moves(node: NodeProc) -> set[str]:
    status, body = node.call("GET", "/v1/cluster/shards")
    assert status == 200
    return {f"{name}/{s['shard']} {s['moving']['from']} → {s['moving']['to']}"
            for name, shards in body["collections"].items() for s in shards if s["moving"]}


def dom_moves(b: Browser) -> set[str]:
    return set(b.evaluate(
        "[...document.querySelectorAll('[data-move]')].map(el => el.dataset.move + ' ' +"
        " el.querySelectorAll('span')[1].textContent)") or [])


def test_dashboard_shows_the_cluster_and_searches(
    cluster: Cluster, browser: Browser, tmp_path: Path
) -> None:
    n1 = cluster.nodes[0]
    b = browser
    b.open(f"{n1.url}/ui")
    # The node has a key: the page asks for it, keeps it for the tab, then shows the data.
    b.wait("document.querySelector('#key-dialog').open", 20, "the key prompt")
    b.screenshot(tmp_path / "key-prompt.png")
    b.type_into("#key-input", KEY)
    b.click("#key-form button[type=submit]")
    b.wait("document.querySelectorAll('#members tbody tr').length === 3", 20, "three members")
    assert b.evaluate("sessionStorage.getItem('aquila.apiKey')") == KEY
    assert b.evaluate("localStorage.length") == 0

    # Members and their states, the node and the epoch, as the API says.
    info = n1.call("GET", "/v1/cluster")[1]
    want = {m["id"]: m["state"] for m in info["members"]}
    wait_until(lambda: rows(b, "members", "member", "state") == want, 20, f"members {want}")
    assert b.evaluate("document.querySelector('#node-id').textContent") == info["node"]["id"]
    assert int(b.evaluate("document.querySelector('#epoch').textContent")) >= info["epoch"]

    # Collections with their counts, and each node's replicas.
    listed = n1.call("GET", "/v1/collections")[1]["collections"]
    counts = {c["name"]: f"{c['count']:,}" for c in listed}
    assert counts == {"wordnet": f"{N_DOCS:,}"}
    wait_until(lambda: rows(b, "collections", "collection", "count") == counts, 20, "counts")
    held = rows(b, "members", "member", "held")
    assert held == {"n1": "6", "n2": "6", "n3": "0"}, held  # n3 joined after the collection

    # A search from the box: the nearest neighbours of a stored document, without itself.
    s = load_sample()
    doc_id = s.base_meta[7]["id"]
    b.type_into("#search-id", doc_id)
    b.type_into("#search-k", "8")
    b.click("#search-form button[type=submit]")
    b.wait("document.querySelectorAll('#search-results tbody tr').length === 8", 20,
           "eight neighbours")
    shown = b.evaluate(
        "[...document.querySelectorAll('#search-results tbody tr')].map(tr => [tr.dataset.id,"
        " tr.querySelector('.score').textContent, tr.querySelector('.meta').dataset.meta])")
    res = n1.call("POST", "/v1/collections/wordnet/search", {"id": doc_id, "k": 8})[1]
    hits = res["results"][0]
    assert len(hits) == 8 and doc_id not in [h["id"] for h in hits]
    assert [r[0] for r in shown] == [h["id"] for h in hits]
    assert [r[1] for r in shown] == [f"{h['score']:.4f}" for h in hits]
    assert [json.loads(r[2]) for r in shown] == [h["metadata"] for h in hits]
    assert "nearest neighbours" in b.evaluate("document.querySelector('#search-info').textContent")

    # A rebalance onto n3: its moves and their progress show while they run.
    status, plan = n1.call("POST", "/v1/cluster/rebalance", {"dry_run": False})
    assert status == 200 and plan["moves"], plan
    seen: set[str] = set()

    def moves_shown() -> set[str]:
        seen.update(api_moves(n1))
        return dom_moves(b)

    shown_moves = wait_until(moves_shown, 30, "a move on the dashboard")
    shot = tmp_path / "dashboard.png"
    b.screenshot(shot)
    seen.update(api_moves(n1))
    assert shown_moves <= seen, (shown_moves, seen)
    assert all(m.split(" → ")[1] == "n3" for m in shown_moves)
    assert b.evaluate("document.querySelectorAll('.cell.move-to').length") >= 1

    # Once done, the dashboard shows the balanced map and no move.
    wait_until(lambda: not api_moves(n1), 120, "the rebalance to finish")
    balanced = {"n1": "4", "n2": "4", "n3": "4"}
    wait_until(lambda: not dom_moves(b) and rows(b, "members", "member", "held") == balanced,
               20, "the dashboard to show the balanced map")
    totals = dict(b.evaluate(
        "[...document.querySelectorAll('[data-shards=wordnet] tr[data-node]')].map(tr =>"
        " [tr.dataset.node, tr.querySelector('.total').textContent])"))
    assert totals == balanced
    assert shot.stat().st_size > 20_000
    if os.environ.get("AQUILA_SCREENSHOT_DIR"):
        for name in ("dashboard.png", "key-prompt.png"):
            shutil.copy(tmp_path / name, Path(os.environ["AQUILA_SCREENSHOT_DIR"]) / name)


def _post(node: NodeProc, path: str, body: Any, rid: str) -> tuple[int, Any, str]:
    req = urllib.request.Request(
        node.url + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
                 "X-Request-Id": rid})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read()), resp.headers["X-Request-Id"]


def lines_with(node: NodeProc, rid: str) -> list[dict[str, Any]]:
    out = []
    for line in node.log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("request_id") == rid:
            out.append(event)
    return out


def test_one_request_id_across_the_nodes_it_reached(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    rid = "trace-" + secrets.token_hex(6)
    vec = load_sample().base[3].tolist()
    # Through n3, which holds none of the 6 shards or 4 of them (before or after the other
    # test's rebalance): a peer always has a part of this search.
    status, res, echoed = _post(n3, "/v1/collections/wordnet/search", {"vector": vec, "k": 5}, rid)
    assert status == 200 and echoed == rid and not res["partial"]

    # The coordinator's line for the request, and a peer's line for its part of the fan-out.
    def found() -> dict[str, list[dict[str, Any]]] | None:
        got = {n.settings["node_id"]: lines_with(n, rid) for n in (n1, n2, n3)}
        peers = [n for n in ("n1", "n2") if any(
            e.get("route") == "/internal/v1/collections/{name}/search" for e in got[n])]
        return got if peers and got["n3"] else None

    got = wait_until(found, 10, f"{rid} in the logs of n3 and a peer")
    public = [e for e in got["n3"] if e.get("event") == "request"]
    assert [(e["method"], e["route"], e["status"]) for e in public] == [
        ("POST", "/v1/collections/{name}/search", 200)]
    assert all(e["node"] == n for n, events in got.items() for e in events)
    # Every one of these lines is one JSON event; none of them carries another request's id.
    for node in (n1, n2, n3):
        for line in node.log_path.read_text(errors="replace").splitlines():
            if rid in line:
                assert json.loads(line)["request_id"] == rid

    # A write through n2 reaches the replicas of its shards under the id n2 made for it.
    status, body, made = _post(n2, "/v1/collections/wordnet/documents", {"documents": [
        {"id": "traced-doc", "vector": vec, "metadata": {"pos": "noun"}}]}, "bad id!")
    assert status == 200 and made != "bad id!"
    wait_until(lambda: sum(1 for n in (n1, n2, n3) if lines_with(n, made)) >= 2, 10,
               f"{made} in two nodes' logs")
