"""What an operator sees of one node, in-process: request ids, the log's lines, the metrics,
the dashboard's files and the OpenAPI description's security and strictness."""

from __future__ import annotations

import asyncio
import fnmatch
import io
import json
import logging
import re
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from aquila.cluster.model import request_id
from aquila.cluster.model.errors import Unavailable
from aquila.node import logs
from aquila.node.config import NodeConfig
from aquila.node.http.dashboard import CSP, FILES, UI_DIR
from aquila.node.http.openapi import openapi_document
from aquila.node.storage import heap
from tests.conftest import (
    Node,
    Samples,
    StartNode,
    expect_error,
    metric_samples,
    ok_json,
    wait_for,
)
from tests.conftest import metric_value as value

# -- request ids ----------------------------------------------------------------------------


async def test_every_answer_carries_a_request_id(node: Node) -> None:
    resp = await node.client.get("/v1/collections")
    made = resp.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made)
    resp = await node.client.get("/v1/collections", headers={"X-Request-Id": "trace-1.A_b"})
    assert resp.headers["X-Request-Id"] == "trace-1.A_b"
    resp = await node.client.get("/nope", headers={"X-Request-Id": "err-path"})
    await expect_error(resp, 404, "not_found")
    assert resp.headers["X-Request-Id"] == "err-path"
    # Ill-formed or unbounded: replaced, never echoed (it lands in logs and headers).
    for bad in ("a" * 65, "has space", "semi;colon", "new\\nline", "ünï", ""):
        resp = await node.client.get("/v1/collections", headers={"X-Request-Id": bad})
        got = resp.headers["X-Request-Id"]
        assert got != bad and request_id.valid(got), (bad, got)


@pytest.mark.parametrize("raw", ["a", "A-z_0.9", "x" * 64])
def test_valid_request_ids(raw: str) -> None:
    assert request_id.valid(raw)


@pytest.mark.parametrize("raw", ["", "x" * 65, "a b", "a\n", "a/b", "a:b", None, 5, "é"])
def test_invalid_request_ids(raw: Any) -> None:
    assert not request_id.valid(raw)


