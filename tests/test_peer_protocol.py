"""The binary frames of the peer protocol (cluster/replication/frames.py): every frame decodes
to what was encoded; every truncation, any byte added, another version or kind is refused with
the typed FrameError (a 400), never another exception; and fields out of bounds likewise."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aquila.cluster.model.bounds import vectors_within
from aquila.cluster.model.documents import Hit, Incoming
from aquila.cluster.model.errors import BadRequest, Unavailable
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.operations import SearchRequest
from aquila.cluster.peers.lean import LeanClient, LeanError
from aquila.cluster.replication import frames
from aquila.cluster.replication.coalesce import Coalescer
from aquila.cluster.replication.frames import FrameError
from aquila.cluster.service import ClusterService
from aquila.cluster.state.entries import CollectionEntry
from tests.simcluster import SimCluster, batch
from tests.simcluster import spec as simspec

PROPS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))
DIM = 3
SHARDS = 8

ids = st.text(min_size=1, max_size=12)
# Within MAX_VECTOR_VALUE (1e15), what a vector may hold.
finite = st.floats(-(2.0**46), 2.0**46, allow_nan=False, allow_infinity=False, width=32)
scores = st.floats(allow_nan=False, allow_infinity=False)
metas = st.dictionaries(st.text(max_size=4), st.integers(-(2**53), 2**53) | st.text(max_size=4),
                        max_size=3).map(orjson.dumps)
vectors = st.lists(finite, min_size=DIM, max_size=DIM).map(
    lambda v: np.array(v, dtype="<f4"))


@st.composite
def search_args(draw: st.DrawFn) -> tuple[Any, ...]:
    nq = draw(st.integers(1, 4))
    q = np.array(draw(st.lists(st.lists(finite, min_size=DIM, max_size=DIM),
                               min_size=nq, max_size=nq)), dtype="<f4")
    k = draw(st.integers(1, 20))
    nprobe = draw(st.none() | st.integers(1, 1 << 20))
    shards = draw(st.lists(st.integers(0, SHARDS - 1), max_size=SHARDS, unique=True))
    flt = draw(st.none() | st.just({"must": [{"key": "a", "match": 1}]}))
    flags = draw(st.integers(0, 7))
    return q, k, nprobe, shards, flt, flags


@st.composite
def hit_rows(draw: st.DrawFn) -> tuple[list[list[Hit]], int, int, list[int], Any]:
    flags = draw(st.integers(0, 3))
    k = draw(st.integers(1, 6))
    shards = draw(st.lists(st.integers(0, SHARDS - 1), min_size=1, max_size=SHARDS,
                           unique=True))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, k))
        rows.append([
            Hit(draw(ids), draw(scores),
                draw(metas) if flags & frames.WITH_METADATA else b"{}",
                draw(vectors).tobytes() if flags & frames.WITH_VECTOR else b"",
                draw(st.sampled_from(shards)))
            for _ in range(n)
        ])
    plans = draw(st.none() | st.just([{"shard": shards[0], "path": "exact"}]))
    return rows, flags, k, shards, plans


@st.composite
def write_batches(draw: st.DrawFn) -> dict[int, list[Incoming]]:
    out = {}
    for shard in draw(st.lists(st.integers(0, SHARDS - 1), max_size=3, unique=True)):
        docs = []
        for _ in range(draw(st.integers(1, 4))):
            live = draw(st.booleans())
            docs.append(Incoming(draw(ids), draw(vectors) if live else None,
                                 draw(metas) if live else b"",
                                 draw(st.integers(0, 2**63 - 1)), draw(st.text(max_size=8))))
        out[shard] = docs
    return out


def same_hits(a: list[list[Hit]], b: list[list[Hit]]) -> bool:
    return [[(h.id, h.score, h.metadata, h.vector, h.shard) for h in r] for r in a] == \
        [[(h.id, h.score, h.metadata, h.vector, h.shard) for h in r] for r in b]


def refused_everywhere(frame: bytes, decode: Callable[[bytes], object]) -> None:
    """Every strict prefix, the frame with a byte added, with another version and with another
    kind: a FrameError each."""
    decode(frame)  # the frame itself is fine
    for cut in range(len(frame)):
        with pytest.raises(FrameError):
            decode(frame[:cut])
    for bad in (frame + b"\x00", bytes([frames.VERSION + 1]) + frame[1:],
                bytes([0]) + frame[1:], frame[:1] + bytes([(frame[1] % 4) + 1 + 4]) + frame[2:]):
        with pytest.raises(FrameError):
            decode(bad)


@PROPS
@given(search_args())
def test_search_round_trip_and_refusals(args: tuple[Any, ...]) -> None:
    q, k, nprobe, shards, flt, flags = args
    frame = frames.encode_search(q, k, nprobe, shards, flt, flags)
    got = frames.decode_search(frame, DIM, SHARDS)
    assert np.array_equal(got.vectors, q) and got.vectors.dtype == np.float32
    assert (got.k, got.nprobe, got.shards, got.filter, got.flags) == (k, nprobe, shards, flt,
                                                                      flags)
    refused_everywhere(frame, lambda b: frames.decode_search(b, DIM, SHARDS))


@PROPS
@given(hit_rows())
def test_hits_round_trip_and_refusals(case: tuple[list[list[Hit]], int, int, list[int], Any]
                                      ) -> None:
    rows, flags, k, shards, plans = case
    frame = frames.encode_hits(rows, flags, DIM, plans)

    def decode(b: bytes) -> frames.HitsFrame:
        return frames.decode_hits(b, len(rows), k, flags, DIM, shards)

    got = decode(frame)
    assert same_hits(got.rows, rows) and got.plans == plans
    refused_everywhere(frame, decode)


@PROPS
@given(write_batches(), st.none() | st.text(max_size=10))
def test_write_round_trip_and_refusals(by_shard: dict[int, list[Incoming]],
                                       uid: str | None) -> None:
    spec = {"name": "c", "dim": DIM}
    frame = frames.encode_write(spec, uid, DIM, by_shard)
    got = frames.decode_write(frame, DIM, SHARDS)
    assert (got.spec, got.uid, got.dim) == (spec, uid, DIM)
    assert list(got.by_shard) == list(by_shard)
    for shard, docs in by_shard.items():
        back = got.by_shard[shard]
        assert [(d.id, d.version, d.writer) for d in back] == \
            [(d.id, d.version, d.writer) for d in docs]
        for a, b in zip(back, docs, strict=True):
            assert (a.vector is None) == (b.vector is None)
            if b.vector is not None:
                assert a.vector is not None and np.array_equal(a.vector, b.vector)
                assert orjson.loads(a.metadata) == orjson.loads(b.metadata)
    refused_everywhere(frame, lambda b: frames.decode_write(b, DIM, SHARDS))


@PROPS
@given(st.integers(0, SHARDS - 1), ids)
def test_get_round_trip_and_refusals(shard: int, doc_id: str) -> None:
    frame = frames.encode_get(shard, doc_id)
    assert frames.decode_get(frame, SHARDS) == (shard, doc_id)
    refused_everywhere(frame, lambda b: frames.decode_get(b, SHARDS))


@PROPS
@given(st.binary(max_size=200), st.sampled_from(["search", "hits", "write", "get"]))
def test_random_bytes_are_a_frame_error_or_a_frame(raw: bytes, kind: str) -> None:
    decoders: dict[str, Callable[[bytes], object]] = {
        "search": lambda b: frames.decode_search(b, DIM, SHARDS),
        "hits": lambda b: frames.decode_hits(b, 1, 5, 3, DIM, [0, 1]),
        "write": lambda b: frames.decode_write(b, DIM, SHARDS),
        "get": lambda b: frames.decode_get(b, SHARDS),
    }
    for head in (b"", bytes([frames.VERSION, frames.SEARCH]), bytes([frames.VERSION, frames.HITS]),
                 bytes([frames.VERSION, frames.WRITE]), bytes([frames.VERSION, frames.GET])):
        with contextlib.suppress(FrameError):  # anything else fails the test
            decoders[kind](head + raw)


def test_frame_error_is_a_400() -> None:
    assert issubclass(FrameError, BadRequest) and FrameError("x").status == 400


Q = np.zeros((1, DIM), dtype="<f4")


BAD_SEARCHES = [
    (frames.encode_search(np.zeros((1, DIM + 1), "<f4"), 5, None, [0], None, 0), "dimension"),
    (frames.encode_search(Q, 0, None, [0], None, 0), "k must be"),
    (frames.encode_search(Q, 2000, None, [0], None, 0), "k must be"),
    (frames.encode_search(Q, 5, None, [SHARDS], None, 0), "shards must be below"),
    (frames.encode_search(Q, 5, None, [0], None, 16), "flags"),
    (frames.encode_search(Q, 5, None, [0], None, 0, 1.5), "recall"),
    (frames.encode_search(Q, 5, None, [0], None, 0, float("nan")), "recall"),
    (frames.encode_search(Q, 5, 8, [0], None, 0, 0.9), "not both"),
    (frames.encode_search(np.full((1, DIM), np.inf, "<f4"), 5, None, [0], None, 0), "finite"),
    (frames.encode_search(np.full((1, DIM), -1e20, "<f4"), 5, None, [0], None, 0), "within"),
    (frames.encode_search(np.zeros((0, DIM), "<f4"), 5, None, [0], None, 0), "nq"),
    (struct.pack("<BBIIIIBH", 1, 1, 1000, DIM, 1001, 0, 0, 0), "nq × k"),
    # A count that promises far more than the frame holds: refused before anything is read.
    (struct.pack("<BBIIIIBH", 1, 1, 1, DIM, 5, 0, 0, 0) + struct.pack("<I", 1 << 30), "filter"),
]


def test_search_by_recall_round_trip_and_refusals() -> None:
    frame = frames.encode_search(Q, 5, None, [0, 2], {"must": []}, frames.EXPLAIN, 0.95)
    got = frames.decode_search(frame, DIM, SHARDS)
    assert (got.recall, got.nprobe, got.flags) == (0.95, None, frames.EXPLAIN | frames.BY_RECALL)
    assert frames.decode_search(frames.encode_search(Q, 5, 4, [0], None, 0), DIM,
                                SHARDS).recall is None
    refused_everywhere(frame, lambda b: frames.decode_search(b, DIM, SHARDS))


@pytest.mark.parametrize(("frame", "why"), BAD_SEARCHES,
                         ids=[f"{i}-{why}" for i, (_, why) in enumerate(BAD_SEARCHES)])
def test_search_fields_out_of_bounds(frame: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        frames.decode_search(frame, DIM, SHARDS)


def test_hits_out_of_bounds() -> None:
    def hits(**kw: Any) -> bytes:
        h = {"id": "a", "score": 1.0, "metadata": b"{}", "vector": b"", "shard": 0, **kw}
        return frames.encode_hits([[Hit(**h)]], 1, DIM)

    with pytest.raises(FrameError, match="shard that was not asked"):
        frames.decode_hits(hits(shard=5), 1, 5, 1, DIM, [0, 1])
    with pytest.raises(FrameError, match="finite"):
        frames.decode_hits(hits(score=float("nan")), 1, 5, 1, DIM, [0])
    with pytest.raises(FrameError, match="1 to 256 characters"):
        frames.decode_hits(hits(id="x" * 257), 1, 5, 1, DIM, [0])
    two = frames.encode_hits([[Hit("a", 1.0, b"{}", b"", 0)] * 2], 1, DIM)
    with pytest.raises(FrameError, match="hit count"):
        frames.decode_hits(two, 1, 1, 1, DIM, [0])
    split = frames.encode_hits([[], [Hit("a", 1.0, b"{}", b"", 0)] * 2], 1, DIM)
    with pytest.raises(FrameError, match="more than 1 hits"):
        frames.decode_hits(split, 2, 1, 1, DIM, [0])
    with pytest.raises(FrameError, match="dim must be"):  # vectors asked for, none sent
        frames.decode_hits(hits(), 1, 5, 3, DIM, [0])
    # Metadata goes into the coordinator's answer as it is: a peer's is a JSON object or
    # the answer is refused (not spliced into a client's JSON).
    for meta in (b'1}],"partial":true,"x":{', b"[1]", b'{"a":NaN}'):
        with pytest.raises(FrameError, match="metadata"):
            frames.decode_hits(hits(metadata=meta), 1, 5, 1, DIM, [0])
    assert frames.decode_hits(hits(metadata=b' {"a": [1]} '), 1, 5, 1, DIM, [0]).rows
    # A later piece of metadata that is not an object fails the answer as the first would.
    mixed = frames.encode_hits([[Hit("a", 1.0, b"{}", b"", 0), Hit("b", 0.5, b"[]", b"", 0)]],
                               1, DIM)
    with pytest.raises(FrameError, match="metadata"):
        frames.decode_hits(mixed, 1, 5, 1, DIM, [0])


def test_ids_are_utf8_each_not_only_together() -> None:
    """The ids' bytes are decoded at once when they are ASCII; otherwise each id must be UTF-8
    on its own: a character cut between two ids is refused though the whole is UTF-8."""
    frame = frames.encode_hits([[Hit("ab", 1.0, b"{}", b"", 0), Hit("é", 0.5, b"{}", b"", 0)]],
                               1, DIM)
    assert [h.id for h in frames.decode_hits(frame, 1, 5, 1, DIM, [0]).rows[0]] == ["ab", "é"]
    # The same bytes with the lengths moved by one: "ab\xc3" and "\xa9".
    lens = struct.pack("<HH", 2, 2)
    assert lens in frame
    cut = frame.replace(lens, struct.pack("<HH", 3, 1), 1)
    with pytest.raises(FrameError, match="UTF-8"):
        frames.decode_hits(cut, 1, 5, 1, DIM, [0])


def test_write_out_of_bounds() -> None:
    doc = Incoming("a", np.zeros(DIM, "<f4"), b"{}", 5, "n1")
    with pytest.raises(FrameError, match="dimension"):
        frames.decode_write(frames.encode_write(None, None, DIM, {0: [doc]}), DIM + 1)
    with pytest.raises(FrameError, match="shard must be"):
        frames.decode_write(frames.encode_write(None, None, DIM, {9: [doc]}), DIM, SHARDS)
    for meta in (b"[1]", b"{", b"1"):
        bad = Incoming("a", np.zeros(DIM, "<f4"), meta, 5, "n1")
        with pytest.raises(FrameError, match="not a JSON object"):
            frames.decode_write(frames.encode_write(None, None, DIM, {0: [bad]}), DIM)
    nan = Incoming("a", np.full(DIM, np.nan, "<f4"), b"{}", 5, "n1")
    with pytest.raises(FrameError, match="finite"):
        frames.decode_write(frames.encode_write(None, None, DIM, {0: [nan]}), DIM)
    with pytest.raises(FrameError, match="appears twice"):
        one = frames.encode_write(None, None, DIM, {0: [doc]})
        head = len(one) - len(frames.encode_write(None, None, DIM, {}))
        body = one[-head:]
        twice = one[:-head - 2] + struct.pack("<H", 2) + body + body
        # the part count sits just before the first part
        frames.decode_write(twice, DIM)


# --- sub-searches that arrive together travel together (coalesce.py) -------------------------


class GatedNode:
    """A node's search as the coalescer sends it: records each request's vectors; answers,
    per query, one hit named after the query's first value; holds while `gate` is closed."""

    def __init__(self) -> None:
        self.sent: list[np.ndarray] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def send(self, vectors: np.ndarray, budget: float) -> tuple[list[list[Hit]], object]:
        self.sent.append(vectors)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [[Hit(f"q{v[0]:g}", float(v[0]), b"{}", b"", 0)] for v in vectors], len(self.sent)


