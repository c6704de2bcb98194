"""Sub-searches to a peer that differ in anything their frame carries (k, nprobe, recall,
explain, vectors asked for, metadata, a filter of {} against none) never share a frame: each
search's plans, as a peer writes them from what its frame asked, are the ones it gets alone."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
import pytest

from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.operations import SearchRequest
from aquila.cluster.replication import membackend
from tests.test_peer_protocol import filled


def _comparable(answer: dict[str, Any]) -> Any:
    """An answer without its time, its scores rounded (a batch's matrix product may differ
    from one query's in the last bit) and without `candidates` (the fingerprint below of how
    many queries its frame carried, which differs when it was shared)."""
    out = orjson.loads(orjson.dumps({k: v for k, v in answer.items() if k != "took_ms"}))
    for p in out.get("plans", []):
        p.pop("candidates", None)
    for row in out["results"]:
        for h in row:
            h["score"] = round(h["score"], 4)
    return out


async def test_searches_whose_frames_differ_never_share_plans(
        monkeypatch: pytest.MonkeyPatch) -> None:
    search = membackend.MemoryBackend.search

    async def fingerprinted(self: Any, spec: Any, queries: np.ndarray, k: int,
                            nprobe: int | None, predicate: Any, shards: Any,
                            with_vectors: bool = False, plans: Any = None,
                            recall: float | None = None, *, inline: bool = False) -> Any:
        rows = await search(self, spec, queries, k, nprobe, predicate, shards, with_vectors,
                            plans, recall, inline=inline)
        for p in (plans or {}).values():  # what the frame asked, as its plans say it
            p["nprobe"] = (k * 1000 + (nprobe or 0) * 10 + round((recall or 0) * 100) * 7
                           + 3 * with_vectors + 5 * (predicate is not None))
            p["candidates"] = len(queries)
        return rows

    monkeypatch.setattr(membackend.MemoryBackend, "search", fingerprinted)
    async with filled(30) as (sim, svc, entry):
        qs = np.random.default_rng(9).normal(size=(40, 4)).astype(np.float32)
        base = SearchRequest(qs[:1], 5, None, None, None, True, False, False, None)
        variants: list[dict[str, Any]] = [
            {"recall": 0.9}, {"recall": 0.95}, {"recall": 0.9, "k": 6},
            {"recall": 0.9, "explain": True}, {"explain": True}, {"explain": True, "nprobe": 3},
            {"explain": True, "include_vector": True},
            {"explain": True, "filter": {}, "predicate": parse_filter({})},
            {"recall": 0.9, "filter": {}, "predicate": parse_filter({})},
            {"explain": True, "include_metadata": False},
        ]
        reqs = [replace(base, vectors=qs[i : i + 1], **variants[i % len(variants)])
                for i in range(len(qs))]
        alone = [_comparable(await sim.run(svc.reads.search(entry, r))) for r in reqs]
        got = await sim.run(asyncio.gather(*(svc.reads.search(entry, r) for r in reqs)))
        assert [_comparable(g) for g in got] == alone
        # Searches did share frames (some plans say more than one query).
        assert any(p["candidates"] > 1 for g in got for p in g.get("plans", []))
