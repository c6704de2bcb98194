"""A training held at its catch-up: its new index is built, and the test acts (writes,
deletes, purges, snapshots) before the writes made meanwhile are replayed into it."""

from __future__ import annotations

import threading

import pytest

from aquila.node.storage.collection import Collection
from aquila.node.storage.index import VectorIndex


def hold_catch_up(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(reached, go_on): every training's catch-up sets `reached`, then waits for `go_on`
    (30 s at most) before it runs."""
    real = Collection._catch_up_sync
    reached, go_on = threading.Event(), threading.Event()

    def catch_up(self: Collection, new: VectorIndex, upto: dict[int, int],
                 seconds: float | None = None, until: dict[int, int] | None = None
                 ) -> dict[int, int] | None:
        reached.set()
        go_on.wait(30)
        return real(self, new, upto, seconds, until)

    monkeypatch.setattr(Collection, "_catch_up_sync", catch_up)
    return reached, go_on
