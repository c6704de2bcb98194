"""Stores rewritten as an earlier layout left them, for the tests of the upgrades."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import rocksdict

from aquila.node.storage.store import CHANGES_CF, TOMBSTONES_CF, VECTORS_CF, Store, WriteBatch


def _folded(path: Path, family: str, families: tuple[str, ...], layout: int) -> None:
    """The closed store at `path` (of these column families) with `family`'s keys put back in
    the default column family, `family` dropped, and the layout key set to `layout`."""
    opts = rocksdict.Options(raw_mode=True)
    db = rocksdict.Rdict(str(path), opts,
                         column_families={name: opts for name in ("default", *families)})
    held = db.get_column_family(family)
    wb = rocksdict.WriteBatch(raw_mode=True)
    for key, value in held.items():
        wb.put(key, value)
    wb.put(b"F", struct.pack(">H", layout))
    db.write(wb)
    held.close()
    db.drop_column_family(family)
    db.close()
    assert family not in rocksdict.Rdict.list_cf(str(path), opts)


def as_layout_6(path: Path) -> None:
    """The closed store at `path` as layout 6 left it: its tombstones' records in the default
    column family with the live ones', no column family of tombstones."""
    _folded(path, TOMBSTONES_CF, (VECTORS_CF, CHANGES_CF, TOMBSTONES_CF), 6)


def as_layout_5(path: Path) -> None:
    """The closed store at `path` as layout 5 left it: as layout 6 (`as_layout_6`), and its
    change log (Q keys) in the default column family, no column family of changes."""
    as_layout_6(path)
    _folded(path, CHANGES_CF, (VECTORS_CF, CHANGES_CF), 5)


@contextlib.contextmanager
def killed_after_writes(monkeypatch: pytest.MonkeyPatch, writes: int) -> Iterator[None]:
    """`Store.write` dies (OSError, as a kill would stop it) after `writes` batches, until the
    block ends; the block expects that death."""
    real = Store.write
    calls = 0

    def dying(self: Store, batch: WriteBatch) -> None:
        nonlocal calls
        calls += 1
        if calls > writes:
            raise OSError("killed")
        real(self, batch)

    monkeypatch.setattr(Store, "write", dying)
    try:
        with pytest.raises(OSError, match="killed"):
            yield
    finally:
        monkeypatch.setattr(Store, "write", real)