async def rows_of(search: Awaitable[tuple[list[list[Hit]], object]]) -> list[list[Hit]]:
    return (await search)[0]


def queries(*firsts: float) -> np.ndarray:
    return np.array([[f, 0.0] for f in firsts], dtype=np.float32)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_coalescer_sends_alone_at_low_load_and_together_under_load() -> None:
    node, co = GatedNode(), Coalescer(parallel=1)
    first = asyncio.ensure_future(co.search("k", queries(1), 1.0, node.send))
    await settle()
    assert len(node.sent) == 1  # nothing in flight: it went at once
    later = [asyncio.ensure_future(co.search("k", queries(f, f + 0.5), 1.0, node.send))
             for f in (2, 3, 4)]
    other = asyncio.ensure_future(co.search("other", queries(9), 1.0, node.send))
    await settle()
    assert len(node.sent) == 2  # the other key went at once; "k" queued behind the first
    node.gate.set()
    assert [h.id for r in await rows_of(first) for h in r] == ["q1"]
    got = [await t for t in later]
    assert [[h.id for r in rows for h in r] for rows, _ in got] == \
        [["q2", "q2.5"], ["q3", "q3.5"], ["q4", "q4.5"]]
    # What the request answered of all its queries is every caller's.
    assert [shared for _, shared in got] == [3, 3, 3]
    assert [h.id for r in await rows_of(other) for h in r] == ["q9"]
    # The three queued searches went as one request of their six queries.
    assert len(node.sent) == 3 and node.sent[2].shape == (6, 2) and co.batches == 1
    assert co._running == {} and co._queues == {}  # nothing left behind


