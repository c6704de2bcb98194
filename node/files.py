"""Small files written whole (node id, cluster state, collection specs, index snapshots)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def write_atomic(path: Path, *parts: bytes | memoryview) -> None:
    """Write `parts` to `path` so that a crash leaves either the old file or the new one,
    whole: a temporary file, fsynced, renamed over it, then the directory fsynced (without
    that the rename itself may be lost on power failure).

    The temporary file has a name of its own (two writers of one file must not write into
    the same one) in the same directory (a rename is atomic only within one file system)."""

    def fill(f: BinaryIO) -> None:
        for part in parts:
            f.write(part)

    commit_file(stage_file(path, fill), path)


def stage_file(path: Path, fill: Callable[[BinaryIO], None]) -> Path:
    """The first half of `write_atomic` for a file too large to hold in memory: a temporary
    file beside `path` with what `fill` wrote into it (in the page cache, not yet durable).
    `commit_file` makes it `path`; a crash in between leaves a temporary file that
    `remove_stale_temps` removes."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def commit_file(tmp: Path, path: Path, still: Callable[[], bool] | None = None) -> bool:
    """The second half: `tmp` fsynced, renamed over `path`, the directory fsynced. `still`,
    asked after the fsync, right before the rename: False, `tmp` is removed and nothing
    renamed (returns False)."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if still is not None and not still():
            os.unlink(tmp)
            return False
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return True


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
