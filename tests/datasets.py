"""Helpers for the committed test sample tests/data/wordnet-sample (see its README.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "wordnet-sample"


@dataclass(frozen=True)
class Sample:
    base: npt.NDArray[np.float32]  # (5000, 384), L2-normalised
    queries: npt.NDArray[np.float32]  # (200, 384)
    base_meta: list[dict[str, Any]]  # {"id", "text", "pos"}, same order as base
    query_meta: list[dict[str, Any]]
    gt_I: npt.NDArray[np.int32]  # (200, 100) row numbers into base, best first
    gt_D: npt.NDArray[np.float32]  # (200, 100) inner products

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=4)
def _load(directory: Path) -> Sample:
    base = np.load(directory / "base.f16.npy").astype(np.float32)
    queries = np.load(directory / "query.f16.npy").astype(np.float32)
    for arr in (base, queries):
        arr.flags.writeable = False  # shared between callers through the cache
    sample = Sample(
        base=base,
        queries=queries,
        base_meta=_read_jsonl(directory / "base.jsonl"),
        query_meta=_read_jsonl(directory / "query.jsonl"),
        gt_I=np.load(directory / "gt_I.npy"),
        gt_D=np.load(directory / "gt_D.npy"),
    )
    assert len(sample.base_meta) == len(sample.base)
    assert len(sample.query_meta) == len(sample.queries) == len(sample.gt_I) == len(sample.gt_D)
    return sample


def load_sample(directory: Path = SAMPLE_DIR) -> Sample:
    """The wordnet sample, vectors cast to float32. Cached: do not mutate the arrays."""
    return _load(Path(directory).resolve())


def recall_at_k(
    found_rows: Sequence[Sequence[int]], gt_I: npt.NDArray[np.integer[Any]], k: int
) -> float:
    """Mean over queries of |found[:k] ∩ gt_I[:k]| / k (found_rows[i] answers query i)."""
    if k <= 0:
        raise ValueError("k must be positive")
    if k > gt_I.shape[1]:
        raise ValueError(f"k={k} exceeds the ground truth depth {gt_I.shape[1]}")
    if len(found_rows) != len(gt_I):
        raise ValueError(f"{len(found_rows)} result lists for {len(gt_I)} queries")
    if len(found_rows) == 0:
        return 0.0
    total = 0
    for found, truth in zip(found_rows, gt_I, strict=True):
        total += len({int(r) for r in list(found)[:k]} & {int(t) for t in truth[:k]})
    return total / (k * len(found_rows))
