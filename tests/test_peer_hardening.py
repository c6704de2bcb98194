"""What a peer sends is parsed strictly: numbers in text (a Content-Length, a status, the shard
keys of a JSON answer) are ASCII digits of a bounded length, never what Python's `int` also
takes ("1_0", " 12", "+5", "²", "١٠"); answers are bounded by what the request can produce;
and a search frame that names no shard of this node is answered, empty and well formed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.cluster.model.bounds import MAX_DOCUMENT_METADATA, BoundsError, parse_uint
from aquila.cluster.model.documents import Hit
from aquila.cluster.model.operations import SearchRequest
from aquila.cluster.peers.client import FRAME_TYPE, PeerError
from aquila.cluster.peers.lean import LeanClient, LeanError
from aquila.cluster.replication import frames
from aquila.cluster.replication.remote import (
    RemoteReplica,
    decode_counts,
    decode_stats,
    decode_write_result,
)
from tests.conftest import Node
from tests.simcluster import spec as simspec
from tests.test_peer_protocol import Scripted, ok

# Everything Python's int() (and str.isdigit) takes that is not plain ASCII digits.
NOT_DIGITS = ["²", "1_0", " 12", "12 ", "+5", "-0", "١٠", "１２", "0x10", "1e3", "", "\t7"]


# --- (a) a search frame that names none of this node's shards ---------------------------------
@pytest.fixture
async def coll(node: Node) -> Node:
    await node.create("c", 2, shards=2)
    await node.upsert("c", [{"id": "keep", "vector": [1.0, 2.0], "metadata": {"a": 1}}])
    return node


async def post_frame(node: Node, name: str, frame: bytes) -> tuple[int, bytes]:
    resp = await node.client.post(f"/internal/v1/collections/{name}/search", data=frame,
                                  headers={"Content-Type": FRAME_TYPE})
    return resp.status, await resp.read()


@pytest.mark.parametrize("flt", [None, {"must": [{"key": "a", "match": 1}]}],
                         ids=["unfiltered", "filtered"])
async def test_search_frame_of_no_shards_is_an_empty_answer(coll: Node, flt: Any) -> None:
    q = np.array([[1.0, 2.0], [0.0, 1.0]], dtype="<f4")
    flags = frames.WITH_METADATA | frames.EXPLAIN
    status, raw = await post_frame(coll, "c", frames.encode_search(q, 3, None, [], flt, flags))
    assert status == 200, raw
    got = frames.decode_hits(raw, 2, 3, flags, 2, [])
    assert got.rows == [[], []]
    # The node still answers the shards it holds.
    status, raw = await post_frame(coll, "c", frames.encode_search(q, 3, None, [0, 1], flt,
                                                                    flags))
    assert status == 200
    assert [h.id for h in frames.decode_hits(raw, 2, 3, flags, 2, [0, 1]).rows[0]] == ["keep"]


async def test_json_search_of_no_shards_is_an_empty_answer(coll: Node) -> None:
    body = {"vectors": "AACAPwAAAEA=", "nq": 1, "k": 3, "shards": []}
    resp = await coll.client.post("/internal/v1/collections/c/search", data=orjson.dumps(body),
                                  headers={"Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()


async def test_search_frame_of_an_unknown_collection_is_a_404(coll: Node) -> None:
    status, raw = await post_frame(coll, "nope", frames.encode_search(
        np.zeros((1, 2), "<f4"), 3, None, [], None, 0))
    assert status == 404 and orjson.loads(raw)["error"]["code"] == "not_found"


# --- (b) the lean client's Content-Length and status ------------------------------------------
@pytest.fixture
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What the event loop reports as an unhandled error (a protocol callback that raised)."""
    loop = asyncio.get_event_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    yield seen
    loop.set_exception_handler(previous)


