"""Count, scroll and the search by stored id on one real node (RocksDB, FAISS) over HTTP,
against oracles on the committed sample: filtered and not, pages of every size, writes going
on during a scroll, and cursors that were forged, damaged or outlived their collection."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.node.storage import paging
from tests.conftest import Node, brute_force, expect_error, ok_json
from tests.datasets import load_sample
from tests.test_columnar import columnar

N = 2000
NAME = "wn"


def sample_docs(n: int = N) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    s = load_sample()
    ids = [m["id"] for m in s.base_meta[:n]]
    # A numeric field too, for ranges: the row number.
    metas = [{"pos": m["pos"], "row": i} for i, m in enumerate(s.base_meta[:n])]
    return ids, np.ascontiguousarray(s.base[:n]), metas


async def load(node: Node, name: str = NAME, shards: int = 4, n: int = N) -> None:
    ids, x, metas = sample_docs(n)
    await node.create(name, x.shape[1], metric="cosine", shards=shards)
    for lo in range(0, n, 700):
        resp = await node.post_json(f"/v1/collections/{name}/documents",
                                    columnar(ids[lo:lo + 700], x[lo:lo + 700], metas[lo:lo + 700]))
        await ok_json(resp)


async def count(node: Node, name: str = NAME, **body: Any) -> dict[str, Any]:
    return await ok_json(await node.post_json(f"/v1/collections/{name}/count", body))  # type: ignore[no-any-return]


async def page(node: Node, name: str = NAME, **body: Any) -> dict[str, Any]:
    return await ok_json(await node.post_json(f"/v1/collections/{name}/scroll", body))  # type: ignore[no-any-return]


async def scroll_all(node: Node, name: str = NAME, **body: Any) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    cursor = None
    for _ in range(10_000):
        got = await page(node, name, cursor=cursor, **body)
        assert len(got["documents"]) <= body.get("limit", 100)
        assert got["partial"] is False and got["missing_shards"] == []
        docs += got["documents"]
        cursor = got["next_cursor"]
        if cursor is None:
            return docs
    raise AssertionError("the scroll never ended")


FILTERS: list[tuple[dict[str, Any] | None, Any]] = [
    (None, lambda m: True),
    ({"must": [{"key": "pos", "match": "noun"}]}, lambda m: m["pos"] == "noun"),
    ({"should": [{"key": "pos", "in": ["verb", "adv"]}]}, lambda m: m["pos"] in ("verb", "adv")),
    ({"must_not": [{"key": "pos", "match": "noun"}]}, lambda m: m["pos"] != "noun"),
    ({"must": [{"key": "row", "range": {"gte": 100, "lt": 1300}}],
      "must_not": [{"key": "pos", "match": "adj"}]},
     lambda m: 100 <= m["row"] < 1300 and m["pos"] != "adj"),
    ({"must": [{"key": "pos", "match": "nothing"}]}, lambda m: False),
]


@pytest.mark.parametrize(("flt", "admits"), FILTERS)
async def test_count_and_scroll_agree_with_the_sample(node: Node, flt: Any, admits: Any) -> None:
    await load(node)
    ids, x, metas = sample_docs()
    want = {i: (v, m) for i, v, m in zip(ids, x, metas, strict=True) if admits(m)}
    body = {} if flt is None else {"filter": flt}
    assert await count(node, **body) == {"count": len(want), "partial": False,
                                         "missing_shards": []}
    for limit, include in ((1000, ["metadata", "vector"]), (37, ["metadata"]), (256, [])):
        docs = await scroll_all(node, limit=limit, include=include, **body)
        got = [d["id"] for d in docs]
        assert len(got) == len(set(got)) and set(got) == set(want)
        for d in docs:
            vec, meta = want[d["id"]]
            assert ("metadata" in d) == ("metadata" in include)
            if "metadata" in d:
                assert d["metadata"] == meta
            if "vector" in include:
                assert np.asarray(d["vector"], np.float32).tobytes() == vec.tobytes()
            else:
                assert "vector" not in d


async def test_counts_share_filtered_searchs_match_sets_and_follow_writes(node: Node) -> None:
    """A count with a filter evaluates it once per shard into the match sets filtered search
    reads (a search after it finds them cached), and the kept sets follow writes: counts and
    scrolls after upserts, updates and deletes equal brute force over what is stored."""
    await load(node, n=800)
    ids, x, metas = sample_docs(800)
    model = dict(zip(ids, metas, strict=True))
    flts: list[tuple[dict[str, Any], Any]] = [
        ({"must": [{"key": "pos", "match": "noun"}]}, lambda m: m["pos"] == "noun"),
        ({"must": [{"key": "row", "range": {"gte": 100, "lt": 500}}]},
         lambda m: 100 <= m["row"] < 500),
        ({"must_not": [{"key": "pos", "match": "verb"}]}, lambda m: m["pos"] != "verb"),
    ]

    async def check() -> None:
        for flt, admits in flts:
            want = sorted(i for i, m in model.items() if admits(m))
            assert (await count(node, filter=flt))["count"] == len(want)
            assert sorted(d["id"] for d in await scroll_all(node, filter=flt, limit=500)) == want

    await check()
    for flt, _ in flts:
        got = await node.search(NAME, vector=x[0].tolist(), k=3, filter=flt, explain=True)
        assert [p["cached"] for p in got["plans"]] == [True] * 4
    rng = np.random.default_rng(3)
    for step in range(4):
        new = [f"n{step}-{j}" for j in range(40)]
        new_meta = [{"pos": ["noun", "verb", "adj"][j % 3], "row": int(rng.integers(0, 800))}
                    for j in range(40)]
        await ok_json(await node.post_json(f"/v1/collections/{NAME}/documents", columnar(
            new, rng.standard_normal((40, x.shape[1])).astype(np.float32), new_meta)))
        model.update(zip(new, new_meta, strict=True))
        upd = rng.choice(sorted(model), 30, replace=False).tolist()
        upd_meta = [{"pos": "verb" if j % 2 else "noun", "row": 250 + j} for j in range(30)]
        await ok_json(await node.post_json(f"/v1/collections/{NAME}/documents", columnar(
            upd, rng.standard_normal((30, x.shape[1])).astype(np.float32), upd_meta)))
        model.update(zip(upd, upd_meta, strict=True))
        gone = rng.choice(sorted(model), 25, replace=False).tolist()
        await ok_json(await node.post_json(f"/v1/collections/{NAME}/documents/delete",
                                           {"ids": gone}))
        for i in gone:
            del model[i]
        await check()


async def test_an_empty_body_counts_and_scrolls_everything(node: Node) -> None:
    await load(node, n=300)
    for route in ("count", "scroll"):
        resp = await node.client.post(f"/v1/collections/{NAME}/{route}", data=b"")
        body = await ok_json(resp)
        assert body["count"] == 300 if route == "count" else len(body["documents"]) == 100
    assert len(await scroll_all(node)) == 300


async def test_scroll_goes_through_shards_in_id_order(node: Node) -> None:
    await load(node, n=500)
    docs = await scroll_all(node, limit=64)
    from aquila.cluster.model.sharding import shard_of

    keys = [(shard_of(d["id"], 4), d["id"].encode()) for d in docs]
    assert keys == sorted(keys)


async def test_pages_that_look_at_a_bounded_number_of_records(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter matching little still ends: each page looks at SCAN_LIMIT records at most,
    and may come back short (even empty) with a cursor to go on."""
    await load(node, n=800)
    monkeypatch.setattr(paging, "SCAN_LIMIT", 25)
    flt = {"must": [{"key": "pos", "match": "adv"}]}
    ids, _, metas = sample_docs(800)
    want = {i for i, m in zip(ids, metas, strict=True) if m["pos"] == "adv"}
    first = await page(node, filter=flt, limit=1000)
    assert len(first["documents"]) < len(want) and first["next_cursor"] is not None
    docs = await scroll_all(node, filter=flt, limit=1000)
    assert sorted(d["id"] for d in docs) == sorted(want)


