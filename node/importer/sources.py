"""What `aquila import` reads, in batches of rows, each row checked before it is sent.

- `.jsonl`: one document a line, `{"id": str, "vector": [number, ...], "metadata": {...}}`
  (`metadata` optional; a line without `id` takes its line number, counted from 0, so that a
  rerun writes the same documents); blank lines are skipped.
- `.npy`: a 2-D array of vectors, read through a memory map a batch at a time (a file larger
  than memory never becomes Python objects); ids are row numbers unless `--ids FILE` (one a
  line), metadata from `--metadata FILE.jsonl` (one object, or null, a line, aligned by row).

A row that cannot be sent (no valid id, a vector of the wrong length, NaN or infinity,
metadata that is not an object or nests too deep) is a `BadRow` naming its line; the others
go on. Batch `b` holds rows `b * size` to `(b + 1) * size - 1` of the file however many of
them are bad, so that a rerun finds the same batches.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from aquila.cluster.model.bounds import (
    MAX_DOCUMENT_METADATA,
    MAX_METADATA_DEPTH,
    MAX_VECTOR_VALUE,
    depth_exceeds,
    vectors_within,
)
from aquila.cluster.model.operations import MAX_ID_CHARS

_EMPTY = b"{}"
_READ_CHUNK = 1 << 20


class SourceError(Exception):
    """The input as a whole cannot be read (missing file, wrong shape, misaligned files)."""


@dataclass(frozen=True)
class BadRow:
    row: int  # 0-based row (line) of the input
    where: str  # for a person: "line 18", "row 17 (--ids line 18)"
    reason: str


@dataclass
class Batch:
    index: int
    rows: list[int]  # the input row of each document below
    ids: list[str]
    vectors: np.ndarray  # len(ids) × dim float32, C order
    metadata: list[bytes]  # one JSON object text per document
    bad: list[BadRow] = field(default_factory=list)
    size: int = 0  # rows of the input the batch covers, bad ones included

    def take(self, lo: int, hi: int) -> Batch:
        """Documents lo..hi-1 of the batch (for sending part of it again)."""
        return Batch(self.index, self.rows[lo:hi], self.ids[lo:hi], self.vectors[lo:hi],
                     self.metadata[lo:hi], [], hi - lo)


class Source(Protocol):
    path: Path
    rows: int  # rows (lines) of the input, for progress
    dim: int | None  # what the input says (.npy), None when only its rows can tell

    def batches(self, size: int, dim: int, skip: Callable[[int], bool]) -> Iterator[Batch]:
        """Every batch in order but those `skip(index)` says were sent already (read past
        cheaply, not checked)."""
        ...

    def files(self) -> list[Path]:
        """Every file read (the resume state is tied to them)."""
        ...

    def where(self, row: int) -> str:
        """A row's place in the input, for a person."""
        ...


def open_source(path: Path, ids: Path | None, metadata: Path | None) -> Source:
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return NpySource(path, ids, metadata)
    if suffix in (".jsonl", ".ndjson"):
        if ids is not None or metadata is not None:
            raise SourceError("--ids and --metadata go with a .npy file; a .jsonl line holds "
                              "its own id and metadata")
        return JsonlSource(path)
    raise SourceError(f"{path}: expected a .jsonl or a .npy file")


def count_lines(path: Path) -> int:
    """Lines of a file (a last line without a newline counts), read in big chunks."""
    n = 0
    last = b"\n"
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def check_metadata(raw: bytes) -> tuple[bytes | None, str]:
    """(the object's text, "") or (None, why not) for one line of metadata."""
    text = raw.strip()
    if not text or text == b"null":
        return _EMPTY, ""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return None, f"metadata is not JSON: {exc}"
    return _metadata_text(value, text)


