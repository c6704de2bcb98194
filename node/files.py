"""Small files written whole (node id, cluster state, collection specs, index snapshots)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def write_atomic(path: Path, *parts: bytes | memoryview) -> None:
    """Write `parts` to `path` so that a crash leaves either the old file or the new one,
    whole: a temporary file, fsynced, renamed over it, then the directory fsynced (without
    that the rename itself may be lost on power failure).

    The temporary file has a name of its own (two writers of one file must not write into
    the same one) in the same directory (a rename is atomic only within one file system)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path) -> None:
    """Remove what a crash in the middle of `write_atomic` left in `directory` (call only
    when nothing writes there: at start, before anything else does)."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.endswith(TMP_SUFFIX) and entry.is_file() and not entry.is_symlink():
            log.info("removing %s, left by an interrupted write", entry)
            entry.unlink(missing_ok=True)
