"""A coordinator's own part of a search read after the merge (`Found`): searched into scores
and keys (`Collection.search_found`, `MemoryBackend.search_found`), merged with the peers'
hits, and only the survivors' documents read (`read_found`, `fanout.merge_found`). The answer
is the one the old path gives (every local hit read at the search, then `merge_rows`): ties,
with vectors, a hit deleted between the search and the read (the next one takes its place),
keys of shards cut by a hedge; labels given again meanwhile are refused (StaleFound)."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any, cast

import numpy as np
import orjson
import pytest

from aquila.cluster.clock import SystemClock
from aquila.cluster.membership.view import MemberView
from aquila.cluster.model.documents import Found, Hit, Incoming, StaleFound
from aquila.cluster.model.operations import SearchRequest
from aquila.cluster.model.sharding import shard_of
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.cluster.replication.fanout import _hits_of, merge_found, merge_rows
from aquila.cluster.replication.membackend import MemoryBackend
from aquila.cluster.replication.reads import ReadPath
from aquila.cluster.replication.replica import LocalReplica, Replica, Replicas
from aquila.cluster.state.entries import ClusterState, CollectionEntry
from aquila.node.storage import collection as collection_module
from aquila.node.storage import search
from aquila.node.storage.collection import Collection
from aquila.node.storage.index import LABEL_BITS
from aquila.node.storage.store import label_key
from tests import test_search_reads
from tests.datasets import load_sample

# The collection: 400 sample documents over 4 shards, ids "0"..., metadata {"i": i}.
coll = test_search_reads.coll
N, SHARDS = test_search_reads.N, test_search_reads.SHARDS
K = 10


def _docs(base: np.ndarray, version: int = 1) -> dict[int, list[Incoming]]:
    by: dict[int, list[Incoming]] = {}
    for i, v in enumerate(base):
        by.setdefault(shard_of(str(i), SHARDS), []).append(
            Incoming(str(i), v, b'{"i":%d}' % i, version, "n"))
    return by


@pytest.fixture(params=["few", "arrays"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The survivors read one by one, then on arrays."""
    monkeypatch.setattr(search, "FEW_HITS", 1 << 30 if request.param == "few" else 0)
    return str(request.param)


def _rows(rows: list[list[Hit]]) -> list[list[tuple[Any, ...]]]:
    return [[(h.id, h.score, h.metadata, h.vector, h.shard) for h in row] for row in rows]


def _peer_rows(local: list[list[Hit]], rng: random.Random, shard: int = 99) -> list[list[Hit]]:
    """A peer's answer per query: k hits best first, half of them with the score of one of
    the local hits (ties), the others between the local hits' scores."""
    out = []
    for q, row in enumerate(local):
        scores = [h.score for h in row] or [0.5]
        mine = [rng.choice(scores) if i % 2 else rng.uniform(min(scores) - 0.05, max(scores))
                for i in range(K)]
        mine.sort(reverse=True)
        out.append([Hit(f"p{q}-{i}", s, b'{"peer":1}', b"", shard) for i, s in enumerate(mine)])
    return out


class Counted:
    """`read_found` of a collection, counting the keys asked for."""

    def __init__(self, read: Any, with_vectors: bool) -> None:
        self.read = read
        self.with_vectors = with_vectors
        self.keys: list[int] = []

    async def __call__(self, found: Found, keys: list[int]) -> list[Hit | None]:
        self.keys.extend(keys)
        got: list[Hit | None] = await self.read(found, keys, self.with_vectors)
        return got


@pytest.mark.parametrize("with_vectors", [False, True])
@pytest.mark.parametrize("local_first", [False, True])
async def test_the_merge_of_a_found_equals_the_old_path(
        coll: Collection, path: str, with_vectors: bool, local_first: bool) -> None:
    smp = load_sample()
    rng = random.Random(f"{with_vectors}{local_first}")
    q = smp.queries[:12]
    old = await coll.search(q, K, None, with_vectors=with_vectors)
    found = await coll.search_found(q, K, None)
    peers = _peer_rows(old, rng)
    answers_old: list[list[list[Hit]]] = [old, peers] if local_first else [peers, old]
    answers_new: list[list[list[Hit]] | Found] = (
        [found, peers] if local_first else [peers, found])
    reader = Counted(coll.read_found, with_vectors)
    got = await merge_found(answers_new, len(q), K, True, reader)
    assert _rows(got) == _rows(merge_rows(answers_old, len(q), K, True))
    # Only the survivors were read, each once.
    kept = sum(1 for row in got for h in row if h.shard != 99)
    assert len(reader.keys) == len(set(reader.keys)) or kept < len(reader.keys)
    assert len(set(reader.keys)) <= kept
    assert kept < len(q) * K  # the peers' ties and better scores took some places


