"""How to search one shard for the k best documents a filter admits, chosen from how many of
its documents match (pure; `node.storage.filtered` carries the plans out).

- `exact`: few match. Their vectors (gathered once per filter and kept) are scored directly:
  exact, and cheaper than any index walk when the matches are fewer than the vectors an index
  search would score.
- `selector`: many match. The IVF index is searched with a FAISS bitmap selector of the
  matches (built once per filter and kept): only matches are scored, and every other vector
  of a probed list costs one bit test; the lists probed are widened per query until they hold
  as many matches as an unfiltered search scores vectors (`probes`).
- `postfilter`: nearly all match. The index is searched unfiltered for more candidates than k
  and the non-matches dropped, widening until k matches are found: scoring the few
  non-matches costs about what testing every vector would.
- `none`: nothing matches; the shard is not searched.

The choice is by an estimate of the work of each path, in nanoseconds, from constants measured
on FAISS 1.15 on one core (scripts/bench.py --filtered prints the outcome): what matters is
their ratios, not their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXACT, SELECTOR, POSTFILTER, NONE = "exact", "selector", "postfilter", "none"
PATHS = (EXACT, SELECTOR, POSTFILTER, NONE)

# One vector scored while walking an inverted list: a fixed part and a part per dimension.
SCORE_NS = 10.0
SCORE_NS_PER_DIM = 0.25
# Scoring gathered vectors all at once (a matrix product) costs about half as much a vector.
EXACT_SHARE = 0.5
# One selector membership test (a bit of a bitmap) per vector walked past.
TEST_NS = 3.0
# From this share of matches on, post-filtering (which scores at most 1/0.75 as many vectors
# as an unfiltered search) is weighed against the selector; below it, it is not an option.
POSTFILTER_FROM = 0.75
# Vectors gathered for the exact path are kept with the filter; this bounds their memory.
EXACT_MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class IndexShape:
    """What the planner knows of the index the shards share."""

    ivf: bool  # False: exact flat index
    nlist: int  # 1 for flat
    ntotal: int
    nprobe: int  # the search's nprobe, within 1..nlist
    dim: int


@dataclass(frozen=True)
class ShardPlan:
    shard: int
    path: str
    matches: int  # documents of the shard the filter admits
    documents: int  # live documents of the shard
    cached: bool  # the match set came from the per-filter cache

    def json(self) -> dict[str, object]:
        return {"shard": self.shard, "path": self.path, "matches": self.matches,
                "documents": self.documents, "cached": self.cached}


def scored_unfiltered(documents: int, shape: IndexShape) -> float:
    """About how many of the shard's vectors an unfiltered search scores."""
    if not shape.ivf:
        return float(documents)
    return shape.nprobe * documents / max(1, shape.nlist)


def costs(matches: int, documents: int, shape: IndexShape) -> dict[str, float]:
    """Estimated nanoseconds per query of each path allowed for this shard."""
    score = SCORE_NS + SCORE_NS_PER_DIM * shape.dim
    share = matches / max(1, documents)
    target = scored_unfiltered(documents, shape)
    out: dict[str, float] = {}
    if matches * shape.dim * 4 <= EXACT_MAX_BYTES:
        out[EXACT] = matches * score * EXACT_SHARE
    if matches <= target:  # widening ends with every list: every vector tested
        out[SELECTOR] = documents * TEST_NS + matches * score
    else:
        out[SELECTOR] = target * score + target / share * TEST_NS
    if share >= POSTFILTER_FROM:
        out[POSTFILTER] = min(float(documents), target / share) * score
    return out


def choose(matches: int, documents: int, shape: IndexShape) -> str:
    if matches <= 0:
        return NONE
    c = costs(matches, documents, shape)
    return min(c, key=lambda p: c[p])


def probes(
    lists: np.ndarray, matches_per_list: np.ndarray, sizes: np.ndarray, nprobe: int,
    share: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, how many of its lists (`lists`: nearest first, one row per query) to probe
    so that they hold at least as many matches as an unfiltered search at `nprobe` scores
    vectors of these shards (`share` of each list is theirs), and never fewer than `nprobe`:
    the filtered search then scores as many candidates as the unfiltered one, which keeps its
    recall (measured: scripts/bench.py --filtered). Also which rows fall short within the
    lists given (they get them all; the caller may give them more)."""
    width = lists.shape[1]
    base = min(nprobe, width)
    target = sizes[lists[:, :base]].sum(axis=1) * share
    held = np.cumsum(matches_per_list[lists], axis=1)
    need = (held < target[:, None]).sum(axis=1) + 1
    return np.clip(need, base, width), held[:, -1] < target
