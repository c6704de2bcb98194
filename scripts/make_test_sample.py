#!/usr/bin/env python3
"""Cut the small committed test sample tests/data/wordnet-sample from wordnet-minilm-384.

    python scripts/make_test_sample.py [SOURCE_DIR] [--out DIR] [--n-base 5000] [--n-query 200]

SOURCE_DIR defaults to ../shared/data/wordnet-minilm-384 relative to the repository root.
The sample is deterministic (numpy default_rng, seed 0): rows are drawn without replacement and
kept in their original order. Vectors stay float16; the exact ground truth is recomputed on the
sample by inner product on the float32 cast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "wordnet-minilm-384"
DEFAULT_OUT = ROOT / "tests" / "data" / "wordnet-sample"
SEED = 0
GT_K = 100


def read_jsonl_rows(path: Path, rows: npt.NDArray[np.int64]) -> list[dict[str, object]]:
    wanted = {int(r): i for i, r in enumerate(rows)}
    out: list[dict[str, object] | None] = [None] * len(rows)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            pos = wanted.get(lineno)
            if pos is not None:
                obj = json.loads(line)
                out[pos] = {"id": obj["id"], "text": obj["text"], "pos": obj["pos"]}
    missing = [int(rows[i]) for i, o in enumerate(out) if o is None]
    if missing:
        raise SystemExit(f"{path}: rows {missing[:5]} missing (file shorter than the vectors?)")
    return [o for o in out if o is not None]


def write_jsonl(path: Path, objs: list[dict[str, object]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


def exact_topk(
    base: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    scores = queries @ base.T  # (nq, nb) inner products
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    # Best first; ties broken by the lower row number for determinism.
    order = np.lexsort((part, -part_scores), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return idx.astype(np.int32), np.take_along_axis(scores, idx, axis=1).astype(np.float32)


README = """\
# wordnet-sample: a small test cut of wordnet-minilm-384

A deterministic random sample of the shared benchmark data set `wordnet-minilm-384` (every
WordNet 3.0 synset as "lemma, lemma: gloss", embedded with all-MiniLM-L6-v2, L2-normalised, so
cosine similarity equals inner product), small enough to commit so tests run on a plain clone.

| file | what |
| --- | --- |
| `base.f16.npy` | {nb} x {dim} float16 base vectors (cast to float32 before use) |
| `query.f16.npy` | {nq} x {dim} float16 query vectors, none of them in the base set |
| `base.jsonl`, `query.jsonl` | one JSON object a line, same order as the vectors: `{{"id": "n12594324", "text": "...", "pos": "noun" \\| "verb" \\| "adj" \\| "adv"}}` |
| `gt_I.npy` | {nq} x {k} int32: row numbers in *this sample's* `base` of each query's exact top {k} by inner product, best first |
| `gt_D.npy` | {nq} x {k} float32: their inner products |

Made by `python scripts/make_test_sample.py` (numpy `default_rng({seed})`; {nb} of the
{src_nb} base rows and {nq} of the {src_nq} query rows drawn without replacement, kept in their
original order; vectors copied bit for bit as float16). The ground truth is recomputed exactly on
the sample, on the float32 cast of the float16 vectors (ties, if any, go to the lower row
number), so it is *not* a slice of the full set's `gt_I.npy`.

Use metric `cosine` or `ip`; recall@10 = |found top 10 ∩ gt_I[:, :10]| / 10, averaged over
queries. Load it with `tests/datasets.py`: `load_sample()` and `recall_at_k()`.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--n-base", type=int, default=5000)
    p.add_argument("--n-query", type=int, default=200)
    args = p.parse_args(argv)
    src: Path = args.source
    out: Path = args.out
    if not (src / "base.f16.npy").exists():
        print(f"error: no base.f16.npy in {src}", file=sys.stderr)
        return 1

    base_all = np.load(src / "base.f16.npy", mmap_mode="r")
    query_all = np.load(src / "query.f16.npy", mmap_mode="r")
    if base_all.dtype != np.float16 or query_all.dtype != np.float16:
        print("error: expected float16 vectors", file=sys.stderr)
        return 1

    rng = np.random.default_rng(SEED)
    base_rows = np.sort(rng.choice(base_all.shape[0], size=args.n_base, replace=False))
    query_rows = np.sort(rng.choice(query_all.shape[0], size=args.n_query, replace=False))

    base = np.ascontiguousarray(base_all[base_rows])
    queries = np.ascontiguousarray(query_all[query_rows])
    k = min(GT_K, args.n_base)
    gt_I, gt_D = exact_topk(base.astype(np.float32), queries.astype(np.float32), k)

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "base.f16.npy", base)
    np.save(out / "query.f16.npy", queries)
    np.save(out / "gt_I.npy", gt_I)
    np.save(out / "gt_D.npy", gt_D)
    write_jsonl(out / "base.jsonl", read_jsonl_rows(src / "base.jsonl", base_rows))
    write_jsonl(out / "query.jsonl", read_jsonl_rows(src / "query.jsonl", query_rows))
    (out / "README.md").write_text(
        README.format(
            nb=args.n_base,
            nq=args.n_query,
            dim=base.shape[1],
            k=k,
            seed=SEED,
            src_nb=base_all.shape[0],
            src_nq=query_all.shape[0],
        ),
        encoding="utf-8",
    )

    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB): base {base.shape}, queries {queries.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
