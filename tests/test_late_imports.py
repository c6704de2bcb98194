"""A node imports at its start what a training would import (node/storage/heap.py,
`import_early`): a module imported in the middle of a bulk load leaves its objects, which live
as long as the process, among the load's temporaries in Python's small-object arenas, and
keeps those arenas resident after the load."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from aquila.node.storage.heap import LATE_MODULES

_SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    import numpy as np
    from aquila.cluster.model.documents import Incoming
    from aquila.cluster.model.spec import CollectionSpec, IndexSpec
    from aquila.node.blocking import Blocking
    from aquila.node.storage.collection import Tuning
    from aquila.node.storage.engine import Engine

    SPEC = CollectionSpec("s", 4, "l2", 1, 1, IndexSpec("ivf_flat", nlist=4))

    async def main(root):
        blocking = Blocking(2)
        engine = Engine(root, blocking, Tuning(train_min=100, retrain_quiet_s=0.2), fsync=False)
        await engine.start()
        try:
            coll = await engine.ensure(SPEC, [0], "u")
            before = set(sys.modules)
            x = np.sin(np.arange(600, dtype=np.float32)).reshape(150, 4)
            await coll.write({0: [Incoming(f"d{i}", x[i], b"{}", 1, "n1") for i in range(150)]})
            deadline = time.monotonic() + 60
            while not (coll.index.trained and not coll.training):
                assert time.monotonic() < deadline, "no training"
                await asyncio.sleep(0.05)
            # Overwrites and deletes of an indexed document: the index's removal (its
            # np.unique imported numpy.ma, 1 MiB of objects, in the middle of a load).
            await coll.write({0: [Incoming(f"d{i}", x[i] + 1, b"{}", 2, "n1") for i in range(10)]
                              + [Incoming(f"d{i}", None, b"", 2, "n1") for i in range(10, 20)]})
            await coll.snapshot()
            print(sorted(set(sys.modules) - before))
        finally:
            await engine.close()
            blocking.close()

    asyncio.run(main(__import__("pathlib").Path(sys.argv[1])))
""")


def test_a_training_and_overwrites_import_no_module_the_start_did_not(tmp_path: object) -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_late_modules_are_not_imported_by_the_serving_modules_themselves() -> None:
    """Without `import_early` they would come at the first training: it is needed."""
    code = ("import sys; import aquila.node.app, aquila.node.storage.engine; "
            f"print([m for m in {list(LATE_MODULES)!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
