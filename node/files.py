"""Small files written whole (node id, cluster state, collection specs, index snapshots)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, *parts: bytes) -> None:
    """Write `parts` to `path` so that a crash leaves either the old file or the new one,
    whole: a temporary file, fsynced, then renamed over it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        for part in parts:
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