async def test_coalescer_failure_reaches_every_waiter_and_gave_up_ones_are_left_out() -> None:
    node, co = GatedNode(), Coalescer(parallel=1)
    first = asyncio.ensure_future(co.search("k", queries(1), 1.0, node.send))
    await settle()
    waiting = [asyncio.ensure_future(co.search("k", queries(f), 1.0, node.send))
               for f in (2, 3, 4)]
    await settle()
    waiting[1].cancel()  # its caller's deadline came
    node.fail = Unavailable("node gone")
    node.gate.set()
    with pytest.raises(Unavailable):
        await first
    for i in (0, 2):
        with pytest.raises(Unavailable):
            await waiting[i]
    assert [v.shape[0] for v in node.sent] == [1, 2]  # the one that gave up was not sent
    assert co._running == {} and co._queues == {}


async def test_coalescer_cancels_a_request_whose_callers_all_gave_up() -> None:
    """A queued batch sent to a slow or dead peer whose callers all gave up (their deadlines
    came) is cancelled: the key's next search goes at once, not after the abandoned request's
    budget; a batch that still has a caller goes on."""
    node, co = GatedNode(), Coalescer(parallel=1)
    first = asyncio.ensure_future(co.search("k", queries(1), 1.0, node.send))
    await settle()
    queued = [asyncio.ensure_future(co.search("k", queries(f), 1.0, node.send))
              for f in (2, 3)]
    await settle()
    first.cancel()  # its caller's deadline came: the queued two go as one request
    await settle()
    assert [v.shape[0] for v in node.sent] == [1, 2]
    queued[0].cancel()
    await settle()
    assert co._running == {"k": 1}  # one caller still waits: the request goes on
    queued[1].cancel()
    later = asyncio.ensure_future(co.search("k", queries(4), 1.0, node.send))
    for _ in range(100):  # polled: a few turns of the loop, never the peer's budget
        if len(node.sent) == 3:
            break
        await asyncio.sleep(0)
    assert [v.shape[0] for v in node.sent] == [1, 2, 1], "queued behind an abandoned request"
    node.gate.set()
    assert [h.id for r in await rows_of(later) for h in r] == ["q4"]
    assert co._running == {} and co._queues == {} and not co._tasks