def _metadata_text(value: Any, text: bytes | None = None) -> tuple[bytes | None, str]:
    if value is None:
        return _EMPTY, ""
    if not isinstance(value, dict):
        return None, f"metadata must be a JSON object, got {type(value).__name__}"
    out = text if text is not None else orjson.dumps(value)
    if out.count(b"{") + out.count(b"[") > MAX_METADATA_DEPTH and \
            depth_exceeds(value, MAX_METADATA_DEPTH):
        return None, f"metadata nests deeper than {MAX_METADATA_DEPTH} levels"
    # The node counts the object minified (whitespace in the line is not its).
    if len(out) > MAX_DOCUMENT_METADATA and (
            size := len(orjson.dumps(value))) > MAX_DOCUMENT_METADATA:
        return None, (f"metadata is {size:,} bytes serialised, at most "
                      f"{MAX_DOCUMENT_METADATA:,}")
    return out, ""


def check_id(doc_id: Any) -> str:
    """Why `doc_id` is not a valid id ("" when it is)."""
    if not isinstance(doc_id, str):
        return f"an id is a string, got {type(doc_id).__name__}"
    if not 1 <= len(doc_id) <= MAX_ID_CHARS:
        return f"an id has 1 to {MAX_ID_CHARS} characters, got {len(doc_id)}"
    return ""


class JsonlSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = count_lines(path)
        self.dim: int | None = None

    def files(self) -> list[Path]:
        return [self.path]

    def where(self, row: int) -> str:
        return f"line {row + 1}"

    def batches(self, size: int, dim: int, skip: Callable[[int], bool]) -> Iterator[Batch]:
        with self.path.open("rb") as f:
            for index, start in enumerate(range(0, self.rows, size)):
                lines = [f.readline() for _ in range(min(size, self.rows - start))]
                if skip(index):
                    continue
                yield self._batch(index, start, lines, dim)

    def _batch(self, index: int, start: int, lines: list[bytes], dim: int) -> Batch:
        rows: list[int] = []
        ids: list[str] = []
        vectors: list[Any] = []
        metas: list[bytes] = []
        bad: list[BadRow] = []
        for row, line in enumerate(lines, start):
            if not line.strip():
                continue
            why, doc = _jsonl_document(line, row, dim)
            if doc is None:
                bad.append(BadRow(row, f"line {row + 1}", why))
                continue
            rows.append(row)
            ids.append(doc[0])
            vectors.append(doc[1])
            metas.append(doc[2])
        matrix = np.zeros((0, dim), np.float32)
        if vectors:
            with np.errstate(over="ignore"):  # beyond float32: inf, refused below
                matrix = np.asarray(vectors, dtype=np.float32)
            finite = vectors_within(matrix)
            if not finite.all():
                keep = np.flatnonzero(finite)
                bad += [BadRow(rows[i], f"line {rows[i] + 1}",
                               "the vector holds NaN, Inf or a value beyond "
                               f"±{MAX_VECTOR_VALUE:g}")
                        for i in np.flatnonzero(~finite)]
                rows = [rows[i] for i in keep]
                ids = [ids[i] for i in keep]
                metas = [metas[i] for i in keep]
                matrix = matrix[keep]
        bad.sort(key=lambda b: b.row)
        return Batch(index, rows, ids, np.ascontiguousarray(matrix), metas, bad, len(lines))


def _jsonl_document(line: bytes, row: int, dim: int
                    ) -> tuple[str, tuple[str, list[Any], bytes] | None]:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}", None
    if not isinstance(doc, dict):
        return "a line is a JSON object with id, vector and metadata", None
    unknown = set(doc) - {"id", "vector", "metadata"}
    if unknown:
        return f"unknown field(s) {', '.join(sorted(unknown))}", None
    doc_id = doc.get("id", str(row))
    why = check_id(doc_id)
    if why:
        return why, None
    vec = doc.get("vector")
    if not isinstance(vec, list) or not all(
            type(x) in (int, float) for x in vec):
        return "'vector' must be a list of numbers", None
    if len(vec) != dim:
        return f"the vector has {len(vec)} values, the collection's dimension is {dim}", None
    meta, why = _metadata_text(doc.get("metadata"))
    if meta is None:
        return why, None
    return "", (doc_id, vec, meta)


