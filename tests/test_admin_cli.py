"""The admin command line (`aquila status|join|rebalance|leave`), run as a real subprocess
against real `aquila serve` processes, plus the `--wait` loop over a fake node and clock."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from aquila.cluster.admin import AdminError, http_error_line, move_progress, wait_for_moves
from tests.conftest import free_port
from tests.procs import NodeProc, http, wait_until


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def assert_one_line_error(self) -> None:
        assert self.code != 0, self
        assert "Traceback" not in self.err + self.out, self
        lines = self.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("aquila: "), self


def aquila(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Run:
    # The CLI must not pick up a key or anything else from the test runner's environment.
    base = {k: v for k, v in os.environ.items() if not k.startswith("AQUILA_")}
    proc = subprocess.run(
        [sys.executable, "-m", "aquila.node", *args], capture_output=True, text=True,
        env={**base, **(env or {})}, timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def skip_if_route_missing(run: Run, route: str) -> None:
    """The lead is still writing leave/rebalance: a node without the route answers 404."""
    if run.code != 0 and "not_found" in run.err and route in run.err:
        pytest.skip(f"POST {route} is not served yet (404): {run.err.strip()}")


def start(tmp_path: Path, name: str, **settings: Any) -> NodeProc:
    """A ready node; stopped again if it never gets ready, so no process outlives the test."""
    n = NodeProc(tmp_path / name, port=free_port(), **settings)
    # NodeProc.wait_ready polls /readyz without a key, which a keyed node answers with 401.
    key = settings.get("api_key")
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def ready() -> bool:
        if n.proc is not None and n.proc.poll() is not None:
            raise RuntimeError(f"node exited with {n.proc.returncode}: {n.log_tail()}")
        return http("GET", n.url + "/readyz", timeout=2, headers=headers)[0] == 200

    try:
        n.start(wait_ready=False)
        wait_until(ready, 30, f"{n.addr} ready")
    except BaseException:
        n.stop()
        raise
    return n


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = start(tmp_path_factory.mktemp("admin"), "node")
    try:
        assert n.call("PUT", "/v1/collections/books", {"dim": 4, "shards": 4})[0] == 201
        docs = [{"id": f"d{i}", "vector": [float(i), 1.0, 2.0, 3.0]} for i in range(7)]
        assert n.call("POST", "/v1/collections/books/documents", {"documents": docs})[0] == 200
        yield n
    finally:
        n.stop()


def node_id(n: NodeProc) -> str:
    status, body = n.call("GET", "/v1/cluster")
    assert status == 200, body
    return str(body["node"]["id"])


# -- status -----------------------------------------------------------------------------------
def test_status_shows_members_and_collections(node: NodeProc) -> None:
    run = aquila("status", "--node", node.addr)
    assert run.code == 0, run
    assert run.err == ""
    assert f"{node_id(node)} (this node)" in run.out
    assert node.addr in run.out
    assert "alive" in run.out
    books = next(line for line in run.out.splitlines() if "books" in line)
    cells = [c.strip() for c in books.strip("│ ").split("│")]
    # name, dim, metric, shards, replication, count, shards per node
    assert cells[:6] == ["books", "4", "l2", "4", "1", "7"], cells
    assert cells[6] == f"{node_id(node)} 4"
    assert "\x1b[" not in run.out  # no colour codes when stdout is not a terminal


def test_status_json_is_the_raw_answers(node: NodeProc) -> None:
    run = aquila("status", "--node", node.addr, "--json")
    assert run.code == 0, run
    doc = json.loads(run.out)
    assert doc["cluster"]["node"]["id"] == node_id(node)
    assert [m["state"] for m in doc["cluster"]["members"]] == ["alive"]
    assert len(doc["shards"]["collections"]["books"]) == 4
    assert [(c["name"], c["count"]) for c in doc["collections"]] == [("books", 7)]


# -- errors -----------------------------------------------------------------------------------
def test_unreachable_node_is_one_line() -> None:
    addr = f"127.0.0.1:{free_port()}"  # nobody listens there
    run = aquila("status", "--node", addr)
    run.assert_one_line_error()
    assert run.err.strip() == f"aquila: cannot reach {addr}: connection refused"


@pytest.mark.parametrize("args", [
    ["status", "--node", "localhost"],
    ["status", "--node", "127.0.0.1:99999"],
    ["rebalance", "--node", ":8470"],
    ["join", "--node", "127.0.0.1:8470", "--seeds", "nope"],
])
def test_bad_address_exits_2_with_usage(args: list[str]) -> None:
    run = aquila(*args)
    assert run.code == 2, run
    assert run.err.startswith(f"usage: aquila {args[0]}"), run
    assert "expected host:port" in run.err
    assert "Traceback" not in run.err


def test_join_with_unreachable_seed_is_one_line(node: NodeProc) -> None:
    run = aquila("join", "--node", node.addr, "--seeds", f"127.0.0.1:{free_port()}")
    run.assert_one_line_error()
    assert run.err.startswith("aquila: unavailable: "), run


def test_api_key(tmp_path: Path) -> None:
    n = start(tmp_path, "keyed", api_key="k")
    try:
        without = aquila("status", "--node", n.addr)
        without.assert_one_line_error()
        assert without.err.startswith("aquila: unauthorized: "), without
        assert aquila("status", "--node", n.addr, "--api-key", "wrong").code != 0
        with_flag = aquila("status", "--node", n.addr, "--api-key", "k")
        assert with_flag.code == 0 and "alive" in with_flag.out, with_flag
        from_env = aquila("status", "--node", n.addr, env={"AQUILA_API_KEY": "k"})
        assert from_env.code == 0 and "alive" in from_env.out, from_env
    finally:
        n.stop()


def test_every_command_sends_the_key(tmp_path: Path) -> None:
    """A read key lets `status` through and gets every acting command a one-line 403; the
    key is sent by every command, from the flag or from AQUILA_API_KEY."""
    n = start(tmp_path, "ro", api_key="k", read_key="r")
    try:
        assert aquila("status", "--node", n.addr, "--api-key", "r").code == 0
        acting = [["join", "--seeds", "127.0.0.1:1"], ["rebalance"], ["rebalance", "--dry-run"],
                  ["leave"]]
        for args in acting:
            for run in (aquila(*args, "--node", n.addr, "--api-key", "r"),
                        aquila(*args, "--node", n.addr, env={"AQUILA_API_KEY": "r"})):
                run.assert_one_line_error()
                assert run.err.startswith("aquila: forbidden: "), (args, run)
            run = aquila(*args, "--node", n.addr)
            run.assert_one_line_error()
            assert run.err.startswith("aquila: unauthorized: "), (args, run)
        assert aquila("rebalance", "--dry-run", "--node", n.addr, "--api-key", "k").code == 0
    finally:
        n.stop()


# -- rebalance and leave on one node ----------------------------------------------------------------
def test_rebalance_dry_run_on_one_node_is_balanced(node: NodeProc) -> None:
    run = aquila("rebalance", "--node", node.addr, "--dry-run")
    skip_if_route_missing(run, "/v1/cluster/rebalance")
    assert run.code == 0, run
    assert "already balanced" in run.out.lower(), run


def test_rebalance_wait_on_one_node_returns_at_once(node: NodeProc) -> None:
    run = aquila("rebalance", "--node", node.addr, "--wait", "--timeout", "20")
    skip_if_route_missing(run, "/v1/cluster/rebalance")
    assert run.code == 0, run
    assert "already balanced" in run.out.lower(), run


def test_leave_on_one_node(tmp_path: Path) -> None:
    # Its own node: leaving would spoil the shared one.
    n = start(tmp_path, "leaver")
    try:
        assert n.call("PUT", "/v1/collections/solo", {"dim": 2, "shards": 2})[0] == 201
        refused = aquila("leave", "--node", n.addr)
        skip_if_route_missing(refused, "/v1/cluster/leave")
        refused.assert_one_line_error()  # the last holder of shards may not go
        assert refused.err.startswith("aquila: unavailable: "), refused
        assert n.call("DELETE", "/v1/collections/solo")[0] == 200
        left = aquila("leave", "--node", n.addr)
        assert left.code == 0 and "held no shards" in left.out and left.err == "", left
    finally:
        n.stop()


def test_two_nodes_join_rebalance_wait_and_leave(tmp_path: Path) -> None:
    a, b = start(tmp_path, "a"), start(tmp_path, "b")
    try:
        assert a.call("PUT", "/v1/collections/books", {"dim": 4, "shards": 8})[0] == 201
        docs = [{"id": f"d{i}", "vector": [float(i), 1.0, 2.0, 3.0]} for i in range(500)]
        assert a.call("POST", "/v1/collections/books/documents", {"documents": docs})[0] == 200
        ida, idb = node_id(a), node_id(b)

        joined = aquila("join", "--node", b.addr, "--seeds", a.addr)
        assert joined.code == 0 and "2 members" in joined.out, joined
        wait_until(lambda: len(a.call("GET", "/v1/cluster")[1]["members"]) == 2, 10, "2 members")

        plan = aquila("rebalance", "--node", a.addr, "--dry-run")
        skip_if_route_missing(plan, "/v1/cluster/rebalance")
        assert plan.code == 0 and "Dry run" in plan.out and plan.out.count(idb) == 4, plan
        done = aquila("rebalance", "--node", a.addr, "--wait", "--timeout", "30")
        assert done.code == 0, done
        assert "Done: 4 moves applied" in done.out, done
        status = aquila("status", "--node", b.addr)
        assert f"{ida} 4" in status.out and f"{idb} 4" in status.out, status

        left = aquila("leave", "--node", b.addr, "--timeout", "30")
        assert left.code == 0 and "Handed over (4 moves)" in left.out, left
        after = json.loads(aquila("status", "--node", a.addr, "--json").out)
        states = {m["id"]: m["state"] for m in after["cluster"]["members"]}
        assert states[ida] == "alive" and states[idb] == "left", states
        assert [(c["name"], c["count"]) for c in after["collections"]] == [("books", 500)]
    finally:
        a.stop()
        b.stop()


# -- the pieces, without a node -----------------------------------------------------------------
MOVES = [
    {"collection": "c", "shard": 0, "from": "a", "to": "b"},
    {"collection": "c", "shard": 1, "from": "a", "to": "b"},
]


def shard_map(*entries: tuple[list[str], dict[str, Any] | None]) -> dict[str, Any]:
    return {"epoch": 1, "collections": {"c": [
        {"shard": i, "replicas": reps, "moving": moving} for i, (reps, moving) in enumerate(entries)
    ]}}


class FakeNode:
    """Answers GET /v1/cluster/shards from a script; the last answer repeats."""

    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.answers = answers
        self.calls = 0

    def get(self, path: str) -> Any:
        assert path == "/v1/cluster/shards"
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]

    def post(self, path: str, body: Any, timeout_s: float | None = None) -> Any:
        raise AssertionError("the wait loop only reads")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=120)


def test_move_progress_counts_partial_and_applied_moves() -> None:
    half = {"from": "a", "to": "b", "progress": 0.5}
    p = move_progress(MOVES, shard_map((["a"], half), (["b"], None)))
    assert (p.done, p.applied, p.moving) == (1.5, 1, 1)
    p = move_progress(MOVES, shard_map((["a"], None), (["a"], None)))
    assert (p.done, p.applied, p.moving) == (0.0, 0, 0)


def test_wait_follows_moves_until_all_applied() -> None:
    fake, clock = FakeNode([
        shard_map((["a"], None), (["a"], None)),  # not started yet: keep waiting
        shard_map((["a"], {"from": "a", "to": "b", "progress": 0.3}), (["a"], None)),
        shard_map((["b"], None), (["a"], {"from": "a", "to": "b", "progress": 0.9})),
        shard_map((["b"], None), (["b"], None)),
    ]), FakeClock()
    wait_for_moves(fake, quiet_console(), MOVES, 60, now=clock.now, sleep=clock.sleep)
    assert fake.calls == 4 and clock.t == 1.5


def test_wait_reports_moves_that_never_happen() -> None:
    fake, clock = FakeNode([shard_map((["b"], None), (["a"], None))]), FakeClock()
    with pytest.raises(AdminError, match="1 of 2 moves did not complete"):
        wait_for_moves(fake, quiet_console(), MOVES, 60, now=clock.now, sleep=clock.sleep)
    assert 5 <= clock.t < 7


def test_wait_gives_up_at_the_deadline() -> None:
    stuck = shard_map((["a"], {"from": "a", "to": "b", "progress": 0.1}), (["a"], None))
    fake, clock = FakeNode([stuck]), FakeClock()
    with pytest.raises(AdminError, match="still moving after 30 s"):
        wait_for_moves(fake, quiet_console(), MOVES, 30, now=clock.now, sleep=clock.sleep)
    assert 30 <= clock.t < 31


@pytest.mark.parametrize(("status", "raw", "line"), [
    (401, b'{"error": {"code": "unauthorized", "message": "missing key"}}',
     "unauthorized: missing key"),
    (404, b'{"error": {"code": "not_found", "message": "Not Found"}}',
     "not_found: Not Found (POST /v1/cluster/leave; does this node support it?)"),
    (502, b"<html>bad gateway</html>", "HTTP 502 Bad Gateway from POST /v1/cluster/leave"),
])
def test_http_error_lines(status: int, raw: bytes, line: str) -> None:
    reason = {401: "Unauthorized", 404: "Not Found", 502: "Bad Gateway"}[status]
    assert http_error_line(status, reason, raw, "POST", "/v1/cluster/leave") == line
