"""A node's FAISS searches do not stop to take the GIL (issue 9: batches cost little more than
FAISS itself). faiss's Python module installs an interrupt callback that makes a search of
many lists take the GIL every few lists to ask Python about signals; beside the node's busy
event loop each such check waited for the GIL. The node removes it when its engine is made."""

from __future__ import annotations

from pathlib import Path

import faiss

from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import interrupt_checks_installed


def test_a_nodes_engine_removes_faiss_interrupt_checks(tmp_path: Path,
                                                       blocking: Blocking) -> None:
    faiss.PythonInterruptCallback.reset()  # what `import faiss` and its TimeoutGuard install
    assert interrupt_checks_installed()
    Engine(tmp_path, blocking, Tuning(), fsync=False)
    assert not interrupt_checks_installed()
