"""A training's trained quantizer, kept on disk until the index it trained is in a snapshot.

A training's k-means (the IVF lists' centroids, and ivf_sq8's ranges or ivf_pq's codebooks)
is most of its time: minutes at millions of vectors. The index it trains is in no snapshot
until it has been filled, caught up and swapped in; a node stopped before that (a SIGKILL,
a restart for an upgrade) would train again from the start. So the trained, still empty
FAISS index is written beside the collection's snapshot as soon as it is trained, and the
next training of the same collection takes it instead of training, when it fits: same
incarnation of the collection (its uid: a collection dropped and made again under the name
trains afresh), same index type, dim and metric, trained on at least half and at most twice
the vectors there are now, and on more than the index that serves (else it is one left behind
by a training already swapped in). The file is removed once a snapshot holds the index it
trained.

File `training.quantizer`: magic, a header (payload length, its crc32, the owner's length,
the vector count it was trained on), the owner (the collection's uid), the payload
(`faiss.serialize_index` of the trained, empty index). Whatever does not check out (a torn
write, another owner, a foreign file) is logged, removed and ignored: a checkpoint only ever
saves time, it never stops a training or a start.
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import faiss as _faiss
import numpy as np

from aquila.cluster.model.spec import CollectionSpec
from aquila.node.files import commit_file, stage_file
from aquila.node.storage.index import faiss_metric

log = logging.getLogger(__name__)

faiss: Any = _faiss

FILE = "training.quantizer"
MAGIC = b"AQTQ1\n"
_HEADER = struct.Struct(">QIHQ")  # payload length, crc32, owner length, trained on
MAX_OWNER = 256
# Centroids of 65,536 lists at dim 4,096 are 1 GiB: beyond, a training is not kept.
MAX_PAYLOAD = 1 << 30
# The trained-on count of a checkpoint that a training of `n` vectors takes: at least half of
# `n`, at most twice (most of the collection deleted since: lists chosen for far more).
MIN_SHARE = 0.5

_TYPES = {"ivf_flat": "IndexIVFFlat", "ivf_sq8": "IndexIVFScalarQuantizer",
          "ivf_pq": "IndexIVFPQFastScan"}


class Checkpoint:
    def __init__(self, folder: Path, owner: str, live: Callable[[], bool]) -> None:
        """`owner`: the collection's incarnation; `live()`: whether it still exists (a
        training of a dropped collection writes nothing)."""
        self.path = folder / FILE
        self.owner = owner.encode()[:MAX_OWNER]
        self.live = live
        # A save's rename and a removal's look and unlink, one at a time: the removal after
        # one training's swap must not take the file the next training has just kept.
        self._lock = threading.Lock()

    def save(self, index: Any, trained_on: int) -> bool:
        """Keep the trained, empty FAISS `index` (blocking). False when it was not kept."""
        payload = faiss.serialize_index(index)
        if len(payload) > MAX_PAYLOAD:
            log.info("%s: trained quantizer of %d bytes not kept (over %d)", self.path,
                     len(payload), MAX_PAYLOAD)
            return False
        if not self.live():
            log.info("%s: trained quantizer not kept: the collection was dropped", self.path)
            return False
        header = _HEADER.pack(len(payload), zlib.crc32(payload), len(self.owner), trained_on)

        def fill(f: BinaryIO) -> None:
            f.write(MAGIC)
            f.write(header)
            f.write(self.owner)
            f.write(memoryview(payload))

        try:
            # live() asked again after the fsync, right before the rename: dropped while the
            # file was written, the folder may be about to be its successor's.
            tmp = stage_file(self.path, fill)
            with self._lock:
                if commit_file(tmp, self.path, self.live):
                    return True
        except OSError as exc:  # a full disk, a folder gone: the training goes on without
            log.warning("%s: trained quantizer not kept: %s", self.path, exc)
            return False
        log.info("%s: trained quantizer not kept: the collection was dropped", self.path)
        return False

    def load(self, spec: CollectionSpec, n: int, trained_at: int = 0
             ) -> tuple[Any, int] | None:
        """The kept index (trained, empty) and the count it was trained on, when it is this
        collection's and fits a training of `n` vectors while the serving index was trained
        on `trained_at` (0: none); else None, and a file that is not of this training is
        removed (blocking). Never raises: a checkpoint only ever saves time."""
        try:
            with open(self.path, "rb") as f:
                got = self._read(f, spec, n, trained_at)
        except FileNotFoundError:
            return None
        except Exception as exc:  # whatever a damaged file makes the reading raise
            got = None
            why = f"{type(exc).__name__}: {exc}"
        else:
            why = "" if got is not None else "not of this training"
        if got is None:
            # Another training's (an earlier one's, its snapshot not yet written when this
            # one started: common in a bulk load) is no news; a damaged file is.
            log.log(logging.WARNING if why != "not of this training" else logging.INFO,
                    "%s: trained quantizer not used (%s); removed", self.path, why)
            self.remove()
        return got

    def _read(self, f: BinaryIO, spec: CollectionSpec, n: int, trained_at: int
              ) -> tuple[Any, int] | None:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a trained quantizer")
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise ValueError("truncated")
        length, crc, owner_len, trained_on = _HEADER.unpack(head)
        if length > MAX_PAYLOAD or owner_len > MAX_OWNER:
            raise ValueError(f"sizes out of bounds ({length}, {owner_len})")
        if f.read(owner_len) != self.owner:
            return None  # another incarnation's
        payload = f.read(length + 1)
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise ValueError("damaged (length or checksum)")
        if trained_on < MIN_SHARE * n or trained_on * MIN_SHARE > n:
            return None  # trained on far fewer, or far more, than there are now
        if trained_on <= trained_at:
            return None  # left behind: the serving index was trained on as many
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        if (type(index).__name__ != _TYPES.get(spec.index.type) or index.d != spec.dim
                or index.metric_type != faiss_metric(spec.metric) or not index.is_trained
                or index.ntotal != 0):
            return None
        index.set_direct_map_type(faiss.DirectMap.NoMap)  # as `VectorIndex.new_ivf` makes it
        return index, int(trained_on)

    def remove(self, upto: int | None = None) -> None:
        """The file removed; with `upto` (the trained-on count of the index a snapshot now
        holds), unless it is this owner's and was trained on more: a later training's.
        Never raises (the next `load` judges a file left)."""
        try:
            with self._lock:
                if upto is not None and self._trained_on() > upto:
                    return
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: trained quantizer not removed: %s", self.path, exc)

    def _trained_on(self) -> int:
        """The file's trained-on count if it is this owner's (0 if not, or unreadable)."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(MAGIC) + _HEADER.size + len(self.owner))
        except FileNotFoundError:
            return 0
        if len(head) != len(MAGIC) + _HEADER.size + len(self.owner) or not head.startswith(MAGIC):
            return 0
        _, _, owner_len, trained_on = _HEADER.unpack_from(head, len(MAGIC))
        if owner_len != len(self.owner) or head[len(MAGIC) + _HEADER.size:] != self.owner:
            return 0
        return int(trained_on)
