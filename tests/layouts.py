"""Stores rewritten as an earlier layout left them, for the tests of the upgrades."""

from __future__ import annotations

import struct
from pathlib import Path

import rocksdict

from aquila.node.storage.store import CHANGES_CF, VECTORS_CF


def as_layout_5(path: Path) -> None:
    """The closed store at `path` as layout 5 left it: its change log (Q keys) in the default
    column family, no column family of changes."""
    opts = rocksdict.Options(raw_mode=True)
    db = rocksdict.Rdict(str(path), opts, column_families={
        "default": opts, VECTORS_CF: opts, CHANGES_CF: opts})
    changes = db.get_column_family(CHANGES_CF)
    wb = rocksdict.WriteBatch(raw_mode=True)
    for key, value in changes.items():
        wb.put(key, value)
    wb.put(b"F", struct.pack(">H", 5))
    db.write(wb)
    changes.close()
    db.drop_column_family(CHANGES_CF)
    db.close()
    assert CHANGES_CF not in rocksdict.Rdict.list_cf(str(path), opts)
