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

import base64
import binascii
import uuid
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.bounds import MAX_METADATA_DEPTH, depth_exceeds
from aquila.cluster.model.errors import BadRequest, DimensionMismatch, InvalidVector
from aquila.cluster.model.operations import CONSISTENCY, MAX_ID_CHARS, DocBatch

FIELDS = frozenset(("ids", "vectors_b64", "metadata", "consistency"))
_EMPTY = b"{}"


def is_columnar(body: Any) -> bool:
    """Is this decoded upsert body the columnar form (rather than `documents`)?"""
    return isinstance(body, dict) and "documents" not in body and (
        "vectors_b64" in body or "ids" in body)


def parse_columnar(body: dict[str, Any], dim: int) -> DocBatch:
    unknown = set(body) - FIELDS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
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
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise InvalidVector(f"vectors_b64 row {i} (id {ids[i]!r}): NaN or Inf is not allowed")
    return DocBatch(ids, vectors, _metadata(body.get("metadata"), n), consistency)


def _vector_bytes(b64: Any) -> bytes:
    if not isinstance(b64, str):
        raise BadRequest("'vectors_b64' must be a base64 string of little-endian float32")
    try:
        return base64.b64decode(b64, validate=True)
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
        out.append(raw)
    return out
