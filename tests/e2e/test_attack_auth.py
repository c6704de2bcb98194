"""Attacks on authentication, by real rogue processes and sockets against real nodes in the
private network namespace: unauthenticated peer writes and deletes, a rogue gossip member
without (or with a wrong) secret, a captured peer request and gossip packet replayed,
push-pull without authentication, and the read key. After each attack the node still
serves and its data is intact, also after a restart.

The victims have an API key and no cluster secret: the key is then the cluster secret, so
these also show that a keyed node never serves its peer routes or gossip to anyone without it.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.cluster.clock import SystemClock
from aquila.cluster.membership.messages import MemberRow, PushPull, encode
from aquila.cluster.membership.packet_auth import PacketAuth
from tests.e2e.conftest import FAST
from tests.e2e.rogue import tombstones
from tests.procs import NodeProc, http, wait_until

KEY = "full-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
N_DOCS = 50
VECTORS = np.random.default_rng(7).normal(size=(N_DOCS, 4)).astype(np.float32)
IDS = [f"d{i}" for i in range(N_DOCS)]


def fill(node: NodeProc, name: str = "c", replication: int = 1) -> None:
    status, body = node.call("PUT", f"/v1/collections/{name}",
                             {"dim": 4, "shards": 2, "replication": replication,
                              "index": {"type": "flat"}})
    assert status == 201, body
    docs = [{"id": i, "vector": v.tolist(), "metadata": {"n": n}}
            for n, (i, v) in enumerate(zip(IDS, VECTORS, strict=True))]
    status, body = node.call("POST", f"/v1/collections/{name}/documents", {"documents": docs})
    assert status == 200, body


def search_ids(node: NodeProc, name: str = "c") -> list[str]:
    status, body = node.call("POST", f"/v1/collections/{name}/search",
                             {"vector": [1.0, 0.0, 0.0, 0.0], "k": 100})
    assert status == 200, body
    return sorted(h["id"] for h in body["results"][0])


def assert_intact(node: NodeProc, members: set[str]) -> None:
    """Still serving, the same members, and every document still there."""
    assert http("GET", node.url + "/healthz")[0] == 200
    status, body = node.call("GET", "/v1/cluster")
    assert status == 200 and {m["id"] for m in body["members"]} == members, body
    assert all(m["state"] == "alive" for m in body["members"]), body
    status, body = node.call("GET", "/v1/collections/c")
    assert status == 200 and body["count"] == N_DOCS, body
    assert search_ids(node) == sorted(IDS)
    status, doc = node.call("GET", "/v1/collections/c/documents/d3")
    assert status == 200 and doc["metadata"] == {"n": 3}, doc


def metric(node: NodeProc, name: str) -> float:
    req = urllib.request.Request(node.url + "/metrics", headers=AUTH)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


@pytest.fixture
def victim(netns: None, tmp_path: Path) -> Iterator[NodeProc]:
    n = NodeProc(tmp_path / "victim", host="127.0.0.2", node_id="victim", api_key=KEY, **FAST)
    n.start()
    try:
        fill(n)
        yield n
    finally:
        n.stop()


def restart_and_check(node: NodeProc, members: set[str]) -> None:
    node.stop()
    node.start()
    assert_intact(node, members)


# -- unauthenticated peer requests -------------------------------------------------------------

SPEC_DOTDOT = {"name": "..", "dim": 2, "metric": "l2", "shards": 1, "replication": 1,
               "index": {"type": "flat"}}
PEER_ATTACKS: list[tuple[str, str, Any]] = [
    # The two requests that removed the data directory.
    ("POST", "/internal/v1/collections/x/write", {"spec": SPEC_DOTDOT, "uid": "u1", "writes": []}),
    ("POST", "/internal/v1/collections/x/write", {"spec": SPEC_DOTDOT, "uid": "u2", "writes": []}),
    ("POST", "/internal/v1/collections/c/write",
     {"writes": [{"shard": 0, "docs": [{"id": "d1", "v": None}]}], "uid": "other"}),
    ("POST", "/internal/v1/collections/c/drop_shard", {"shard": 0}),
    ("POST", "/internal/v1/collections/c/drop_shard", {"shard": 1}),
    ("POST", "/internal/v1/collections/c/purge", {"shard": 0, "before": 2**62}),
    ("POST", "/internal/v1/state", [{"spec": {"name": "c", "dim": 4}, "replicas": [["x"]],
                                     "epoch": 10**9, "origin": "x", "deleted": True}]),
    ("POST", "/internal/v1/collections/c/stream", {"shard": 0, "after": None, "limit": 10}),
    ("GET", "/internal/v1/collections/c/stats", None),
]
FAKE_AUTH: list[dict[str, str]] = [
    {},
    AUTH,  # the API key opens public routes, never peer ones
    {"X-Aquila-Peer-Auth": "0" * 64},  # the old signature header
    {"X-Aquila-Peer": "n1", "X-Aquila-Peer-Time": "1", "X-Aquila-Peer-Nonce": "0" * 32,
     "X-Aquila-Peer-Body": "0" * 64, "X-Aquila-Peer-Signature": "0" * 64},
]


def test_unauthenticated_peer_writes_and_deletes_are_refused(victim: NodeProc) -> None:
    for method, path, body in PEER_ATTACKS:
        for headers in FAKE_AUTH:
            status, answer = http(method, victim.url + path, body, headers=headers)
            assert status == 401, (method, path, headers, status, answer)
            assert answer["error"]["code"] == "unauthorized"
    assert_intact(victim, {"victim"})
    assert (victim.data_dir / "collections" / "c").is_dir()
    restart_and_check(victim, {"victim"})


# -- a rogue member ------------------------------------------------------------------------------


def run_rogue(victim: NodeProc, secret: str | None) -> dict[str, Any]:
    args = [sys.executable, "-m", "tests.e2e.rogue", "--target", victim.addr,
            "--bind", "127.0.0.66", "--victim", "victim", "--collections", "c"]
    if secret is not None:
        args += ["--secret", secret]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("secret", [None, "wrong"], ids=["no-secret", "wrong-secret"])
def test_rogue_member_cannot_join_nor_change_the_cluster_state(
    victim: NodeProc, secret: str | None
) -> None:
    bad_before = metric(victim, "aquila_gossip_bad_mac_total")
    out = run_rogue(victim, secret)
    assert out["join"].startswith("refused"), out
    assert out["http"] == {"pushpull": 401, "state": 401, "drop_shard": 401}, out
    assert out["packets_sent"] > 5, out
    assert_intact(victim, {"victim"})
    # Its packets reached the victim and were all dropped for their MAC.
    assert metric(victim, "aquila_gossip_bad_mac_total") >= bad_before + 40
    restart_and_check(victim, {"victim"})


def test_pushpull_without_authentication_is_refused(victim: NodeProc) -> None:
    pp = PushPull(True, (MemberRow("rogue", "127.0.0.66:8470", "alive", 1, {}),), tombstones(["c"]))
    for payload in (encode(pp), PacketAuth(KEY + "x", "rogue", SystemClock()).seal(encode(pp))):
        for headers in FAKE_AUTH:
            req = urllib.request.Request(victim.url + "/internal/v1/pushpull", data=payload,
                                         method="POST", headers=headers)
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with pytest.raises(urllib.error.HTTPError) as info:
                opener.open(req, timeout=5)
            info.value.close()
            assert info.value.code == 401
    assert_intact(victim, {"victim"})


# -- captured and replayed -----------------------------------------------------------------------

ETH_P_ALL = 0x0003
PACKET_HOST = 0  # a copy as received (loopback shows each packet twice: sent and received)


CHANNEL_UPGRADE = b"GET /internal/v1/channel HTTP/1.1\r\n"


class Sniffer(threading.Thread):
    """An eavesdropper on the loopback interface (AF_PACKET; root in the namespace): keeps the
    TCP payloads and UDP datagrams sent to one address, as they went over the wire."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self._dst = (socket.inet_aton(host), port)
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.1)
        self._stop_event = threading.Event()
        self.tcp: dict[int, dict[int, bytes]] = {}  # source port -> sequence number -> payload
        self.udp: list[bytes] = []

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                frame, meta = self._sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            if meta[2] == PACKET_HOST:
                self._take(frame[14:])  # past the (zero) Ethernet header of lo

    def _take(self, ip: bytes) -> None:
        if ip[0] >> 4 != 4 or ip[16:20] != self._dst[0]:
            return
        proto, seg = ip[9], ip[(ip[0] & 0x0F) * 4 : struct.unpack("!H", ip[2:4])[0]]
        sport, dport = struct.unpack("!HH", seg[:4])
        if dport != self._dst[1]:
            return
        if proto == socket.IPPROTO_UDP:
            self.udp.append(seg[8:])
        elif proto == socket.IPPROTO_TCP:
            payload = seg[(seg[12] >> 4) * 4 :]
            if payload:
                self.tcp.setdefault(sport, {})[struct.unpack("!I", seg[4:8])[0]] = payload

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self._sock.close()

    def streams(self) -> list[bytes]:
        """Each TCP connection's bytes as sent, in order."""
        return [b"".join(segments[s] for s in sorted(segments))
                for segments in list(self.tcp.values())]


