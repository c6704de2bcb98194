"""Errors and failover over a mock transport: one class per code, which failures move to the
next node and which do not, the sticky node, and timeouts (also over a real socket)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Driver, FakeNodes, error, reply

import aquila_client as aq
from aquila_client import errors as errs
from aquila_client.nodes import base_url

CODES = [
    ("bad_request", 400, aq.BadRequest),
    ("dimension_mismatch", 400, aq.DimensionMismatch),
    ("invalid_vector", 400, aq.InvalidVector),
    ("unauthorized", 401, aq.Unauthorized),
    ("forbidden", 403, aq.Forbidden),
    ("not_found", 404, aq.NotFound),
    ("already_exists", 409, aq.AlreadyExists),
    ("payload_too_large", 413, aq.PayloadTooLarge),
    ("unavailable", 503, aq.Unavailable),
]
NODES = ["n1:1", "n2:1", "n3:1"]
OK_LIST: dict[str, Any] = {"collections": []}


@pytest.mark.parametrize("code, status, cls", CODES)
def test_one_class_per_error_code(db: Driver, fake: FakeNodes, code: str, status: int,
                                  cls: type[aq.AquilaError]) -> None:
    fake.on("n1:1", lambda r: error(status, code, f"the {code} message"))
    with pytest.raises(cls) as info:
        db.get_collection("docs")
    err = info.value
    assert type(err) is cls and isinstance(err, aq.AquilaError)
    assert (err.code, err.status, err.message, err.node) == (code, status, f"the {code} message",
                                                             "n1:1")
    assert code in str(err) and "n1:1" in str(err)


def test_every_contract_code_has_its_class() -> None:
    assert set(errs.ERRORS_BY_CODE) == {c for c, _, _ in CODES}
    assert {cls for _, _, cls in CODES} == set(errs.ERRORS_BY_CODE.values())


def test_unknown_code_and_bodies_without_the_contract_shape(db: Driver, fake: FakeNodes) -> None:
    fake.on("n1:1", lambda r: error(405, "method_not_allowed", "no"))
    with pytest.raises(aq.AquilaError) as info:
        db.get_collection("docs")
    assert type(info.value) is aq.AquilaError
    assert (info.value.code, info.value.status) == ("method_not_allowed", 405)
    fake.on("n1:1", lambda r: httpx.Response(404, text="<html>nope</html>"))
    with pytest.raises(aq.NotFound, match="without the contract's error body"):
        db.get_collection("docs")
    fake.on("n1:1", lambda r: httpx.Response(500, text="boom"))
    with pytest.raises(aq.AquilaError) as info:
        db.get_collection("docs")
    assert info.value.status == 500 and info.value.code == "http_500"


def test_a_reply_that_is_not_the_contract_is_a_transport_error(db: Driver,
                                                               fake: FakeNodes) -> None:
    fake.on("n1:1", lambda r: httpx.Response(200, text="not json"))
    with pytest.raises(aq.TransportError, match="JSON object"):
        db.get_collection("docs")
    fake.answer({"results": [[{"id": "a"}]]})  # no score
    with pytest.raises(aq.TransportError, match="score"):
        db.search("docs", np.ones(2))
    fake.answer({"deleted": "many"})
    with pytest.raises(aq.TransportError, match="contract's shape"):
        db.delete_documents("docs", ["a"])


# -- failover ------------------------------------------------------------------------------
def test_connection_refused_moves_to_the_next_node_and_sticks(make_driver: Any,
                                                              fake: FakeNodes) -> None:
    fake.answer(OK_LIST, node="n2:1")
    fake.answer(OK_LIST, node="n3:1")
    db = make_driver(NODES)  # n1 has no handler: connection refused
    assert db.list_collections() == []
    assert fake.nodes_seen() == ["n1:1", "n2:1"]
    assert db.client.current_node == "http://n2:1"
    db.list_collections()  # n2 is tried first now: the dead node costs nothing more
    assert fake.nodes_seen() == ["n1:1", "n2:1", "n2:1"]


def test_503_moves_on_and_4xx_does_not(make_driver: Any, fake: FakeNodes) -> None:
    fake.on("n1:1", lambda r: error(503, "unavailable", "not ready"))
    fake.on("n2:1", lambda r: error(404, "not_found", "no such collection"))
    fake.answer({"deleted": True}, node="n3:1")
    db = make_driver(NODES)
    with pytest.raises(aq.NotFound) as info:
        db.get_collection("docs")
    assert fake.nodes_seen() == ["n1:1", "n2:1"]  # n3 not asked: 404 is an answer
    assert [e.code for e in info.value.attempts] == ["unavailable", "not_found"]


def test_all_nodes_failing_raises_the_last_error_naming_every_node(make_driver: Any,
                                                                   fake: FakeNodes) -> None:
    for n in NODES:
        fake.on(n, lambda r: error(503, "unavailable", "shard 3 has no live replica"))
    db = make_driver(NODES)
    with pytest.raises(aq.Unavailable) as info:
        db.search("docs", np.ones(2), allow_partial=False)
    assert fake.nodes_seen() == NODES  # each node once, no more
    assert "no node could answer" in info.value.message
    for n in NODES:
        assert n in info.value.message
    assert len(info.value.attempts) == 3


def test_a_node_answer_wins_over_a_dead_node(make_driver: Any, fake: FakeNodes) -> None:
    fake.on("n1:1", lambda r: error(503, "unavailable", "shard 3 has no live replica"))
    db = make_driver(NODES)  # n2 and n3 refuse connections
    with pytest.raises(aq.Unavailable) as info:
        db.search("docs", np.ones(2), allow_partial=False)
    assert info.value.node == "n1:1" and info.value.status == 503
    assert [e.code for e in info.value.attempts] == ["unavailable", "transport", "transport"]


def test_all_nodes_down_is_a_transport_error(make_driver: Any, fake: FakeNodes) -> None:
    db = make_driver(NODES)
    with pytest.raises(aq.TransportError) as info:
        db.list_collections()
    assert not isinstance(info.value, aq.RequestTimeout)
    assert fake.nodes_seen() == NODES


def _read_timeout(r: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=r)


def test_an_upsert_is_retried_after_a_timeout_with_the_same_ids(make_driver: Any,
                                                                fake: FakeNodes) -> None:
    fake.on("n1:1", _read_timeout)
    fake.on("n2:1", lambda r: reply({"ids": [], "upserted": 4}))
    db = make_driver(NODES)
    db.upsert("docs", np.ones((4, 3)))  # ids generated by the client
    assert fake.nodes_seen() == ["n1:1", "n2:1"]
    assert fake.body(0) == fake.body(1)  # same ids, same vectors: idempotent


@pytest.mark.parametrize("exc", [httpx.RemoteProtocolError, httpx.ReadError,
                                 httpx.DecodingError, httpx.ConnectTimeout])
def test_any_request_failure_is_a_transport_error_and_reads_move_on(
    make_driver: Any, fake: FakeNodes, exc: type[httpx.RequestError]
) -> None:
    def fail(r: httpx.Request) -> httpx.Response:
        raise exc("broken", request=r)

    fake.on("n1:1", fail)
    db = make_driver(["n1:1"])
    with pytest.raises(aq.TransportError) as info:
        db.list_collections()
    assert info.value.status is None and "broken" in info.value.message
    assert isinstance(info.value, aq.RequestTimeout) == issubclass(exc, httpx.TimeoutException)
    fake.answer(OK_LIST, node="n2:1")
    assert make_driver(["n1:1", "n2:1"]).list_collections() == []


@pytest.mark.parametrize("method, args", [
    ("delete_collection", ("docs",)),
    ("delete_document", ("docs", "a")),
    ("rebalance", ()),
])
def test_non_idempotent_calls_are_not_repeated_after_an_ambiguous_failure(
    make_driver: Any, fake: FakeNodes, method: str, args: tuple[Any, ...]
) -> None:
    fake.on("n1:1", _read_timeout)
    fake.answer({"deleted": 1, "moves": []}, node="n2:1")
    db = make_driver(NODES)
    with pytest.raises(aq.RequestTimeout):
        getattr(db, method)(*args)
    assert fake.nodes_seen() == ["n1:1"]  # n1 may have done it: not sent again
    # ...but a refused connection (never sent) or a 503 (changed nothing) moves on.
    fake.seen.clear()
    fake.on("n1:1", lambda r: error(503, "unavailable", "not ready"))
    getattr(db, method)(*args)
    assert fake.nodes_seen() == ["n1:1", "n2:1"]
    fake.seen.clear()
    del fake.handlers["n1:1"]
    db.client._ring.current = 0
    getattr(db, method)(*args)
    assert fake.nodes_seen() == ["n1:1", "n2:1"]


def test_node_specific_calls_never_fail_over(make_driver: Any, fake: FakeNodes) -> None:
    for n in ("n2:1", "n3:1"):
        fake.answer({"status": "ok", "joined": 1, "members": 2, "moves": [], "left": True},
                    node=n)
    db = make_driver(NODES)
    for method, args in (("healthz", ()), ("readyz", ()), ("join", (["x:1"],)), ("leave", ())):
        with pytest.raises(aq.TransportError):
            getattr(db, method)(*args)
    assert fake.nodes_seen() == ["n1:1"] * 4
    fake.seen.clear()
    assert db.healthz(node="n3:1") is True
    db.leave(node="n3:1")
    assert fake.nodes_seen() == ["n3:1", "n3:1"]
    # A pinned node outside the list is fine: join a new node to the cluster.
    fake.answer({"joined": 1, "members": 4}, node="n9:1")
    assert db.join(["n1:1"], node="n9:1").members == 4
    fake.seen.clear()
    with pytest.raises(aq.TransportError):
        db.cluster(node="n1:1")
    assert fake.nodes_seen() == ["n1:1"]


def test_node_addresses() -> None:
    assert base_url("127.0.0.1:8470") == "http://127.0.0.1:8470"
    assert base_url(" https://db.example:443/ ") == "https://db.example:443"
    assert base_url("[::1]:8470") == "http://[::1]:8470"
    # A bare host is a node on Aquila's port; a URL keeps its scheme's.
    assert base_url("localhost") == "http://localhost:8470"
    assert base_url("[::1]") == "http://[::1]:8470"
    assert base_url("db.example/") == "http://db.example:8470"
    assert base_url("http://localhost") == "http://localhost"
    for bad in ("", "ftp://x:1", "http://x:1/path", "x:notaport", "http://:1"):
        with pytest.raises(ValueError):
            base_url(bad)
    with pytest.raises(ValueError):
        aq.Client([])
    c = aq.Client(["a:1", "a:1", "http://a:1", "b:2"])
    assert c.nodes == ["http://a:1", "http://b:2"]
    c.close()
    with pytest.raises(ValueError):
        aq.Client("a:1", timeout=0)


# -- timeouts over a real socket -----------------------------------------------------------
@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(5)
    for c in held:
        c.close()
    srv.close()


@pytest.fixture
def refused_addr() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there now
    return addr


def test_sync_timeout_then_failover_to_a_live_node(silent_server: str, refused_addr: str) -> None:
    live = _tiny_http_server()
    try:
        with aq.Client([silent_server, refused_addr], timeout=0.3, trust_env=False) as c:
            t0 = time.monotonic()
            with pytest.raises(aq.RequestTimeout) as info:
                c.healthz()  # pinned: the silent node's timeout is the answer
            assert 0.25 < time.monotonic() - t0 < 5
            assert info.value.node == silent_server
        with aq.Client([silent_server, refused_addr, live.addr], timeout=0.3,
                       trust_env=False) as c:
            assert c.list_collections() == []
            assert c.current_node == f"http://{live.addr}"
    finally:
        live.close()


async def test_async_timeout_then_failover(silent_server: str, refused_addr: str) -> None:
    live = _tiny_http_server()
    try:
        async with aq.AsyncClient([silent_server, refused_addr, live.addr], timeout=0.3,
                                  trust_env=False) as c:
            t0 = time.monotonic()
            assert await c.list_collections() == []
            assert time.monotonic() - t0 < 5
            assert c.current_node == f"http://{live.addr}"
        async with aq.AsyncClient([silent_server], timeout=0.3, trust_env=False) as c:
            with pytest.raises(aq.RequestTimeout):
                await c.list_collections()
    finally:
        live.close()


class _Live:
    def __init__(self, srv: socket.socket, thread: threading.Thread,
                 stop: threading.Event) -> None:
        self.srv, self.thread, self.stop = srv, thread, stop
        self.addr = f"127.0.0.1:{srv.getsockname()[1]}"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.srv.close()


def _tiny_http_server() -> _Live:
    """Answers every request with {"collections": []} and closes the connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.05)
    stop = threading.Event()
    body = b'{"collections": []}'
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(resp)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return _Live(srv, t, stop)