async def test_every_document_that_exists_throughout_a_scroll_is_seen_once(node: Node) -> None:
    """Upserts of new ids, updates, deletes and re-creations between pages: the documents
    that exist from the scroll's start to its end are returned exactly once each."""
    await load(node, n=1500)
    ids, x, metas = sample_docs(1500)
    rng = np.random.default_rng(7)
    churn = set(rng.choice(ids, 300, replace=False).tolist())  # deleted, some re-created
    stable = set(ids) - churn
    seen: list[str] = []
    cursor = None
    step = 0
    while True:
        got = await page(node, cursor=cursor, limit=50)
        seen += [d["id"] for d in got["documents"]]
        cursor = got["next_cursor"]
        if cursor is None:
            break
        step += 1
        new = [f"new-{step}-{j}" for j in range(20)]
        v = rng.standard_normal((20, x.shape[1])).astype(np.float32)
        await ok_json(await node.post_json(f"/v1/collections/{NAME}/documents",
                                           columnar(new, v)))
        # Updates of documents that stay: same id, new metadata and vector.
        upd = rng.choice(sorted(stable), 10, replace=False).tolist()
        body = columnar(upd, rng.standard_normal((10, x.shape[1])).astype(np.float32),
                        [{"pos": "noun", "row": -1}] * 10)
        await ok_json(await node.post_json(f"/v1/collections/{NAME}/documents", body))
        gone = sorted(churn)[step * 5: step * 5 + 5]
        if gone:
            await ok_json(await node.post_json(f"/v1/collections/{NAME}/documents/delete",
                                               {"ids": gone}))
        if step % 3 == 0 and gone:  # some come back
            await ok_json(await node.post_json(f"/v1/collections/{NAME}/documents",
                                               columnar(gone[:2], x[:2])))
    assert len(seen) == len(set(seen)), "a document came twice"
    assert stable <= set(seen), f"missed {len(stable - set(seen))} documents"
    assert step > 10