async def test_coalescer_caps_the_rows_of_a_request() -> None:
    node, co = GatedNode(), Coalescer(parallel=1, max_rows=3)
    first = asyncio.ensure_future(co.search("k", queries(1), 1.0, node.send))
    await settle()
    rest = [asyncio.ensure_future(co.search("k", queries(*range(10 * f, 10 * f + 2)), 1.0,
                                            node.send)) for f in (1, 2, 3)]
    big = asyncio.ensure_future(co.search("k", queries(*range(100, 105)), 1.0, node.send))
    await settle()
    node.gate.set()
    await asyncio.gather(first, *rest, big)
    # 2 + 2 > 3: each queued search of two goes alone; one above the cap goes alone too.
    assert [v.shape[0] for v in node.sent] == [1, 2, 2, 2, 5]
    assert [h.id for r in await rows_of(big) for h in r] == [f"q{i}" for i in range(100, 105)]


@contextlib.asynccontextmanager
async def filled(documents: int) -> AsyncIterator[tuple[SimCluster, ClusterService,
                                                        CollectionEntry]]:
    """A 3-node in-process cluster with collection "c" (6 shards, one replica each) holding
    `documents` documents: the cluster, n1's service and the collection's entry."""
    sim = SimCluster(3)
    await sim.start()
    try:
        svc = sim.node("n1").svc
        await sim.run(svc.collections.create(simspec("c", shards=6, replication=1)))
        ids = [f"d{i:03d}" for i in range(documents)]
        await sim.run(svc.writes.upsert(svc.collections.entry("c"), batch(ids)))
        yield sim, svc, svc.collections.entry("c")
    finally:
        await sim.stop()


