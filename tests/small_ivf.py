"""A small IVF collection for the tests of training and snapshots: four lists, dim 4, one
shard, and its documents (seeded, so a test can tell them apart)."""

from __future__ import annotations

import numpy as np

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec

SPEC = CollectionSpec("s", 4, "l2", 1, 1, IndexSpec("ivf_flat", nlist=4))


def doc(i: int) -> Incoming:
    v = np.random.default_rng(i).standard_normal(4).astype(np.float32)
    return Incoming(f"d{i}", v, b"{}", 1, "n1")