async def test_a_hit_deleted_before_its_read_gives_its_place_to_the_next(
        coll: Collection, path: str) -> None:
    smp = load_sample()
    rng = random.Random(3)
    q = smp.queries[:8]
    old = await coll.search(q, K, None)
    found = await coll.search_found(q, K, None)
    peers = _peer_rows(old, rng)
    # The best local hit of every query, and a few others, deleted meanwhile.
    gone = {row[0].id for row in old} | {row[3].id for row in old[::2]}
    dels: dict[int, list[Incoming]] = {}
    for doc_id in gone:
        dels.setdefault(shard_of(doc_id, SHARDS), []).append(
            Incoming(doc_id, None, b"", 2, "n"))
    await coll.write(dels)
    expected = merge_rows([peers, [[h for h in row if h.id not in gone] for row in old]],
                          len(q), K, True)
    got = await merge_found([peers, found], len(q), K, True,
                            Counted(coll.read_found, False))
    assert _rows(got) == _rows(expected)
    assert not {h.id for row in got for h in row} & gone


async def test_keys_of_shards_a_hedge_answered_first_are_left_out(coll: Collection) -> None:
    smp = load_sample()
    q = smp.queries[:5]
    found = await coll.search_found(q, K, None)
    cut = _hits_of(found, [0, 2])
    assert isinstance(cut, Found)
    got = await merge_found([cut], len(q), K, True, Counted(coll.read_found, False))
    old = await coll.search(q, K, None)
    assert _rows(got) == _rows([[h for h in row if h.shard in (0, 2)] for row in old])
    assert any(len(row) < K for row in got)  # the other shards' hits were there


async def test_labels_given_again_since_the_search_are_not_read(coll: Collection) -> None:
    smp = load_sample()
    found = await coll.search_found(smp.queries[:2], K, None)
    keys = [int(k) for k in found.keys[0][:3]]
    assert len(await coll.read_found(found, keys, False)) == 3
    coll.relabelled += 1  # as a release of labels, a shard dropped or taken on does
    with pytest.raises(StaleFound):
        await coll.read_found(found, keys, False)


async def test_a_batched_search_found_holds_the_batchs_rows(coll: Collection) -> None:
    """Off the event loop (the batcher, a search thread), the same hits as inline."""
    smp = load_sample()
    q = smp.queries[:4]
    inline = await coll.search_found(q, K, None, inline=True)
    batched = await coll.search_found(q, K, None, inline=False)
    assert np.array_equal(inline.keys, batched.keys)
    assert np.allclose(inline.scores, batched.scores)


async def test_the_in_memory_twin_answers_as_its_search_does() -> None:
    smp = load_sample()
    backend = MemoryBackend()
    spec = CollectionSpec("c", smp.dim, "l2", SHARDS, 1, IndexSpec("flat"))
    await backend.ensure(spec, range(SHARDS), "u")
    await backend.write(spec, _docs(smp.base[:200]))
    q = smp.queries[:6]
    rng = random.Random(5)
    old = await backend.search(spec, q, K, None, None, range(SHARDS), True)
    found = await backend.search_found(spec, q, K, None, range(SHARDS))
    peers = [[Hit(h.id + "p", h.score + rng.choice([0.0, 0.01]), b"{}", b"", 99)
              for h in row[::2]] for row in old]

    async def read(f: Found, keys: list[int]) -> list[Hit | None]:
        return await backend.read_found(spec, f, keys, True)

    got = await merge_found([peers, found], len(q), K, False, read)
    assert _rows(got) == _rows(merge_rows([peers, old], len(q), K, False))
    # Deleted since: left out; written again since: as it is now (the engine's document
    # keeps its label).
    first = old[0][0].id
    second = old[1][0].id
    await backend.write(spec, {shard_of(first, SHARDS): [Incoming(first, None, b"", 5, "n")]})
    await backend.write(spec, {shard_of(second, SHARDS): [
        Incoming(second, smp.base[int(second)], b'{"again":1}', 5, "n")]})
    got = await merge_found([peers, found], len(q), K, False, read)
    by_id = {h.id: h for row in got for h in row}
    assert first not in by_id
    assert by_id[second].metadata == b'{"again":1}'
    assert by_id[second].score == old[1][0].score  # the score the search gave it
    await backend.ensure(spec, range(SHARDS), "v")  # created again
    with pytest.raises(StaleFound):
        await backend.read_found(spec, found, [0], False)



