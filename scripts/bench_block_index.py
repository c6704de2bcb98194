"""Point reads from RocksDB's block cache with and without a hash index in the data blocks,
on keys shaped like a node's (a label key to an id; a record key to a ~100-byte record),
the node's table options (`store.table_options`: partitioned filters and index, 4 KiB blocks).
Multi-gets of 1,000 sorted keys, as a search reads its hits; µs a key, the two stores read
in turns, medians.

    python scripts/bench_block_index.py [--keys 200000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import rocksdict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aquila.node.storage.store import table_options  # noqa: E402


def options(hashed: bool) -> rocksdict.Options:
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    table = table_options(rocksdict.Cache(256 << 20))  # the node's, in a cache of its own
    if hashed:
        table.set_data_block_index_type(rocksdict.DataBlockIndexType.binary_and_hash())
        table.set_data_block_hash_ratio(0.75)
    opts.set_block_based_table_factory(table)
    return opts


def loaded(path: Path, hashed: bool, n: int) -> rocksdict.Rdict:
    db = rocksdict.Rdict(str(path), options(hashed))
    rnd = random.Random(1)
    for i in range(n):
        db[b"L\x00\x01" + i.to_bytes(8, "big")] = str(rnd.randrange(10**9)).encode()
        db[b"D\x00\x01" + str(i).encode()] = os.urandom(40) + b'{"text":"' + b"x" * 60 + b'"}'
    db.flush()
    db.compact_range(None, None)
    return db


def timed(db: rocksdict.Rdict, batches: list[list[bytes]]) -> float:
    """µs a key."""
    t0 = time.perf_counter()
    for keys in batches:
        db.get(keys)
    return (time.perf_counter() - t0) / (len(batches) * len(batches[0])) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="aquila-block-index-"))
    try:
        dbs = {hashed: loaded(tmp / str(hashed), hashed, args.keys) for hashed in (False, True)}
        rnd = random.Random(2)
        reads = {
            "label keys": [sorted(b"L\x00\x01" + rnd.randrange(args.keys).to_bytes(8, "big")
                                  for _ in range(1000)) for _ in range(50)],
            "records": [sorted(b"D\x00\x01" + str(rnd.randrange(args.keys)).encode()
                               for _ in range(1000)) for _ in range(50)],
        }
        for db in dbs.values():  # into the cache
            for batches in reads.values():
                timed(db, batches)
        # Rounds interleaved, the two stores in turns: a median of each.
        got: dict[tuple[str, bool], list[float]] = {}
        for r in range(args.rounds):
            for hashed in (False, True) if r % 2 == 0 else (True, False):
                for name, batches in reads.items():
                    got.setdefault((name, hashed), []).append(timed(dbs[hashed], batches))
        for db in dbs.values():
            db.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in reads:
        plain, hashed_ = median(got[(name, False)]), median(got[(name, True)])
        print(f"{name}: binary search {plain:.2f} µs a key, with the hash index {hashed_:.2f} "
              f"({hashed_ / plain:.2f}x; medians of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
