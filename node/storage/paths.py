"""Paths built from names that arrive from the network: each is checked to stay inside the
folder it belongs to, so that no name (`..`, an absolute path, a symlink planted in the data
directory) makes the node read, write or delete anything outside it."""

from __future__ import annotations

from pathlib import Path

from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.spec import check_name


def inside(root: Path, name: str) -> Path:
    """`root/name`, resolved; BadRequest unless it is a direct child of the resolved root."""
    base = root.resolve()
    path = (base / name).resolve()
    if path.parent != base or path.name != name:
        raise BadRequest(f"{name!r} does not name an entry of {base}")
    return path


def collection_dir(root: Path, name: str) -> Path:
    """The folder of collection `name` under `root` (data_dir/collections)."""
    return inside(root, check_name(name))
