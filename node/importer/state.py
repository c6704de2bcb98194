"""Where an import stands, kept in a small file so that running the same command again after an
interruption (Ctrl-C, a crash, a node that went away) sends only the batches not yet stored.

The file (`.aquila-import-<collection>-<digest>.json` in the working directory unless
`--state FILE`) records the batches acknowledged by the cluster, as ranges of batch numbers,
and the bad rows met so far; it is tied to the import by a fingerprint of the collection, the
batch size and each input file's path, size and modification time, so a changed file or other
settings start afresh. It is rewritten (whole, then renamed over the old one) at most every
`FLUSH_S` seconds while batches are acknowledged, every `FLUSH_S` seconds besides, and when
the import stops; a batch acknowledged after the last write is
simply sent again, which changes nothing (upserts are idempotent). A finished import removes
its file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from aquila.node.importer.sources import BadRow

FLUSH_S = 0.5
STATE_VERSION = 1
# Bad rows remembered for the summary of a later run (all are counted).
KEEP_BAD = 1000


def fingerprint(collection: str, batch: int, files: list[Path]) -> dict[str, Any]:
    out: dict[str, Any] = {"collection": collection, "batch": batch, "files": []}
    for f in files:
        st = f.stat()
        out["files"].append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def default_path(collection: str, fp: dict[str, Any]) -> Path:
    digest = hashlib.sha256(orjson.dumps(fp["files"])).hexdigest()[:12]
    return Path.cwd() / f".aquila-import-{collection}-{digest}.json"


def _ranges(done: set[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for b in sorted(done):
        if out and out[-1][1] == b - 1:
            out[-1][1] = b
        else:
            out.append([b, b])
    return out


@dataclass
class ImportState:
    path: Path
    fp: dict[str, Any]
    done: set[int] = field(default_factory=set)
    bad: list[BadRow] = field(default_factory=list)
    bad_count: int = 0
    resumed: int = 0  # batches done by earlier runs
    _written: float = 0.0
    _dirty: bool = False

    @staticmethod
    def load(path: Path, fp: dict[str, Any]) -> ImportState:
        """The saved state when it belongs to this import, else a fresh one."""
        state = ImportState(path, fp)
        try:
            raw = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return state
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION \
                or raw.get("fingerprint") != fp:
            return state
        try:
            for lo, hi in raw["done"]:
                state.done.update(range(int(lo), int(hi) + 1))
            state.bad = [BadRow(int(r), str(w), str(why)) for r, w, why in raw["bad"]]
            state.bad_count = int(raw["bad_count"])
        except (KeyError, TypeError, ValueError):
            return ImportState(path, fp)
        state.resumed = len(state.done)
        return state

    def finished(self, batch: int, bad: list[BadRow]) -> None:
        self.done.add(batch)
        self.bad_count += len(bad)
        self.bad.extend(bad[:max(0, KEEP_BAD - len(self.bad))])
        self._dirty = True
        if time.monotonic() - self._written >= FLUSH_S:
            self.save()

    def check_writable(self) -> None:
        """Raise OSError unless the file can be written where it goes (before anything is
        sent: an import whose progress cannot be kept would start over after any stop)."""
        if self.path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a directory", str(self.path))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(b"")
        tmp.unlink()

    def save(self) -> None:
        if not self._dirty:
            return
        body = orjson.dumps({
            "version": STATE_VERSION, "fingerprint": self.fp, "done": _ranges(self.done),
            "bad": [[b.row, b.where, b.reason] for b in self.bad], "bad_count": self.bad_count,
        })
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, self.path)
        self._written = time.monotonic()
        self._dirty = False

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