async def test_concurrent_searches_through_the_cluster_equal_one_by_one() -> None:
    """Through the in-process cluster (RemoteReplica, frames, MemoryPeers, PeerService):
    searches sent all at once give exactly the answers they give one at a time, in fewer
    peer requests."""
    async with filled(90) as (sim, svc, entry):
        rng = np.random.default_rng(3)
        qs = rng.normal(size=(24, 4)).astype(np.float32)

        def req(i: int) -> SearchRequest:
            return SearchRequest(qs[i : i + 1], 5, None, None, None, True, True, False, None)

        alone = []
        before = sim.hub.requests
        for i in range(len(qs)):
            alone.append(orjson.loads(orjson.dumps(
                (await sim.run(svc.reads.search(entry, req(i))))["results"])))
        one_by_one = sim.hub.requests - before
        before = sim.hub.requests
        together = await sim.run(asyncio.gather(*(svc.reads.search(entry, req(i))
                                                  for i in range(len(qs)))))
        got = [orjson.loads(orjson.dumps(t["results"])) for t in together]
        # The same hits; scores up to float32 rounding (a batch is computed as a matrix).
        assert [[[(h["id"], h["metadata"], h["vector"]) for h in r] for r in g] for g in got] \
            == [[[(h["id"], h["metadata"], h["vector"]) for h in r] for r in a] for a in alone]
        assert [h["score"] for g in got for r in g for h in r] == pytest.approx(
            [h["score"] for a in alone for r in a for h in r], rel=1e-5)
        assert sim.hub.requests - before < one_by_one / 2


