"""The columnar upsert body, parsed into the same `DocBatch` as the documents form (pure):

    {"ids": [str, ...], "vectors_b64": "<base64 of little-endian float32, len(ids) × dim>",
     "metadata": [object or null, ...] (optional, same length), "consistency": ...}

The vectors are decoded straight into one numpy array (no float goes through JSON), and the
checks run over whole columns at C speed wherever they can; the errors are those of the
documents form and name the row: a byte count that is not len(ids) × dim × 4 is
`dimension_mismatch`, a NaN or an infinity `invalid_vector`, a bad id, metadata that is not
an object or nests too deep `bad_request`. `ids` may be left out: one UUID per row is
generated, as for documents without an id.
"""

from __future__ import annotations

import binascii
import uuid
from typing import Any

import numpy as np
import orjson
import pybase64
import simdjson

from aquila.cluster.model.bounds import (
    MAX_METADATA_DEPTH,
    MAX_VECTOR_VALUE,
    depth_exceeds,
    vectors_within,
)
from aquila.cluster.model.errors import AquilaError, BadRequest, DimensionMismatch, InvalidVector
from aquila.cluster.model.operations import CONSISTENCY, MAX_ID_CHARS, DocBatch
from aquila.node.http.parse import refuse_unknown

FIELDS = frozenset(("ids", "vectors_b64", "metadata", "consistency"))
_EMPTY = b"{}"


def is_columnar(body: Any) -> bool:
    """Is this decoded upsert body the columnar form (rather than `documents`)?"""
    return isinstance(body, dict) and "documents" not in body and (
        "vectors_b64" in body or "ids" in body)


def parse_columnar_fast(raw: bytes, dim: int) -> DocBatch | None:
    """The batch in a well-formed columnar body, read by simdjson (no Python object for the
    metadata: each object's minified text is taken as it is, as the documents form's fast
    path does); None for anything unusual, which `parse_columnar` then reads and names."""
    try:
        root = simdjson.Parser().parse(raw)
    except (ValueError, TypeError, RuntimeError):
        return None
    if not isinstance(root, simdjson.Object):
        return None
    keys = list(root.keys())
    if len(keys) != len(set(keys)) or not set(keys) <= FIELDS:
        return None
    consistency = root.get("consistency", "quorum")
    b64, ids = root.get("vectors_b64"), root.get("ids")
    if consistency not in CONSISTENCY or not isinstance(b64, str) \
            or not isinstance(ids, simdjson.Array) or len(ids) == 0:
        return None
    id_list = ids.as_list()
    meta = root.get("metadata")
    n = len(id_list)
    metas: list[bytes | None] = [_EMPTY] * n
    try:
        raw_vectors = pybase64.b64decode(b64, validate=True)
        _check_ids(id_list)
        if isinstance(meta, simdjson.Array) and len(meta) == n:
            metas = [_mini(m) for m in meta]
        elif meta is not None:
            return None
    except (AquilaError, binascii.Error, ValueError, TypeError):
        return None
    if len(raw_vectors) != n * 4 * dim or None in metas:
        return None
    vectors = np.frombuffer(raw_vectors, dtype="<f4").reshape(n, dim).astype(np.float32,
                                                                            copy=False)
    if not vectors_within(vectors).all():  # the general path says which and why
        return None
    return DocBatch(id_list, vectors, metas, str(consistency))  # type: ignore[arg-type]


def _mini(m: Any) -> bytes | None:
    """A metadata object's minified text; None when it is not an object or may nest too
    deep (the general path says which)."""
    if m is None:
        return _EMPTY
    if not isinstance(m, simdjson.Object):
        return None
    out: bytes | str = m.mini
    mini = out.encode() if isinstance(out, str) else out
    if mini.count(b"{") + mini.count(b"[") > MAX_METADATA_DEPTH:
        return None
    return mini


def parse_columnar(body: dict[str, Any], dim: int) -> DocBatch:
    refuse_unknown(body, FIELDS)
    consistency = body.get("consistency", "quorum")
    if consistency not in CONSISTENCY:
        raise BadRequest(f"'consistency' must be one of {', '.join(CONSISTENCY)}")
    raw = _vector_bytes(body.get("vectors_b64"))
    row = 4 * dim
    ids = body.get("ids")
    if ids is None:
        if not raw or len(raw) % row:
            raise DimensionMismatch(
                f"'vectors_b64' holds {len(raw)} bytes, not a whole number of rows of "
                f"dim {dim} × 4 bytes")
        ids = [str(uuid.uuid4()) for _ in range(len(raw) // row)]
    else:
        _check_ids(ids)
        if len(raw) != len(ids) * row:
            raise DimensionMismatch(
                f"'vectors_b64' holds {len(raw)} bytes; {len(ids)} ids of dim {dim} need "
                f"{len(ids) * row} (little-endian float32, row after row)")
    n = len(ids)
    vectors = np.frombuffer(raw, dtype="<f4").reshape(n, dim).astype(np.float32, copy=False)
    finite = vectors_within(vectors)
    if not finite.all():
        i = int(np.argmin(finite))
        raise InvalidVector(f"vectors_b64 row {i} (id {ids[i]!r}): NaN, Inf or a value beyond "
                            f"±{MAX_VECTOR_VALUE:g} is not allowed")
    return DocBatch(ids, vectors, _metadata(body.get("metadata"), n), consistency)


def _vector_bytes(b64: Any) -> bytes:
    if not isinstance(b64, str):
        raise BadRequest("'vectors_b64' must be a base64 string of little-endian float32")
    try:
        # pybase64: SIMD, several times the standard library's speed on megabytes of vectors.
        return pybase64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):  # ValueError: characters beyond ASCII
        raise BadRequest("'vectors_b64' is not valid base64") from None


def _check_ids(ids: Any) -> None:
    if not isinstance(ids, list) or not ids:
        raise BadRequest("'ids' must be a non-empty list of document ids")
    # Lengths in one pass; -1 marks what is not a string.
    lengths = [len(x) if type(x) is str else -1 for x in ids]
    if min(lengths) < 1 or max(lengths) > MAX_ID_CHARS:
        i = next(j for j, n in enumerate(lengths) if not 1 <= n <= MAX_ID_CHARS)
        raise BadRequest(f"ids[{i}]: an id is a string of 1 to {MAX_ID_CHARS} characters")


def _metadata(meta: Any, n: int) -> list[bytes]:
    if meta is None:
        return [_EMPTY] * n
    if not isinstance(meta, list) or len(meta) != n:
        raise BadRequest(f"'metadata' must be a list of {n} objects (or nulls), one per id")
    out = []
    dumps = orjson.dumps
    for i, m in enumerate(meta):
        if m is None:
            out.append(_EMPTY)
            continue
        if type(m) is not dict:
            raise BadRequest(f"metadata[{i}]: metadata must be a JSON object or null")
        raw = dumps(m)
        # Counting brackets (in strings too) bounds the depth from above: only metadata with
        # more of them than the limit is measured.
        if raw.count(b"{") + raw.count(b"[") > MAX_METADATA_DEPTH and \
                depth_exceeds(m, MAX_METADATA_DEPTH):
            raise BadRequest(
                f"metadata[{i}]: nested too deep (at most {MAX_METADATA_DEPTH} levels)")
        out.append(bytes(memoryview(raw)))  # kept in memory: see documents.json_bytes
    return out
