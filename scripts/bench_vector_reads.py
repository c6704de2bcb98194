"""Reading vectors by label (the V keys of `node.storage.store`) with the records' table options
(LZ4, zstd in the bottommost level, 4 KiB blocks) against a column family of their own without
compression (4 or 16 KiB blocks) or with LZ4 only: µs a key of multi-gets of 100 random keys
never read before (the cache holds the index and filter blocks, not the data) and of keys read
before (in the block cache), and the table files' size. In process, no node.

    python scripts/bench_vector_reads.py [--data DIR] [--n 100000]
"""

from __future__ import annotations

import argparse
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rocksdict
from bench_data import DEFAULT_DATA

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aquila.node.storage.store import table_options  # noqa: E402

VARIANTS = ("same", "cf-4096", "cf-16384", "cflz4-4096")


def options(cache: rocksdict.Cache, compression: str, block: int) -> rocksdict.Options:
    """`Store._options` but the compression and block size."""
    o = rocksdict.Options(raw_mode=True)
    o.create_if_missing(True)
    o.create_missing_column_families(True)
    kinds = {"none": rocksdict.DBCompressionType.none(), "lz4": rocksdict.DBCompressionType.lz4(),
             "zstd": rocksdict.DBCompressionType.zstd()}
    o.set_compression_type(kinds["lz4" if compression == "zstd" else compression])
    o.set_bottommost_compression_type(kinds[compression])
    t = table_options(cache)
    t.set_block_size(block)
    o.set_block_based_table_factory(t)
    return o


def vkey(label: int) -> bytes:
    return b"V\x00\x00" + struct.pack(">Q", label)


def build(path: Path, variant: str, cache: rocksdict.Cache, base: np.ndarray
          ) -> tuple[rocksdict.Rdict, rocksdict.Rdict]:
    """A store of len(base) small records (D) and their vectors (V, seq + float32)."""
    o = options(cache, "zstd", 4096)
    if variant == "same":
        db = rocksdict.Rdict(str(path), o, column_families={"default": o})
        cf, handle = db, None
    else:
        kind, block = variant.split("-")
        ov = options(cache, "lz4" if kind == "cflz4" else "none", int(block))
        db = rocksdict.Rdict(str(path), o, column_families={"default": o, "vectors": ov})
        cf, handle = db.get_column_family("vectors"), db.get_column_family_handle("vectors")
    head = struct.Struct(">QqQBIH")
    for lo in range(0, len(base), 5000):
        wb = rocksdict.WriteBatch(raw_mode=True)
        for i in range(lo, min(lo + 5000, len(base))):
            wb.put(b"D\x00\x00%08d" % i, head.pack(1, i + 1, i, 0, 0, 1) + b"w{}")
            v = struct.pack(">Q", i) + base[i].tobytes()
            if handle is None:
                wb.put(vkey(i + 1), v)
            else:
                wb.put(vkey(i + 1), v, handle)
        db.write(wb)
    for d in {id(db): db, id(cf): cf}.values():
        d.flush(True)
        d.compact_range(None, None)
    return db, cf


def per_key(cf: rocksdict.Rdict, key_sets: list[list[bytes]]) -> float:
    t0, n = time.perf_counter(), 0
    for keys in key_sets:
        got = cf.get(keys)
        assert all(g is not None for g in got)
        n += len(keys)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    base = np.load(args.data / "base.f16.npy", mmap_mode="r")[: args.n].astype(np.float32)
    n = len(base)
    rng = np.random.default_rng(0)
    print(f"{n:,} vectors of dim {base.shape[1]}; µs a key, multi-gets of 100 random keys")
    for variant in args.variants.split(","):
        tmp = Path(tempfile.mkdtemp(prefix="aquila-vreads-"))
        try:
            db, cf = build(tmp / "db", variant, rocksdict.Cache(64 << 20), base)
            size = sum(f.stat().st_size for f in (tmp / "db").glob("*.sst"))
            perm = (rng.permutation(n) + 1).tolist()
            cold = per_key(cf, [sorted(vkey(x) for x in perm[i * 100:(i + 1) * 100])
                                for i in range(min(200, n // 200))])
            again = [sorted(vkey(x) for x in perm[n // 2 + i * 100: n // 2 + (i + 1) * 100])
                     for i in range(10)]
            per_key(cf, again)
            warm = min(per_key(cf, again) for _ in range(20))
            print(f"{variant:11s} table files {size / 2**20:6.1f} MiB  never read {cold:5.2f}  "
                  f"cached {warm:5.2f}", flush=True)
            if cf is not db:
                cf.close()
            db.close()
        finally:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