async def test_searches_coalesced_stay_within_the_peers_bound_of_queries_times_k() -> None:
    """Searches that are each within queries × k <= 100,000 do not become, coalesced, one
    frame beyond it (which the peer refuses, a 400 to every client of the batch)."""
    async with filled(30) as (sim, svc, entry):
        qs = np.random.default_rng(5).normal(size=(60, 4)).astype(np.float32)
        req = SearchRequest(qs, 1000, None, None, None, True, False, False, None)
        got = await sim.run(asyncio.gather(*(svc.reads.search(entry, req)
                                             for _ in range(6))))
        assert all(len(g["results"]) == 60 and len(g["results"][0]) == 30 for g in got)


async def test_searches_by_recall_sent_together_each_say_every_shards_nprobe() -> None:
    """A search by recall says the nprobe used for every shard, also when it went to a peer
    together with others (the peer's plans are every caller's, not the first one's); and
    such searches do go together (an unfiltered search's plans do not depend on its
    vectors), in fewer peer requests than one by one."""
    async with filled(30) as (sim, svc, entry):
        qs = np.random.default_rng(6).normal(size=(12, 4)).astype(np.float32)
        reqs = [SearchRequest(qs[i : i + 1], 5, None, None, None, True, False, False, None,
                              recall=0.9) for i in range(len(qs))]
        before = sim.hub.requests
        alone = [await sim.run(svc.reads.search(entry, r)) for r in reqs]
        one_by_one = sim.hub.requests - before
        before = sim.hub.requests
        got = await sim.run(asyncio.gather(*(svc.reads.search(entry, r) for r in reqs)))
        assert sim.hub.requests - before < one_by_one / 2
        assert all([p["shard"] for p in g["nprobes"]] == list(range(6)) for g in got)
        assert [g["nprobes"] for g in got] == [a["nprobes"] for a in alone]
        assert [[[h["id"] for h in r] for r in g["results"]] for g in got] == \
            [[[h["id"] for h in r] for r in a["results"]] for a in alone]


async def test_filtered_searches_with_plans_go_alone_and_keep_their_own() -> None:
    """A filtered search's plans depend on its queries: with plans asked for (explain), it
    is not sent together with others, and each says its own plans."""
    async with filled(30) as (sim, svc, entry):
        qs = np.random.default_rng(7).normal(size=(6, 4)).astype(np.float32)
        where = {"must": [{"key": "n", "range": {"gte": 0}}]}
        reqs = [SearchRequest(qs[i : i + 1], 5, None, where, parse_filter(where), True, False,
                              False, None, explain=True) for i in range(len(qs))]
        before = sim.hub.requests
        alone = [await sim.run(svc.reads.search(entry, r)) for r in reqs]
        one_by_one = sim.hub.requests - before
        before = sim.hub.requests
        got = await sim.run(asyncio.gather(*(svc.reads.search(entry, r) for r in reqs)))
        assert sim.hub.requests - before == one_by_one
        assert [g["plans"] for g in got] == [a["plans"] for a in alone]


