"""Attacks on what a node accepts, against real `aquila serve` processes: the requests and
packets of issue 7 "The trust boundary", each refused with the right status, and after each
the node still serves and its data is intact, after a restart too.

The rogue is this test process, on the same network as the nodes: it speaks HTTP to their
ports and sends UDP datagrams to their gossip sockets from its own socket.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aquila.cluster.membership.messages import Dead, encode
from aquila.cluster.model.bounds import MAX_INCARNATION
from tests.e2e.conftest import FAST, in_private_netns
from tests.procs import NodeProc, wait_until

DIM = 4
N_DOCS = 60
DOCS = [{"id": f"d{i}", "vector": [float(i), 1.0, -1.0, 0.5], "metadata": {"i": i}}
        for i in range(N_DOCS)]


def raw_call(node: NodeProc, method: str, path: str, body: bytes,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """An HTTP request with exactly these bytes as its body (a forger's JSON, gzip)."""
    req = urllib.request.Request(node.url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None


def refused(result: tuple[int, Any], status: int, code: str) -> None:
    got, body = result
    assert got == status, body
    assert body["error"]["code"] == code, body


def forge(node: NodeProc, body: bytes) -> None:
    """A gossip datagram from this process (no cluster secret: packets are bare bodies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(body, (node.host, node.port))


class Pair:
    """n1 (attacked) and n2, with a replicated collection "safe" on both."""

    def __init__(self, root: Path) -> None:
        self.n1 = NodeProc(root / "n1", host="127.0.0.2", node_id="n1", **FAST)
        self.n2 = NodeProc(root / "n2", host="127.0.0.3", node_id="n2", seeds="127.0.0.2:8470",
                           **FAST)

    def start(self) -> Pair:
        self.n1.start()
        self.n2.start()
        wait_until(lambda: self.states(self.n1) == {"n1": "alive", "n2": "alive"}, 30,
                   "two alive members")
        status, body = self.n1.call("PUT", "/v1/collections/safe", {
            "dim": DIM, "shards": 4, "replication": 2, "index": {"type": "flat"}})
        assert status == 201, body
        status, body = self.n1.call("POST", "/v1/collections/safe/documents",
                                    {"documents": DOCS, "consistency": "all"})
        assert status == 200, body
        return self

    def states(self, node: NodeProc) -> dict[str, str]:
        return {m["id"]: m["state"] for m in node.call("GET", "/v1/cluster")[1]["members"]}

    def member(self, node: NodeProc, member: str) -> dict[str, Any]:
        members = node.call("GET", "/v1/cluster")[1]["members"]
        return next(m for m in members if m["id"] == member)

    def assert_intact(self) -> None:
        """Both nodes serve, and every document is there with its metadata."""
        for node in (self.n1, self.n2):
            status, desc = node.call("GET", "/v1/collections/safe")
            assert status == 200 and desc["count"] == N_DOCS, desc
            status, doc = node.call("GET", "/v1/collections/safe/documents/d7")
            assert status == 200 and doc["metadata"] == {"i": 7}, doc
            status, res = node.call("POST", "/v1/collections/safe/search",
                                    {"vector": [3.0, 1.0, -1.0, 0.5], "k": 1})
            assert status == 200 and res["results"][0][0]["id"] == "d3", res
            assert node.call("GET", "/readyz")[0] == 200

    def restart_n1(self) -> None:
        self.n1.stop()
        self.n1.start()
        wait_until(lambda: self.states(self.n2).get("n1") == "alive", 30, "n1 alive again")

    def stop(self) -> None:
        self.n2.stop()
        self.n1.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    if not in_private_netns():
        pytest.skip("multi-node tests run inside a private network namespace: scripts/test.sh")
    p = Pair(tmp_path_factory.mktemp("attack"))
    try:
        yield p.start()
    finally:
        p.stop()


def spec(name: str) -> dict[str, Any]:
    return {"name": name, "dim": 2, "metric": "l2", "shards": 1, "replication": 1,
            "index": {"type": "flat", "nlist": None, "nprobe": 16}}


# --- names, paths, incarnations -------------------------------------------------------------


def test_the_dotdot_attack_is_refused_and_the_data_dir_survives_a_restart(pair: Pair) -> None:
    data = pair.n1.data_dir
    before = sorted(p.name for p in data.iterdir())
    for uid in ("u1", "u2"):
        body = json.dumps({"spec": spec(".."), "uid": uid, "writes": []}).encode()
        refused(raw_call(pair.n1, "POST", "/internal/v1/collections/x/write", body),
                400, "bad_request")
    assert sorted(p.name for p in data.iterdir()) == before
    assert (data / "collections" / "safe" / "spec.json").exists()
    pair.restart_n1()
    pair.assert_intact()


def test_an_absolute_name_is_refused(pair: Pair, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    body = json.dumps({"spec": spec(str(target)), "uid": "u", "writes": []}).encode()
    refused(raw_call(pair.n1, "POST", "/internal/v1/collections/x/write", body),
            400, "bad_request")
    refused(raw_call(pair.n1, "POST", "/internal/v1/collections/%2Ftmp%2Fx/write",
                     json.dumps({"writes": []}).encode()), 400, "bad_request")
    assert not target.exists()
    pair.assert_intact()


def test_a_write_naming_another_incarnation_is_refused_and_the_live_one_kept(
    pair: Pair,
) -> None:
    """What a coordinator that missed a delete-and-recreate sends (or a replay): the map's
    spec with another uid. Refused as transient; nothing is dropped."""
    entry_spec = {**spec("safe"), "dim": DIM, "shards": 4, "replication": 2}
    for uid in ("stale-1", "stale-2"):
        body = json.dumps({"spec": entry_spec, "uid": uid, "writes": []}).encode()
        refused(raw_call(pair.n1, "POST", "/internal/v1/collections/safe/write", body),
                503, "unavailable")
    pair.assert_intact()


# --- gossip ---------------------------------------------------------------------------------


def probes(node: NodeProc) -> float:
    req = urllib.request.Request(node.url + "/metrics")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^aquila_gossip_probes(?:_total)? (\S+)$", text, re.M)
    assert m is not None, text[:500]
    return float(m.group(1))


def test_a_forged_dead_at_2_64_is_refused_and_the_node_still_refutes(pair: Pair) -> None:
    for node in (pair.n1, pair.n2):
        forge(node, b'{"t":6,"v":1,"inc":18446744073709551615,"node":"n2","from":"rogue"}')
    # The forged packets are dropped: n2 stays alive everywhere at a small incarnation.
    probes_before = probes(pair.n1)
    wait_until(lambda: probes(pair.n1) >= probes_before + 5, 30, "n1 to keep probing")
    assert pair.states(pair.n1)["n2"] == "alive"
    assert pair.member(pair.n2, "n2")["incarnation"] < 100
    # The largest accusation that decodes leaves n2 room to refute, and it does.
    forge(pair.n1, encode(Dead(MAX_INCARNATION - 1, "n2", "rogue")))
    wait_until(lambda: pair.member(pair.n1, "n2") == {
        "id": "n2", "addr": "127.0.0.3:8470", "state": "alive", "incarnation": MAX_INCARNATION},
        30, "n2 to refute at the largest incarnation")
    pair.assert_intact()


def test_a_float_incarnation_does_not_stop_the_probe_loop(pair: Pair) -> None:
    forge(pair.n1, b'{"t":4,"v":1,"inc":1e300,"node":"rogue","addr":"127.0.0.9:8470"}')
    forge(pair.n1, b'{"t":5,"v":1,"inc":1e300,"node":"n2","from":"rogue"}')
    before = probes(pair.n1)
    wait_until(lambda: probes(pair.n1) >= before + 5, 30, "n1 to keep probing")
    assert "rogue" not in pair.states(pair.n1)
    assert pair.states(pair.n1)["n2"] == "alive"
    pair.assert_intact()


# --- limits on work -------------------------------------------------------------------------


def test_a_gzip_bomb_is_413(pair: Pair) -> None:
    packer = zlib.compressobj(9, wbits=31)
    spaces = b" " * (1 << 20)
    body = b"".join([packer.compress(b'{"documents": [')]
                    + [packer.compress(spaces) for _ in range(1024)]  # 1 GiB inflated
                    + [packer.compress(b"]}"), packer.flush()])
    assert len(body) < 2 * 1024 * 1024
    refused(raw_call(pair.n1, "POST", "/v1/collections/safe/documents", body,
                     {"Content-Encoding": "gzip"}), 413, "payload_too_large")
    pair.assert_intact()


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/collections/safe/search", {"vectors": [[0.0] * DIM] * 1001, "k": 1}),
    ("/v1/collections/safe/search", {"vectors": [[0.0] * DIM] * 101, "k": 1000}),
    ("/v1/collections/safe/search", {"vector": [0.0] * DIM, "timeout_ms": 600_001}),
    ("/v1/collections/safe/search", {"vector": [0.0] * DIM, "filter": {
        "must": [{"key": "i", "match": 1}] * 51, "should": [{"key": "i", "match": 1}] * 50}}),
    ("/v1/collections/safe/documents/delete", {"ids": [f"d{i}" for i in range(10_001)]}),
    ("/v1/cluster/join", {"seeds": [f"127.0.0.{i}:8470" for i in range(2, 35)]}),
    ("/v1/cluster/join", {"seeds": ["127.0.0.3:8470/internal/v1/state"]}),
    ("/v1/cluster/join", {"seeds": ["127.0.0.3:8470#x"]}),
    ("/v1/cluster/join", {"seeds": ["http://127.0.0.3:8470"]}),
])
def test_work_beyond_the_limits_is_400(pair: Pair, path: str, body: dict[str, Any]) -> None:
    refused(raw_call(pair.n1, "POST", path, json.dumps(body).encode()), 400, "bad_request")
    pair.assert_intact()


def test_deep_metadata_is_400(pair: Pair) -> None:
    meta = b'{"a":' * 299 + b"1" + b"}" * 299
    for body in (b'{"documents":[{"id":"x","vector":[1,2,3,4],"metadata":%s}]}' % meta,
                 b'{"documents":[{"id":"x","vector":[1.5,2,3,4],"metadata":%s}],'
                 b'"consistency":"one"}' % meta):
        refused(raw_call(pair.n1, "POST", "/v1/collections/safe/documents", body),
                400, "bad_request")
    assert pair.n1.call("GET", "/v1/collections/safe/documents/x")[0] == 404
    pair.assert_intact()


def raw_http(node: NodeProc, request: bytes) -> tuple[int, str, bytes]:
    """These bytes as a whole request on a new connection: the status, content type and
    body of the answer (the node closes the connection after an error of its HTTP parser)."""
    with socket.create_connection((node.host, node.port), timeout=30) as s:
        s.sendall(request)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), fields.get("Content-Type", ""), body


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/collections HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/collections HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    b"GET /v1/collections HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 TLS hello\r\n\r\n",
], ids=["long-header", "long-line", "bad-name", "bad-length", "tls"])
def test_what_the_http_parser_refuses_is_a_json_400_without_a_traceback(
        pair: Pair, request_bytes: bytes) -> None:
    """aiohttp answers these before any route or middleware, in plain text and with a
    traceback in the log at error level, unless the node's handler says otherwise."""
    before = pair.n1.log_tail(100_000).count("Traceback")
    status, content_type, body = raw_http(pair.n1, request_bytes)
    assert status == 400, body
    assert content_type.startswith("application/json"), (content_type, body)
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["message"].startswith("malformed HTTP"), error
    assert pair.n1.log_tail(100_000).count("Traceback") == before
    pair.assert_intact()


def test_after_every_attack_a_restart_finds_the_data(pair: Pair) -> None:
    pair.restart_n1()
    pair.assert_intact()
    assert "Traceback" not in pair.n1.log_tail(2000)
