"""A trained index whose lists cannot be compacted (no room for the scratch file) still
serves: the compaction is a saving of memory, and a failed one must not throw away a training
(which then started again at once, failed the same way, and so on while the disk was full)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila.node.blocking import Blocking
from aquila.node.files import TMP_SUFFIX
from aquila.node.storage import training
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from tests.conftest import wait_for
from tests.small_ivf import SPEC, doc


async def test_a_training_survives_a_full_disk_at_its_compaction(
    tmp_path: Path, blocking: Blocking, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_train = training.train_streamed
    trainings: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        trainings.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr("aquila.node.storage.collection.train_streamed", counted)
    engine = Engine(tmp_path, blocking, Tuning(train_min=100), fsync=False)
    await engine.start()
    try:
        coll = await engine.ensure(SPEC, [0], "u")
        # No room for the compaction's scratch file: it is /dev/full, where every write
        # fails with ENOSPC (the kernel's own error, at the write or at the close).
        scratch = coll.root / f".compact{TMP_SUFFIX}"
        scratch.symlink_to("/dev/full")
        await coll.write({0: [doc(i) for i in range(150)]})
        await wait_for(lambda: coll.index.trained, 30, what="the training to end")
        assert len(trainings) == 1, "the training was thrown away and done again"
        rows = await coll.search(np.stack([doc(i).vector for i in range(5)]), 1, 4)
        assert [r[0].id for r in rows] == [f"d{i}" for i in range(5)]
        # The snapshot that follows a training over (it stages its file as a .tmp too).
        await coll.snapshot()
        assert not scratch.is_symlink() and not list(coll.root.glob("*.tmp"))
    finally:
        await engine.close()