# --- the lean client of the frames (cluster/peers/lean.py), against a scripted server ---------


CLOSE = b"<close>"


class Scripted:
    """A TCP server on 127.0.0.1 that reads one request at a time and answers with the next
    of `answers` (raw bytes, in pieces with a pause between); None closes the connection, as
    does an answer that ends with CLOSE once it is written."""

    def __init__(self, answers: list[list[bytes] | None]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if answer is None:
                    break
                if answer[-1] == CLOSE:
                    self.answers.clear()  # after this answer, the connection closes
                for piece in answer:
                    if piece == CLOSE:
                        break
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def ok(body: bytes, *extra: bytes) -> list[bytes]:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-aquila-frame\r\n"
            + b"".join(e + b"\r\n" for e in extra)
            + b"Content-Length: %d\r\n\r\n" % len(body))
    return [head[:10], head[10:] + body[:3], body[3:]]  # in pieces, as TCP may deliver it


async def test_lean_client_keeps_connections_and_reads_answers_in_pieces() -> None:
    srv = Scripted([ok(b"first answer"), ok(b"second")])
    port = await srv.start()
    client = LeanClient(1 << 20)
    try:
        got = await client.request("x:1", "127.0.0.1", port, "POST", "/p?q=1",
                                   {"X-A": "b"}, b"body!")
        assert got == (200, "application/x-aquila-frame", b"first answer")
        assert await client.request("x:1", "127.0.0.1", port, "POST", "/p", {}, b"") == \
            (200, "application/x-aquila-frame", b"second")
        assert srv.connections == 1  # kept alive and reused
        assert srv.requests[0].startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: x:1\r\n")
        assert srv.requests[0].endswith(b"\r\nX-A: b\r\n\r\nbody!")
    finally:
        client.close()
        await srv.stop()


async def test_lean_client_retries_once_on_a_connection_the_peer_closed() -> None:
    srv = Scripted([ok(b"one"), None, ok(b"two")])
    port = await srv.start()
    client = LeanClient(1 << 20)
    try:
        assert (await client.request("a", "127.0.0.1", port, "POST", "/", {}, b""))[2] == b"one"
        # The server takes the next request and closes without an answer: sent again, anew.
        assert (await client.request("a", "127.0.0.1", port, "POST", "/", {}, b""))[2] == b"two"
        assert srv.connections == 2 and len(srv.requests) == 3
    finally:
        client.close()
        await srv.stop()


@pytest.mark.parametrize("answer", [
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\n\r\nno length"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\ntoo long"],
    [b"SSH-2.0-OpenSSH\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000 + b"\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", CLOSE],  # truncated
], ids=["chunked", "no-length", "too-long", "extra-bytes", "not-http", "huge-head", "cut"])
async def test_lean_client_refuses_what_is_not_a_stated_answer(answer: list[bytes]) -> None:
    srv = Scripted([answer, None])
    port = await srv.start()
    client = LeanClient(1 << 20)
    try:
        with pytest.raises(LeanError):
            await asyncio.wait_for(
                client.request("a", "127.0.0.1", port, "POST", "/", {}, b""), 5)
    finally:
        client.close()
        await srv.stop()


async def test_lean_client_cannot_connect() -> None:
    srv = Scripted([])
    port = await srv.start()
    await srv.stop()
    with pytest.raises(LeanError, match="cannot connect"):
        await LeanClient(1 << 20).request("a", "127.0.0.1", port, "POST", "/", {}, b"")


@PROPS
@given(st.lists(st.lists(
    st.floats(width=32) | st.sampled_from([1e15, -1e15, 1.0000001e15, 5e14, 2e15, 3e38]),
    min_size=1, max_size=8), min_size=1, max_size=3).filter(
        lambda rows: len({len(r) for r in rows}) == 1))
def test_a_frames_bounds_check_equals_the_componentwise_one(rows: list[list[float]]) -> None:
    """A query frame's vectors are checked by one dot product when small (`frames.within`):
    the same verdict as component by component, at the bound, beyond it, NaN and infinities
    included."""
    x = np.array(rows, dtype=np.float32)
    assert frames.within(x) == bool(vectors_within(x).all())
    for scale in (1e13, 4.9e14, 5.1e14):
        y = np.full_like(x, scale)
        assert frames.within(y) == bool(vectors_within(y).all())