# -- log lines ------------------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, logging.Handler]]:
    """The node's log handler (as `logs.configure` sets it up) writing to a buffer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logs._context)
    yield out, handler
    logs.set_node("")


def _emit(handler: logging.Handler, fmt: logging.Formatter, level: int, msg: str,
          *args: Any, exc: BaseException | None = None, **extra: Any) -> None:
    handler.setFormatter(fmt)
    logger = logging.getLogger("aquila.test")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        if exc is not None:
            try:
                raise exc
            except BaseException:
                logger.log(level, msg, *args, exc_info=True, extra=extra)
        else:
            logger.log(level, msg, *args, extra=extra)
    finally:
        logger.removeHandler(handler)


def test_json_lines(captured: tuple[io.StringIO, logging.Handler]) -> None:
    out, handler = captured
    logs.set_node("n7")
    token = request_id.current.set("abc123")
    try:
        _emit(handler, logs.JsonFormatter(), logging.INFO, "moved %s/%d", "c", 3,
              event="move_stage", stage="copy")
        _emit(handler, logs.JsonFormatter(), logging.ERROR, "boom\nsecond", exc=KeyError("k"))
    finally:
        request_id.current.reset(token)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # one line per event, the traceback included
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "moved c/3" and first["level"] == "info"
    assert (first["node"], first["request_id"]) == ("n7", "abc123")
    assert (first["event"], first["stage"]) == ("move_stage", "copy")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["msg"] == "boom\nsecond" and "KeyError" in second["exc"]  # a bug: traceback


def test_text_lines_stay_on_one_line(captured: tuple[io.StringIO, logging.Handler]) -> None:
    out, handler = captured
    _emit(handler, logs.TextFormatter(), logging.WARNING, "two\nlines", exc=ValueError("x"),
          peer="n2")
    text = out.getvalue()
    assert text.count("\n") == 1
    assert "two\\nlines" in text and "peer=n2" in text and "ValueError" in text


@pytest.mark.parametrize("exc", [Unavailable("node n2 did not answer"), TimeoutError(),
                                 BadHttpMessage("Invalid header value char")])
def test_expected_failures_have_no_traceback(
    captured: tuple[io.StringIO, logging.Handler], exc: BaseException,
) -> None:
    out, handler = captured
    _emit(handler, logs.JsonFormatter(), logging.ERROR, "request failed", exc=exc)
    line = json.loads(out.getvalue())
    assert "exc" not in line and "Traceback" not in out.getvalue()
    assert line["level"] == "warning"
    assert line["msg"].startswith("request failed: " + type(exc).__name__)


async def test_each_request_has_one_access_line(
    node: Node, caplog: pytest.LogCaptureFixture,
) -> None:
    """One line per request, at info for a client's and debug for a probe: its method, path,
    route, status, time and id, for an answer, a failure and an unmatched path alike."""
    await node.create("c", dim=2)
    caplog.set_level(logging.DEBUG, logger="aquila.node.http.access")
    caplog.handler.addFilter(logs._context)  # as the node's handler: the request's id
    caplog.clear()
    search = "/v1/collections/c/search"
    resp = await node.client.post(search, json={"vector": [1, 2]},
                                  headers={"X-Request-Id": "line-1"})
    assert resp.status == 200
    resp = await node.client.post(search, json={"vector": [1]})
    await expect_error(resp, 400, "dimension_mismatch")
    made = resp.headers["X-Request-Id"]
    await expect_error(await node.client.get("/nope"), 404, "not_found")
    assert (await node.client.get("/healthz")).status == 200
    lines = [r for r in caplog.records if r.name == "aquila.node.http.access"]
    got = [(r.levelno, r.method, r.route, r.status, getattr(r, "event", None))  # type: ignore[attr-defined]
           for r in lines]
    route = "/v1/collections/{name}/search"
    assert got == [(logging.INFO, "POST", route, 200, "request"),
                   (logging.INFO, "POST", route, 400, "request"),
                   (logging.INFO, "GET", "unmatched", 404, "request"),
                   (logging.DEBUG, "GET", "/healthz", 200, "request")]
    assert lines[0].getMessage().startswith(f"POST {search} 200 ")
    assert all(isinstance(r.ms, float) and r.ms >= 0 for r in lines)  # type: ignore[attr-defined]
    # Stamped with the request's id (the client's, or the one made for it).
    assert [getattr(r, "request_id", None) for r in lines[:2]] == ["line-1", made]
    caplog.handler.removeFilter(logs._context)


class _Writes(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


async def test_the_loops_lines_are_written_once_its_turn_ends() -> None:
    stream = _Writes()
    handler = logs.TurnHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    logger = logging.getLogger("aquila.test.turn")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.info("one")
        logger.debug("two")
        assert stream.writes == []  # the turn goes on
        await asyncio.sleep(0)
        assert len(stream.writes) == 1  # both at once, in order
        assert [line.rsplit(" ", 1)[1] for line in stream.writes[0].splitlines()] == [
            "one", "two"]
        # A warning is written at once, after the lines still waiting.
        logger.info("three")
        logger.warning("four")
        assert len(stream.writes) == 2 and stream.writes[1].count("\n") == 2
        assert stream.writes[1].index("three") < stream.writes[1].index("four")
        # Another thread's line is written at once, as is what waits when flushed.
        logger.info("five")
        await asyncio.to_thread(logger.info, "six")
        assert "five" in stream.writes[2] and "six" in stream.writes[2]
        logger.info("seven")
        handler.flush()
        assert "seven" in stream.writes[3]
        await asyncio.sleep(0)  # the turn's flush finds nothing left
        assert len(stream.writes) == 4
        assert [line.rsplit(" ", 1)[1] for line in stream.getvalue().splitlines()] == [
            "one", "two", "three", "four", "five", "six", "seven"]
    finally:
        logger.removeHandler(handler)


def test_a_loop_closed_before_its_turn_ended_leaves_no_later_line_waiting() -> None:
    """A line of a loop that closes before its turn ends waits (its flush never runs): the
    lines of the next loop on the handler are written when that one's turn ends all the
    same, not kept until a warning or another thread's line comes (never, in a quiet
    process: each kept in memory meanwhile)."""
    stream = _Writes()
    handler = logs.TurnHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    logger = logging.getLogger("aquila.test.turn.loops")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    async def next_loop() -> None:
        logger.info("second loop")
        await asyncio.sleep(0)  # the turn ends
        await asyncio.sleep(0)

    first = asyncio.new_event_loop()
    try:
        first.call_soon(logger.info, "first loop")
        first.call_soon(first.stop)  # the loop's last turn: its flush is still to run
        first.run_forever()
    finally:
        first.close()
    try:
        second = asyncio.new_event_loop()
        try:
            second.run_until_complete(next_loop())
            text = stream.getvalue()
            assert "second loop" in text, stream.writes
            assert text.index("first loop") < text.index("second loop")
        finally:
            second.close()
    finally:
        logger.removeHandler(handler)


def test_log_format_is_checked() -> None:
    with pytest.raises(ValueError, match="log_format"):
        NodeConfig(log_format="xml").validate()
    with pytest.raises(ValueError):
        logs.configure("INFO", "xml")


# -- metrics --------------------------------------------------------------------------------


async def _scrape(node: Node) -> Samples:
    return metric_samples(await (await node.client.get("/metrics")).text())


async def test_metrics_answer_questions(node: Node) -> None:
    before = await _scrape(node)
    await node.create("m", dim=4, index="ivf_flat", shards=2)
    docs = [{"id": f"d{i}", "vector": [i % 7, i % 5, i % 3, 1], "metadata": {"i": i}}
            for i in range(200)]
    await node.upsert("m", docs)
    await node.wait_trained("m")
    await node.search("m", vector=[1, 2, 3, 4], k=3)
    await node.client.get("/v1/collections/nope")
    after = await wait_for(_scrape_when_lag_measured(node), what="the event-loop lag measured")
    route = "/v1/collections/{name}/search"
    assert value(after, "aquila_http_requests_total", method="POST", route=route,
                 status="200") == 1
    assert value(after, "aquila_http_request_seconds_count", route=route) == 1
    assert value(after, "aquila_http_requests_total", method="GET",
                 route="/v1/collections/{name}", status="404") == 1
    assert value(after, "aquila_searches_total") - value(before, "aquila_searches_total") == 1
    assert value(after, "aquila_documents", collection="m") == 200
    assert value(after, "aquila_index_vectors", collection="m") == 200
    assert value(after, "aquila_index_state", collection="m", state="trained") == 1
    assert value(after, "aquila_index_state", collection="m", state="buffering") == 0
    assert value(after, "aquila_index_training_seconds_count", collection="m") >= 1
    assert value(after, "aquila_faiss_memory_bytes", collection="m") >= 200 * 4 * 4
    assert value(after, "aquila_rocksdb_memory_bytes", collection="m", kind="memtables") > 0
    assert value(after, "aquila_labels", collection="m", kind="given") == 200
    assert ("aquila_labels", frozenset({("collection", "m"), ("kind", "free")})) in after
    assert value(after, "aquila_labels", collection="m", kind="bitmap_bytes") > 0
    assert value(after, "aquila_members", state="alive") == 1
    if heap.malloc_figures():  # glibc: the process's C heap, allocated and kept free
        assert value(after, "aquila_malloc_bytes", kind="in_use") > 0
        assert ("aquila_malloc_bytes", frozenset({("kind", "free")})) in after
    for name in ("aquila_search_partial_total", "aquila_search_hedges_total",
                 "aquila_write_degraded_total", "aquila_hints_pending",
                 "aquila_repair_records_total", "aquila_rebalance_bytes_total",
                 "aquila_heal_moves_total"):
        assert (name, frozenset()) in after, name  # present from the first scrape, at 0


def _scrape_when_lag_measured(node: Node) -> Any:
    async def scrape() -> Any:
        samples = await _scrape(node)
        return samples if value(samples, "aquila_event_loop_lag_seconds_count") >= 2 else None

    return scrape


# -- the dashboard's files ------------------------------------------------------------------


async def test_dashboard_is_open_and_locked_down(start_node: StartNode) -> None:
    node = await start_node(api_key="k1", read_key="k2")
    resp = await node.client.get("/ui")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"] == CSP
    assert "default-src 'self'" in CSP and "unsafe" not in CSP
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    html = await resp.text()
    assert '<script src="/ui/app.js"' in html
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        resp = await node.client.get(f"/ui/{name}")
        assert (resp.status, resp.content_type) == (200, kind), name
        assert resp.headers["Content-Security-Policy"] == CSP
    await expect_error(await node.client.get("/ui/secret.txt"), 404, "not_found")
    await expect_error(await node.client.get("/ui/..%2fapi.py"), 404, "not_found")
    # The node's bare address, opened in a browser, leads to it (no key asked).
    resp = await node.client.get("/", allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (302, "/ui")
    assert (await node.client.get("/")).status == 200  # followed
    # The data behind it still needs the key.
    await expect_error(await node.client.get("/v1/cluster"), 401, "unauthorized")


def test_dashboard_files_run_under_the_policy() -> None:
    """Nothing inline (the policy would block it), nothing from elsewhere, no HTML built from
    strings in the script (everything from the API is set as text)."""
    html = (UI_DIR / "index.html").read_text()
    js = (UI_DIR / "app.js").read_text()
    css = (UI_DIR / "style.css").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
    assert "<style" not in html and " style=" not in html
    assert re.findall(r"\son[a-z]+=", html) == []
    for text in (html, js, css):
        assert re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text) == []
        assert "@import" not in text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js
    assert "sessionStorage" in js and "localStorage" not in js  # the key: this tab only


def test_dashboard_files_ship_with_the_package() -> None:
    """`pip install .` must carry every file of the page (package data, not code)."""
    conf = tomllib.loads((UI_DIR.parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "aquila.node.http.ui" in conf["packages"]
    patterns = conf["package-data"]["aquila.node.http.ui"]
    files = sorted(p.name for p in UI_DIR.iterdir())
    assert files == sorted(FILES) == ["app.js", "index.html", "style.css"]
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)


async def test_dashboard_key_travels_only_as_a_bearer_header() -> None:
    js = (UI_DIR / "app.js").read_text()
    assert "headers.Authorization = `Bearer ${key}`" in js
    # The neighbours of a stored document are asked by its id (the server's search by id).
    assert 'return { id, k, include: ["metadata"] };' in js


# -- the OpenAPI description ---------------------------------------------------------------


def test_security_follows_the_configuration() -> None:
    open_doc = openapi_document(NodeConfig())
    assert "security" not in open_doc
    assert "securitySchemes" not in open_doc["components"]
    for ops in open_doc["paths"].values():
        for op in ops.values():
            assert "401" not in op["responses"] and "403" not in op["responses"]
    keyed = openapi_document(NodeConfig(api_key="k", read_key="r"))
    assert keyed["security"] == [{"bearer": []}]
    assert keyed["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    paths = keyed["paths"]
    for path in ("/", "/healthz", "/readyz", "/ui", "/ui/{file}"):
        assert paths[path]["get"]["security"] == []
        assert "401" not in paths[path]["get"]["responses"]
    search = paths["/v1/collections/{name}/search"]["post"]["responses"]
    assert "401" in search and "403" not in search  # the read key may search
    put = paths["/v1/collections/{name}"]["put"]["responses"]
    assert {"401", "403", "409", "413"} <= set(put)
    api_only = openapi_document(NodeConfig(api_key="k"))["paths"]
    assert "403" not in api_only["/v1/collections/{name}"]["put"]["responses"]


async def test_served_description_matches_the_node(start_node: StartNode) -> None:
    node = await start_node(api_key="k")
    headers = {"Authorization": "Bearer k"}
    doc = await ok_json(await node.client.get("/openapi.json", headers=headers))
    assert doc["security"] == [{"bearer": []}]
    schemas = doc["components"]["schemas"]
    assert schemas["Search"]["properties"]["k"]["maximum"] == 1000
    assert schemas["Search"]["properties"]["timeout_ms"]["maximum"] == 600_000
    assert schemas["CollectionSettings"]["properties"]["replication"]["maximum"] == 16
    assert schemas["CollectionSettings"]["additionalProperties"] is False


# Requests the description refuses, which the server must refuse too (the fuzz test finds
# such cases at random; these are the ones found once, kept as regressions).
REFUSED: list[tuple[str, str, Any]] = [
    ("POST", "/v1/collections/c/search", {"vector": [0, 0], "include": [{}]}),
    ("POST", "/v1/collections/c/search", {"vector": [0, 0], "include": [["metadata"]]}),
    ("POST", "/v1/collections/c/search", {"vector": [0, 0], "surprise": 1}),
    ("POST", "/v1/collections/c/search", {"vector": [0, 0], "vectors": [[0, 0]]}),
    ("POST", "/v1/collections/c/search", {"vector": [0, 0], "filter": {"must": [{"key": "a"}]}}),
    ("PUT", "/v1/collections/d", {"dim": 2, "index": {"nlist": 0}}),
    ("PUT", "/v1/collections/d", {"dim": 2, "replication": 17}),
    ("PUT", "/v1/collections/d", {"dim": 2, "index": {"kind": "flat"}}),
    ("POST", "/v1/collections/c/documents", {"documents": [{"vector": [0, 0], "extra": 1}]}),
    ("GET", "/v1/collections/c/documents/a?vector=yes", None),
    ("POST", "/v1/collections/c/search", {"id": "a", "vector": [0, 0]}),
    ("POST", "/v1/collections/c/search", {"ids": []}),
    ("POST", "/v1/collections/c/scroll", {"include": [{}]}),
    ("POST", "/v1/collections/c/scroll", {"limit": 1001}),
    ("POST", "/v1/collections/c/scroll", {"cursor": ""}),
    ("POST", "/v1/collections/c/count", {"limit": 5}),
    ("POST", "/v1/collections/c/documents", {"vectors_b64": "AAAA", "extra": 1}),
    ("POST", "/v1/collections/c/documents", {"vectors_b64": "AA=A"}),
    ("POST", "/v1/collections/c/documents", {"ids": ["x"]}),
]


@pytest.mark.parametrize(("method", "path", "body"), REFUSED)
async def test_what_the_description_refuses_the_server_refuses(
    node: Node, method: str, path: str, body: Any
) -> None:
    await node.create("c", dim=2)
    await node.upsert("c", [{"id": "a", "vector": [1, 0]}])
    resp = await node.client.request(method, path, json=body)
    await expect_error(resp, 400, "bad_request")
    assert [d["name"] for d in (await ok_json(await node.client.get("/v1/collections")))
            ["collections"]] == ["c"]
    await asyncio.sleep(0)


async def test_the_heap_count_is_made_off_the_event_loop() -> None:
    """glibc's count of the heap walks every free chunk (0.1 s a million of them): a scrape
    makes it on a thread, and the render shows what that thread read."""
    import threading

    from aquila.node.metrics import Metrics

    where: list[int] = []

    def figures() -> dict[str, int]:
        where.append(threading.get_ident())
        return {"in_use": 7, "free": 3}

    m = Metrics()
    m.watch_heap(figures)
    await m.refresh()
    text = m.render()[0].decode()
    assert where and threading.get_ident() not in where
    assert 'aquila_malloc_bytes{kind="in_use"} 7.0' in text
    assert 'aquila_malloc_bytes{kind="free"} 3.0' in text