async def test_concurrent_writers_during_a_scroll(node: Node) -> None:
    """The same, with writes running concurrently with the page requests."""
    await load(node, n=1200)
    ids, x, _ = sample_docs(1200)
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            new = [f"w{w}-{i}-{j}" for j in range(30)]
            await ok_json(await node.post_json(f"/v1/collections/{NAME}/documents",
                                               columnar(new, x[:30])))
            await ok_json(await node.post_json(f"/v1/collections/{NAME}/documents/delete",
                                               {"ids": new[:10]}))
            i += 1

    tasks = [asyncio.ensure_future(writer(w)) for w in range(2)]
    try:
        docs = await scroll_all(node, limit=40)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    seen = [d["id"] for d in docs]
    assert len(seen) == len(set(seen)) and set(ids) <= set(seen)


async def test_cursors_are_checked(node: Node) -> None:
    await load(node, n=300)
    first = await page(node, limit=10)
    good = first["next_cursor"]
    raw = orjson.loads(base64.urlsafe_b64decode(good + "=" * (-len(good) % 4)))
    assert raw[0] == 2 and raw[1] == NAME and raw[3] in range(4)
    uid = raw[2]

    def forge(value: Any) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    url = f"/v1/collections/{NAME}/scroll"
    bad = [
        "garbage", "", "!!!!", good + "A", good[:-2], 12, {"a": 1}, "A" * 5000,
        forge([2, NAME, uid, 4, None]), forge([2, NAME, uid, -1, None]), forge([3, *raw[1:]]),
        forge([2, NAME, uid, 0, ""]), forge([2, NAME, uid, 0, "x" * 257]),
        forge([2, NAME, uid, 0]), forge([2, NAME, uid, True, None]),
        forge([2.0, NAME, uid, 0, None]), forge({"uid": uid}), forge([2, NAME, 5, 0, None]),
        forge([2, NAME, "u" * 65, 0, None]), forge([2, NAME, uid, 1.5, None]),
        forge([2, None, uid, 0, None]), forge([1, NAME, uid, 0, None]),
        # Format 1 (no name, from nodes before format 2), checked as strictly.
        forge([1, uid, 4, None]), forge([1, uid, 0]), forge([1, 5, 0, None]),
        forge([2, uid, 0, None]),
        base64.b64encode(orjson.dumps(raw)).decode() + "=",  # padding: not canonical
    ]
    for cursor in bad:
        await expect_error(await node.post_json(url, {"cursor": cursor}), 400, "bad_request")
    # Any well-formed position of this incarnation is fine to ask for, in either format.
    for cursor in (forge([2, NAME, uid, 3, "zzzz"]), forge([1, uid, 3, "zzzz"])):
        resumed = await page(node, cursor=cursor)
        assert resumed["next_cursor"] is None or resumed["documents"]
    for body in ({"limit": 0}, {"limit": 1001}, {"limit": True}, {"include": ["x"]},
                 {"allow_partial": "yes"}, {"timeout_ms": 0}, {"filter": {"must": 1}},
                 {"other": 1}, [1]):
        await expect_error(await node.post_json(url, body), 400, "bad_request")
    for body in ({"filter": "x"}, {"allow_partial": 1}, {"nope": True}, [1]):
        await expect_error(await node.post_json(f"/v1/collections/{NAME}/count", body),
                           400, "bad_request")
    await expect_error(await node.post_json("/v1/collections/none/scroll", {}), 404, "not_found")
    await expect_error(await node.post_json("/v1/collections/none/count", {}), 404, "not_found")