class _Proxy:
    """A node's own replica that is not a `LocalReplica`: the read path searches it the old
    way (every hit read at the search)."""

    def __init__(self, inner: LocalReplica) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _StaleOnce(MemoryBackend):
    """Its first `read_found` finds the labels given again (as a release would)."""

    stale = 0

    async def read_found(self, spec: CollectionSpec, found: Found, keys: list[int],
                         with_vectors: bool) -> list[Hit | None]:
        if not self.stale:
            self.stale += 1
            raise StaleFound("labels given again")
        return await super().read_found(spec, found, keys, with_vectors)


class _View:
    generation = 0

    def table(self) -> dict[str, Any]:
        return {}

    def ordered(self, replicas: Any) -> list[str]:
        return list(replicas)


async def _three_nodes(mine: MemoryBackend) -> tuple[CollectionEntry, dict[str, MemoryBackend]]:
    smp = load_sample()
    spec = CollectionSpec("c", smp.dim, "cosine", SHARDS, 1, IndexSpec("flat"))
    owner = {0: "n1", 1: "n2", 2: "n1", 3: "n3"}
    nodes = {"n1": mine, "n2": MemoryBackend(), "n3": MemoryBackend()}
    docs = _docs(smp.base[:300])
    for node, backend in nodes.items():
        held = [s for s, o in owner.items() if o == node]
        await backend.ensure(spec, held, "u")
        await backend.write(spec, {s: docs[s] for s in held})
    entry = CollectionEntry(spec, tuple((owner[s],) for s in range(SHARDS)), 1, "u")
    return entry, nodes


def _read_path(nodes: dict[str, MemoryBackend], found: bool) -> ReadPath:
    state = cast(ClusterState, None)  # searches never ask it
    local = LocalReplica("n1", nodes["n1"], state)
    replicas = Replicas("n1", local if found else cast(Replica, _Proxy(local)),
                        lambda n: LocalReplica(n, nodes[n], state))
    return ReadPath(cast(MemberView, _View()), replicas, SystemClock())


@pytest.mark.parametrize("with_vectors", [False, True])
@pytest.mark.parametrize("stale", [False, True])
@pytest.mark.parametrize("explain", [False, True])
async def test_a_read_path_answers_as_the_old_path(with_vectors: bool, stale: bool,
                                                   explain: bool) -> None:
    smp = load_sample()
    entry, nodes = await _three_nodes(_StaleOnce() if stale else MemoryBackend())
    req = SearchRequest(smp.queries[:7], K, None, None, None, True, with_vectors, False, None,
                        explain)
    new = await _read_path(nodes, True).search(entry, req)
    old = await _read_path(nodes, False).search(entry, req)
    new.pop("took_ms"), old.pop("took_ms")
    assert orjson.dumps(new) == orjson.dumps(old)
    assert all(len(row) == K for row in new["results"])
    if stale:
        assert cast(_StaleOnce, nodes["n1"]).stale == 1
    if explain:
        assert [p["node"] for p in new["plans"]] == ["n1", "n2", "n1", "n3"]


def _id_in(shard: int, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if shard_of(f"{prefix}{i}", SHARDS) == shard)


