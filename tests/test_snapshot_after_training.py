"""The index a training swapped in is snapshotted even when no write came after the last
snapshot: a restart then serves it instead of the index it replaced (and training again)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import settled, wait_for

SPEC = CollectionSpec("s", 4, "l2", 1, 1, IndexSpec("ivf_flat", nlist=4))
# Retrainings wait for writes to pause this long: a periodic snapshot may come meanwhile.
TUNING = Tuning(train_min=100, retrain_quiet_s=0.5)


def docs(lo: int, hi: int) -> list[Incoming]:
    rng = np.random.default_rng(lo)
    return [Incoming(f"d{i}", rng.standard_normal(4).astype(np.float32), b"{}", 1, "n1")
            for i in range(lo, hi)]


async def test_a_retrained_index_is_snapshotted_when_a_snapshot_covered_every_write(
    tmp_path: Path, blocking: Blocking
) -> None:
    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    await coll.write({0: docs(0, 150)})
    await settled(coll, what="a training")
    assert coll.index.trained_at == 150
    # Twice as many: a retraining is due once the writes pause; a snapshot comes first.
    await coll.write({0: docs(150, 300)})
    assert not coll.training
    await coll.snapshot()
    await wait_for(lambda: coll.index.trained_at == 300 and not coll.training, 30,
                   what="the retraining")
    await engine.close()

    engine = Engine(tmp_path, blocking, TUNING, fsync=False)
    await engine.start()
    coll = await engine.ensure(SPEC, [0], "u")
    try:
        assert coll.count() == 300
        assert coll.index.trained_at == 300, "the restart loaded the index before retraining"
        assert not coll.wants_training()
    finally:
        await engine.close()