def http_requests(sniffer: Sniffer) -> list[bytes]:
    """Every complete HTTP request seen, as raw bytes (on each connection, those before a
    channel's upgrade: after it come channel messages, not HTTP)."""
    out = []
    for whole in sniffer.streams():
        stream = whole.partition(CHANNEL_UPGRADE)[0]
        while b"\r\n\r\n" in stream:
            head, rest = stream.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                break
            out.append(head + b"\r\n\r\n" + rest[:length])
            stream = rest[length:]
    return out


def state_pushes(sniffer: Sniffer) -> list[bytes]:
    return [r for r in http_requests(sniffer) if r.startswith(b"POST /internal/v1/state ")]


def channels_in(sniffer: Sniffer) -> list[bytes]:
    """Each channel seen: its upgrade and the messages after it (on a connection that may
    have carried HTTP requests before)."""
    return [CHANNEL_UPGRADE + s.partition(CHANNEL_UPGRADE)[2] for s in sniffer.streams()
            if CHANNEL_UPGRADE in s]


def send_raw(host: str, port: int, raw: bytes) -> tuple[int, Any]:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(raw)
        resp = HTTPResponse(s)
        try:
            resp.begin()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            resp.close()


@pytest.fixture
def pair(netns: None, tmp_path: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    """Two members keyed by the API key alone (no cluster secret)."""
    n1 = NodeProc(tmp_path / "n1", host="127.0.0.2", node_id="n1", api_key=KEY, **FAST)
    n2 = NodeProc(tmp_path / "n2", host="127.0.0.3", node_id="n2", api_key=KEY,
                  seeds="127.0.0.2:8470", **FAST)
    try:
        n1.start()
        n2.start()
        for n in (n1, n2):
            wait_until(lambda n=n: {m["id"]: m["state"] for m in n.call("GET", "/v1/cluster")[1]
                                    ["members"]} == {"n1": "alive", "n2": "alive"},
                       30, f"{n.addr} to see both")
        yield n1, n2
    finally:
        n2.stop()
        n1.stop()


def test_captured_peer_request_and_gossip_packet_replayed_are_refused(
    pair: tuple[NodeProc, NodeProc],
) -> None:
    n1, n2 = pair
    sniffer = Sniffer("127.0.0.3", 8470)
    sniffer.start()
    try:
        # Every write through n1 reaches n2 as a peer write (replication 2), on the channel
        # n1 opened to n2 by a signed upgrade (cluster/peers/channel.py).
        fill(n1, replication=2)
        wait_until(lambda: channels_in(sniffer), 10, "a captured channel")
        # The collection's creation reaches n2 as a signed state push over HTTP.
        wait_until(lambda: state_pushes(sniffer), 10, "a captured state push")
        wait_until(lambda: len(sniffer.udp) >= 5, 10, "captured gossip packets")
    finally:
        sniffer.stop()
    channels = channels_in(sniffer)
    head, _, messages = channels[0].partition(b"\r\n\r\n")
    assert b"X-Aquila-Peer-Signature" in head and messages  # the writes, sealed

    # The collection is dropped and created again: a replayed channel (its upgrade and the
    # writes of the old incarnation after it) must not touch the new one.
    assert n1.call("DELETE", "/v1/collections/c")[0] == 200
    wait_until(lambda: n2.call("GET", "/v1/collections/c")[0] == 404, 10, "drop seen by n2")
    fill(n1, replication=2)
    for raw in channels:
        status, body = send_raw("127.0.0.3", 8470, raw)
        assert status == 401, (status, body)
        assert "replayed" in body["error"]["message"], body
    # A peer request over HTTP (the state push that created the old incarnation), likewise.
    for raw in state_pushes(sniffer):
        status, body = send_raw("127.0.0.3", 8470, raw)
        assert status == 401 and "replayed" in body["error"]["message"], (status, body)
    # Sent to another member, which has never seen it: refused, it was addressed to n2.
    status, body = send_raw("127.0.0.2", 8470, channels[0])
    assert status == 401 and "addressed to another node" in body["error"]["message"], body
    # Altered (another path under the same signature): refused for its signature.
    forged = channels[0].replace(b"/internal/v1/channel", b"/internal/v1/channeL", 1)
    status, body = send_raw("127.0.0.3", 8470, forged)
    assert status in (401, 404), body  # no such route, or (were there one) not its signature
    forged = head.replace(b"X-Aquila-Peer: n1", b"X-Aquila-Peer: n3", 1) + b"\r\n\r\n"
    status, body = send_raw("127.0.0.3", 8470, forged)
    assert status == 401 and "signature" in body["error"]["message"], body

    # Gossip datagrams n1 sent to n2, sent again: dropped as replays.
    stale_before = metric(n2, "aquila_gossip_stale_total")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for packet in sniffer.udp:
            s.sendto(packet, ("127.0.0.3", 8470))
    wait_until(lambda: metric(n2, "aquila_gossip_stale_total")
               >= stale_before + len(sniffer.udp), 10, "replayed packets dropped")
    assert metric(n2, "aquila_gossip_bad_mac_total") == 0

    for n in (n1, n2):
        assert_intact(n, {"n1", "n2"})
    restart_and_check(n2, {"n1", "n2"})


# -- the read key and the probes -----------------------------------------------------------------


def test_read_key_reads_only_and_probes_are_open(netns: None, tmp_path: Path) -> None:
    n = NodeProc(tmp_path / "ro", host="127.0.0.2", node_id="victim", api_key=KEY,
                 read_key="read-key", **FAST)
    try:
        n.start()  # waits on /readyz without any key: it is open
        fill(n)
        read = {"Authorization": "Bearer read-key"}
        for path in ("/healthz", "/readyz"):
            assert http("GET", n.url + path)[0] == 200
        assert http("GET", n.url + "/v1/collections/c")[0] == 401
        status, body = http("POST", n.url + "/v1/collections/c/search",
                            {"vector": [1, 0, 0, 0], "k": 5}, headers=read)
        assert status == 200 and len(body["results"][0]) == 5
        assert http("GET", n.url + "/v1/collections/c/documents/d1", headers=read)[0] == 200
        assert http("GET", n.url + "/v1/collections/c", headers=read)[0] == 200
        for method, path, body in [
            ("PUT", "/v1/collections/e", {"dim": 4}),
            ("DELETE", "/v1/collections/c", None),
            ("POST", "/v1/collections/c/documents",
             {"documents": [{"id": "zz", "vector": [1, 2, 3, 4]}]}),
            ("POST", "/v1/collections/c/documents/delete", {"ids": IDS}),
            ("DELETE", "/v1/collections/c/documents/d1", None),
            ("POST", "/v1/cluster/leave", None),
        ]:
            status, answer = http(method, n.url + path, body, headers=read)
            assert status == 403 and answer["error"]["code"] == "forbidden", (path, answer)
        assert_intact(n, {"victim"})
        restart_and_check(n, {"victim"})
    finally:
        n.stop()
