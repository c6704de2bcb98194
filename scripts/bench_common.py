"""What every benchmark module shares: where the repository is, the collection it measures,
k, the timeouts, the log line and two small helpers.

scripts/ is not a package: `python scripts/bench.py` puts this directory on sys.path, and the
bench_*.py modules import each other as top-level modules.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
COLLECTION = "bench"
K = 10

READY_TIMEOUT_S = 180.0  # a node's /readyz after start (it may replay a change log)
TRAIN_TIMEOUT_S = 1800.0  # every shard's index_state "trained" after the last ingest ack
STOP_TIMEOUT_S = 120.0  # SIGTERM → exit (it snapshots) before SIGKILL
REQUEST_TIMEOUT_S = 300.0  # one REST request of the single-node benchmark
POLL_S = 0.05
TRAIN_POLL_S = 0.25

OPT_NP = orjson.OPT_SERIALIZE_NUMPY
JSON_HEADERS = {"Content-Type": "application/json"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p)) if values else float("nan")


@contextlib.contextmanager
def temp_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aquila-bench-"))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
