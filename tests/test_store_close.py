"""A store closes while another thread reads it. rocksdict lets the GIL go inside a multi-get
(and a WAL fsync, a flush) and refuses to close a database borrowed meanwhile ("Already
borrowed"): the close raised, the store stayed open (its folder locked for this process) and
the collection's close, the engine's with it, stopped there. A document read by id, a page
of a scroll or a transfer, an anti-entropy scan take no collection lock: a stop or a drop
under reads met it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import rocksdict

from aquila.node.storage.store import RocksMemory, Store, doc_key

MIB = 1 << 20
KEYS = 50_000


def filled(path: Path) -> Store:
    store = Store(path, fsync=False, memory=RocksMemory(32 * MIB))
    store.open()
    wb = rocksdict.WriteBatch(raw_mode=True)
    for i in range(KEYS):
        wb.put(doc_key(0, f"k{i}"), b"x" * 64)
    store.db.write(wb)
    return store


@pytest.mark.parametrize("round_", range(3))
def test_a_store_closes_under_a_read_in_flight(tmp_path: Path, round_: int) -> None:
    store = filled(tmp_path / "s")
    keys = [doc_key(0, f"k{i}") for i in range(KEYS)]
    reading = threading.Event()

    def read() -> None:
        try:
            while True:  # multi-gets of 50k keys until the store is closed under them
                reading.set()
                store.raw_records(keys)
        except RuntimeError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert reading.wait(10)
        store.close()  # raised "Already borrowed", the store left open
    finally:
        db, store._db = store._db, None  # a close that failed: the reader stopped, then it
        reader.join(30)
        if db is not None:
            db.close()
    assert not reader.is_alive()
    # Closed for good: the folder opens again in this process (RocksDB's lock let go).
    again = Store(tmp_path / "s", fsync=False, memory=RocksMemory(32 * MIB))
    again.open()
    assert again.raw_records([doc_key(0, "k1")]) == [b"x" * 64]
    again.close()


def test_a_closed_store_refuses_reads(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", fsync=False)
    store.open()
    store.close()
    with pytest.raises(RuntimeError, match="not open"):
        store.get_records(0, ["a"])