def wire(text: str) -> bytes:
    """Latin-1 where it can be (the client reads a header block so: "²" is one byte, 0xB2,
    which str.isdigit takes), else UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


async def ask(answer: list[bytes], max_body: int | None = None, cap: int = 1 << 20
              ) -> tuple[int, str, bytes]:
    srv = Scripted([answer, None])
    port = await srv.start()
    client = LeanClient(cap)
    try:
        bound = {} if max_body is None else {"max_body": max_body}
        return await asyncio.wait_for(client.request(
            "a", "127.0.0.1", port, "POST", "/", {}, b"", **bound), 5)
    finally:
        client.close()
        await srv.stop()


# Space and tab around a header's value are HTTP's own (RFC 9110 5.5), not the number's.
BAD_LENGTHS = [x for x in NOT_DIGITS if x.strip(" \t") not in ("12", "7")]


@pytest.mark.parametrize("length", BAD_LENGTHS + ["\x0b12", "1 2", "1" * 5000, "9" * 30])
async def test_lean_client_refuses_a_length_that_is_not_ascii_digits(
        length: str, loop_errors: list[dict[str, Any]]) -> None:
    head = wire(f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n")
    with pytest.raises(LeanError, match="length"):
        await ask([head + b"abcdefghijkl"])
    assert loop_errors == []


@pytest.mark.parametrize("status", ["²²²", "٢٠٠", "2_0"])
async def test_lean_client_refuses_a_status_that_is_not_ascii_digits(
        status: str, loop_errors: list[dict[str, Any]]) -> None:
    head = wire(f"HTTP/1.1 {status} OK\r\nContent-Length: 2\r\n\r\n")
    with pytest.raises(LeanError, match="not an HTTP answer"):
        await ask([head + b"ab"])
    assert loop_errors == []


async def test_lean_client_takes_a_plain_length_with_spaces_around_it() -> None:
    # Optional whitespace around a header's value is HTTP's (RFC 9110 5.5), not the number's.
    got = await ask([b"HTTP/1.1 200 OK\r\nContent-Length:   3 \r\n\r\nabc"])
    assert got[2] == b"abc"


# --- (c) answers bounded by what the request can produce --------------------------------------
async def test_lean_client_bounds_each_answer_by_the_request() -> None:
    body = b"x" * 5000
    assert (await ask(ok(body), max_body=5000))[2] == body
    with pytest.raises(LeanError, match="too long"):
        await ask(ok(body), max_body=4999)
    with pytest.raises(LeanError, match="too long"):  # never above the client's own cap
        await ask(ok(body), max_body=1 << 30, cap=4096)


def test_hits_bound_holds_the_largest_answer_and_little_more() -> None:
    dim, nq, k = 8, 3, 4
    both = frames.WITH_METADATA | frames.WITH_VECTOR
    meta = b'{"m":"' + b"z" * 94 + b'"}'
    hit = Hit("\U0001F600" * 256, 1.0, meta, np.ones(dim, "<f4").tobytes(), 1)
    plans = [{"shard": 1, "path": "x" * 1000}]
    for flags in (0, frames.WITH_METADATA, frames.WITH_VECTOR, both):
        biggest = frames.encode_hits([[hit] * k] * nq, flags, dim, plans)
        bound = frames.hits_answer_bound(nq, k, flags, dim, len(meta))
        assert len(biggest) <= bound
        assert bound <= len(biggest) + frames.MAX_JSON_PART + 4
    # Without metadata or vectors, a search of 10 × 10 is bounded to about a megabyte.
    assert frames.hits_answer_bound(10, 10, 0, 384, 1 << 26) < 2 << 20


class Recorder:
    """A peer client that records the answer bound of each request and answers nothing."""

    def __init__(self) -> None:
        self.bounds: list[int | None] = []

    async def request(self, addr: str, method: str, path: str, body: Any = None, *,
                      to: str | None, timeout: float | None = None,  # noqa: ASYNC109
                      raw: bytes | None = None, max_answer: int | None = None) -> Any:
        self.bounds.append(max_answer)
        raise PeerError("recorded")


async def test_remote_frames_ask_for_bounded_answers() -> None:
    peers = Recorder()
    spec = simspec("c", shards=2, replication=1)
    remote = RemoteReplica("n2", lambda _n: "10.0.0.2:8470", peers, 5.0)
    q = np.zeros((2, spec.dim), np.float32)
    with pytest.raises(PeerError):
        await remote.search(spec, SearchRequest(q, 5, None, None, None, False, False, False,
                                                None), [0], 1.0)
    with pytest.raises(PeerError):
        await remote.get(spec, 0, "d")
    with pytest.raises(PeerError):
        await remote.write(spec, "u", {0: []})
    assert peers.bounds[0] == frames.hits_answer_bound(2, 5, 0, spec.dim, 0)
    assert all(b is not None and b < 1 << 30 for b in peers.bounds), peers.bounds
    # With their metadata: each hit's at most a document's (1 MiB), not a request body's
    # (128 MiB, which let one query's 10 hits be answered with 1.3 GiB).
    with pytest.raises(PeerError):
        await remote.search(spec, SearchRequest(q[:1], 10, None, None, None, True, False,
                                                False, None), [0], 1.0)
    assert peers.bounds[-1] == frames.hits_answer_bound(1, 10, frames.WITH_METADATA, spec.dim,
                                                        MAX_DOCUMENT_METADATA)
    assert peers.bounds[-1] < 12 * MAX_DOCUMENT_METADATA


# --- (d) numbers as text in peers' JSON answers --------------------------------------------------
@pytest.mark.parametrize("key", NOT_DIGITS + ["00000000010", "1" * 5000])
def test_shard_keys_of_peer_answers_are_plain_digits(key: str) -> None:
    with pytest.raises(BoundsError):
        decode_counts({"counts": {key: 3}}, [10])
    with pytest.raises((BoundsError, ValueError)):
        decode_write_result({"shards": {key: [1, 0]}}, 16)
    with pytest.raises(BoundsError):
        decode_stats({key: {"index_state": "trained", "count": 1}})
    assert decode_counts({"counts": {"10": 3}}, [10]) == {10: 3}


def test_parse_uint() -> None:
    assert parse_uint("0", 5, "x") == 0 and parse_uint("05", 50, "x") == 5
    assert parse_uint(b"123", 1000, "x") == 123
    for bad in NOT_DIGITS + ["6", "123456"]:
        with pytest.raises(BoundsError):
            parse_uint(bad, 5, "x")