async def test_labels_a_purge_frees_are_not_read(coll: Collection) -> None:
    """A purge of tombstones that still hold their labels (a snapshot covered their delete,
    its release not made yet) frees them too: a key found before names the document that
    takes the label next, and is refused as after a release."""
    smp = load_sample()
    found = await coll.search_found(smp.queries[:1], K, None)
    key = found.keys[0][0]
    shard = key >> LABEL_BITS
    hit = (await coll.read_found(found, [key], False))[0]
    assert hit is not None
    await coll.write({shard: [Incoming(hit.id, None, b"", 2, "n")]})
    await coll._save()  # a snapshot covers the delete; `snapshot` releases labels next
    assert await coll.purge_tombstones(shard, 10) == 1
    new = _id_in(shard, "new")
    await coll.write({shard: [Incoming(new, smp.base[N], b'{"new":1}', 3, "n")]})
    assert coll.store.raw_records([label_key(shard, key & ((1 << LABEL_BITS) - 1))]) == [
        new.encode()]  # the label names the new document now
    with pytest.raises(StaleFound):
        await coll.read_found(found, [key], False)


async def test_a_close_during_a_read_on_a_search_thread(
        coll: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection closed (dropped, or created again under its name) while a search thread
    reads a `Found`'s documents: the read answers, or says to search again (StaleFound),
    never "store is not open" (a 500)."""
    smp = load_sample()
    found = await coll.search_found(smp.queries[:2], K, None)
    keys = found.keys[0][:3]
    entered, go = threading.Event(), threading.Event()
    real = collection_module.read_keys

    def held(*args: Any) -> Any:
        entered.set()
        assert go.wait(10)
        return real(*args)

    monkeypatch.setattr(collection_module, "read_keys", held)
    read = asyncio.ensure_future(coll.read_found(found, keys, True))
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, entered.wait, 10)
    close = asyncio.ensure_future(coll.close(snapshot=False))
    deadline = loop.time() + 10
    # The close went on (the store closed) or waits for the read (a writer waiting).
    while coll.store._db is not None and not coll.rw._writers_waiting:
        assert loop.time() < deadline
        await asyncio.sleep(0.001)
    go.set()
    await close
    try:
        got = await read
    except StaleFound:
        pass
    else:
        assert all(h is not None for h in got)
    with pytest.raises(StaleFound):  # closed: searched again, not read from a closed store
        await coll.read_found(found, keys, False)


@pytest.mark.parametrize("how", ["dropped", "dropped and taken on again"])
async def test_the_twin_refuses_keys_of_a_shard_dropped_since(how: str) -> None:
    """As the engine (`relabelled`): a shard dropped (moved away) since the search, or taken
    on again since, refuses the keys (searched again: its hits are not silently left out,
    as if deleted, without the shard being missing)."""
    smp = load_sample()
    backend = MemoryBackend()
    spec = CollectionSpec("c", smp.dim, "l2", SHARDS, 1, IndexSpec("flat"))
    await backend.ensure(spec, range(SHARDS), "u")
    await backend.write(spec, _docs(smp.base[:200]))
    found = await backend.search_found(spec, smp.queries[:1], K, None, range(SHARDS))
    shard = found.shards[0][0]
    await backend.drop_shard("c", shard)
    if how != "dropped":
        await backend.ensure(spec, [shard], "u")
    with pytest.raises(StaleFound):
        await backend.read_found(spec, found, [found.keys[0][0]], False)


async def test_a_search_again_after_stale_keys_keeps_to_the_searchs_deadline(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search whose own keys were found stale runs again the old way: within what is left
    of its timeout, not a whole new one."""
    from aquila.cluster.replication import reads

    class SlowStale(_StaleOnce):
        async def read_found(self, spec: CollectionSpec, found: Found, keys: list[int],
                             with_vectors: bool) -> list[Hit | None]:
            if not self.stale:
                await asyncio.sleep(0.3)  # the first try spends part of the budget
            return await super().read_found(spec, found, keys, with_vectors)

    budgets: list[float] = []
    real = reads.fan_out

    async def fan_out(*args: Any) -> Any:
        budgets.append(args[6])
        return await real(*args)

    monkeypatch.setattr(reads, "fan_out", fan_out)
    smp = load_sample()
    entry, nodes = await _three_nodes(SlowStale())
    req = SearchRequest(smp.queries[:2], K, None, None, None, True, False, False, 2000)
    got = await _read_path(nodes, True).search(entry, req)
    assert all(len(row) == K for row in got["results"])
    assert len(budgets) == 2 and budgets[0] == 2.0
    assert budgets[1] <= 2.0 - 0.3