class NpySource:
    def __init__(self, path: Path, ids: Path | None, metadata: Path | None) -> None:
        self.path = path
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SourceError(f"{path}: not a .npy file numpy can map: {exc}") from None
        if self.array.ndim != 2 or self.array.dtype.kind not in "fiu":
            raise SourceError(f"{path}: expected a 2-D array of numbers (rows × dim), got "
                              f"shape {self.array.shape} of {self.array.dtype}")
        self.rows = int(self.array.shape[0])
        self.dim: int | None = int(self.array.shape[1])
        self.ids_path, self.meta_path = ids, metadata
        for what, p in (("--ids", ids), ("--metadata", metadata)):
            if p is None:
                continue
            if not p.is_file():
                raise SourceError(f"{what} {p}: no such file")
            lines = count_lines(p)
            if lines != self.rows:
                raise SourceError(f"{what} {p} has {lines} lines for the {self.rows} rows of "
                                  f"{path}: one line per row, in the same order")

    def files(self) -> list[Path]:
        return [p for p in (self.path, self.ids_path, self.meta_path) if p is not None]

    def where(self, row: int) -> str:
        return f"row {row}" + (f" (line {row + 1} of the --ids and --metadata files)"
                               if self.ids_path or self.meta_path else "")

    def batches(self, size: int, dim: int, skip: Callable[[int], bool]) -> Iterator[Batch]:
        if dim != self.dim:
            raise SourceError(f"{self.path} holds vectors of dimension {self.dim}; the "
                              f"collection's is {dim}")
        ids = _lines(self.ids_path)
        metas = _lines(self.meta_path)
        for index, start in enumerate(range(0, self.rows, size)):
            n = min(size, self.rows - start)
            id_lines = [next(ids) for _ in range(n)] if self.ids_path else None
            meta_lines = [next(metas) for _ in range(n)] if self.meta_path else None
            if skip(index):
                continue
            yield self._batch(index, start, n, id_lines, meta_lines)

    def _batch(self, index: int, start: int, n: int, id_lines: list[bytes] | None,
               meta_lines: list[bytes] | None) -> Batch:
        with np.errstate(over="ignore"):
            matrix = np.ascontiguousarray(self.array[start:start + n], dtype=np.float32)
        finite = np.asarray(vectors_within(matrix))
        rows: list[int] = []
        ids: list[str] = []
        metas: list[bytes] = []
        bad: list[BadRow] = []
        for i in range(n):
            row = start + i
            if not finite[i]:
                bad.append(BadRow(row, f"row {row}", "the vector holds NaN, infinity or a value beyond "
                                  f"±{MAX_VECTOR_VALUE:g}"))
                continue
            if id_lines is None:
                doc_id = str(row)
            else:
                doc_id, why = _id_line(id_lines[i])
                if why:
                    bad.append(BadRow(row, f"row {row} (--ids line {row + 1})", why))
                    continue
            meta = _EMPTY
            if meta_lines is not None:
                text, why = check_metadata(meta_lines[i])
                if text is None:
                    bad.append(BadRow(row, f"row {row} (--metadata line {row + 1})", why))
                    continue
                meta = text
            rows.append(row)
            ids.append(doc_id)
            metas.append(meta)
        if len(rows) < n:
            matrix = matrix[[r - start for r in rows]]
        return Batch(index, rows, ids, matrix, metas, bad, n)


def _id_line(raw: bytes) -> tuple[str, str]:
    """(the id on a line of --ids, why it is not one: "" when it is)."""
    # Only the line's end goes: spaces may be part of an id.
    text = raw.rstrip(b"\n").rstrip(b"\r")
    if not text:
        return "", "the line is empty"
    try:
        doc_id = text.decode("utf-8")
    except UnicodeDecodeError:
        return "", "the line is not UTF-8"
    return doc_id, check_id(doc_id)


def _lines(path: Path | None) -> Iterator[bytes]:
    if path is None:
        return iter(())
    f: io.BufferedReader = path.open("rb")  # closed when the generator is collected

    def gen() -> Iterator[bytes]:
        with f:
            yield from f

    return gen()