async def test_a_cursor_of_an_earlier_incarnation_is_refused(node: Node) -> None:
    await load(node, n=200)
    cursor = (await page(node, limit=10))["next_cursor"]
    assert (await ok_json(await node.client.delete(f"/v1/collections/{NAME}")))["deleted"]
    await load(node, n=200)
    msg = await expect_error(await node.post_json(f"/v1/collections/{NAME}/scroll",
                                                  {"cursor": cursor}), 404, "not_found")
    assert "incarnation" in msg


async def test_a_cursor_of_another_collection_is_refused(node: Node) -> None:
    await load(node, n=200)
    cursor = (await page(node, limit=10))["next_cursor"]
    await load(node, name="other", n=100)
    msg = await expect_error(await node.post_json("/v1/collections/other/scroll",
                                                  {"cursor": cursor}), 400, "bad_request")
    assert "another collection" in msg and NAME in msg


# -- search by stored id ------------------------------------------------------------------------
async def test_search_by_stored_id_leaves_the_document_out(node: Node) -> None:
    await load(node, n=1000)
    ids, x, metas = sample_docs(1000)
    rows = [3, 500, 999]
    top, _ = brute_force(x, x[rows], 11, "cosine")
    want = [[ids[j] for j in t if j != r][:10] for t, r in zip(top, rows, strict=True)]
    one = await node.search(NAME, id=ids[3], k=10)
    assert [h["id"] for h in one["results"][0]] == want[0]
    many = await node.search(NAME, ids=[ids[r] for r in rows], k=10, include=["metadata"])
    assert [[h["id"] for h in row] for row in many["results"]] == want
    assert many["results"][1][0]["metadata"] == metas[top[1][1]]
    flt = {"must": [{"key": "pos", "match": "verb"}]}
    filtered = await node.search(NAME, id=ids[3], k=5, filter=flt)
    allowed = np.array([m["pos"] == "verb" for m in metas])
    t, _ = brute_force(x[allowed], x[[3]], 6, "cosine")
    verb_ids = [i for i, a in zip(ids, allowed, strict=True) if a]
    assert [h["id"] for h in filtered["results"][0]] == [verb_ids[j] for j in t[0]
                                                         if verb_ids[j] != ids[3]][:5]
    # k at its maximum still works: the node asks for k + 1 inside.
    big = await node.search(NAME, id=ids[0], k=1000)
    assert len(big["results"][0]) == 999 and ids[0] not in {h["id"] for h in big["results"][0]}


async def test_search_by_id_refusals(node: Node) -> None:
    await load(node, n=50)
    ids, x, _ = sample_docs(50)
    url = f"/v1/collections/{NAME}/search"
    msg = await expect_error(await node.post_json(url, {"id": "no-such"}), 404, "not_found")
    assert "no-such" in msg
    await expect_error(await node.post_json(url, {"ids": [ids[0], "no-such"]}), 404, "not_found")
    for body in ({"id": ids[0], "vector": x[0].tolist()}, {"id": ""}, {"id": 5},
                 {"ids": []}, {"ids": "abc"}, {"ids": [ids[0]] * 1001}, {"id": ids[0], "ids": []},
                 {"ids": [ids[0], None]}, {}):
        await expect_error(await node.post_json(url, body), 400, "bad_request")
