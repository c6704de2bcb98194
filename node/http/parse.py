"""Parsing and validating the bodies of document and search requests into typed requests
(`cluster.model.operations`), pure.

A rejected request changes nothing: everything is checked here, before any write, and a batch
with one bad document is rejected whole with the document's position in the message.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Set
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.bounds import (
    MAX_ANSWER_FLOATS,
    MAX_DELETE_IDS,
    MAX_METADATA_DEPTH,
    MAX_NPROBE,
    MAX_QUERIES,
    MAX_QUERY_RESULTS,
    MAX_TIMEOUT_MS,
    MAX_VECTOR_VALUE,
    depth_exceeds,
    vectors_within,
)
from aquila.cluster.model.cursor import decode_cursor
from aquila.cluster.model.documents import json_bytes
from aquila.cluster.model.errors import BadRequest, DimensionMismatch, InvalidVector
from aquila.cluster.model.filters import parse_filter
from aquila.cluster.model.operations import (
    CONSISTENCY,
    MAX_ID_CHARS,
    MAX_K,
    MAX_SCROLL_LIMIT,
    CountRequest,
    DocBatch,
    ScrollRequest,
    SearchRequest,
    valid_id,
)
from aquila.cluster.model.recall import check_target

# Nesting of a whole request body: documents and their metadata, with room to spare. Deeper
# bodies are refused before any code walks them recursively.
MAX_BODY_DEPTH = MAX_METADATA_DEPTH + 8


_NUMBER_TYPES = frozenset((int, float))


def _vector_rows(raw: Any, dim: int, what: str) -> np.ndarray:
    """An n × dim float32 array from a list of lists, or the right 400 naming the row."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"'{what}' must be a non-empty list of vectors")
    # Every element of every row must be a JSON number: numpy alone would take numeric
    # strings ("1.5") and booleans as numbers. map(type) keeps this check at C speed.
    for i, v in enumerate(raw):
        if not isinstance(v, list) or len(v) != dim or not _NUMBER_TYPES.issuperset(map(type, v)):
            _one_vector(v, dim, f"{what}[{i}]")
            raise InvalidVector(f"{what}[{i}]: a vector must be a list of {dim} numbers")
    try:
        # As sent (float64): one just above the bound may round down to it in float32.
        arr = np.array(raw, dtype=np.float64)
    except (OverflowError, ValueError):  # an integer beyond any float
        for i, v in enumerate(raw):
            try:
                np.array(v, dtype=np.float64)
            except (OverflowError, ValueError):
                raise InvalidVector(f"{what}[{i}]: a value overflows float32") from None
        raise
    bad = ~vectors_within(arr)  # NaN and Inf (a number too large for a double) included
    if bad.any():
        raise InvalidVector(f"{what}[{int(np.argmax(bad))}]: NaN, Inf or a value beyond "
                            f"±{MAX_VECTOR_VALUE:g} is not allowed")
    return arr.astype(np.float32)


def _one_vector(v: Any, dim: int, where: str) -> None:
    if not isinstance(v, list):
        raise InvalidVector(f"{where}: a vector must be a list of numbers")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise InvalidVector(f"{where}: a vector holds only numbers, got {type(x).__name__}")
    if len(v) != dim:
        raise DimensionMismatch(f"{where}: expected dimension {dim}, got {len(v)}")


def loads_overflowing(raw: bytes) -> Any:
    """Parse a body orjson refused because a number overflows a double (`1e400`): valid JSON
    that stands for ±Inf. Such a number inside a vector becomes ±inf, so validation answers
    `invalid_vector`; anywhere else it is a `bad_request`. Raises ValueError when the body is
    malformed for other reasons too."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deep") from None
    if depth_exceeds(body, MAX_BODY_DEPTH):  # the checks below recurse
        raise ValueError("nested too deep")
    try:
        orjson.dumps(body)  # what orjson cannot represent (lone surrogates) stays malformed
    except orjson.JSONEncodeError as exc:
        raise ValueError(str(exc)) from None
    if _overflow_outside_vectors(body):
        raise BadRequest("a number outside any vector is too large for a double")
    return body


# An integer beyond 64 bits is written with 20 digits or more, or 19 after a minus (2^64 has
# 20 digits, -2^63 19; a timestamp in nanoseconds, 19, passes). orjson reads one as the
# nearest double, silently (123456789012345678901234567890 came back as 1.2345678901234568e+29),
# and metadata would be stored and returned other than sent. Rare: looked for in the body
# with its bytes mapped (digits to '9'; '-' kept; what a JSON number can follow, ':', ',',
# '[' and white space, to '|'; all else to 'x') as a run of digits where a number can begin:
# a copy and two substring searches, 1.9 ms for 750 KB of floats, as long as orjson's parse
# of them (a regular expression took 17 ms); only bodies the fast paths refuse come here. A
# fraction's digits follow '.', an id's follow a letter or a quote: neither is looked at.
# What the search finds is confirmed by a parse that keeps integers exact (digits after a
# space inside a string pass it).
_DIGIT_RUNS = bytes(0x39 if 0x30 <= b <= 0x39 else b if b == 0x2D
                    else 0x7C if b in b":,[ \t\r\n" else 0x78 for b in range(256))
_LONG_POSITIVE, _LONG_NEGATIVE = b"|" + b"9" * 20, b"|-" + b"9" * 19
_INT_MIN, _INT_END = -(1 << 63), 1 << 64


def refuse_wide_integers(raw: bytes) -> None:
    """400 when the JSON `raw` holds an integer beyond 64 bits (signed or unsigned), which
    the body's parse would turn into a double."""
    runs = raw.translate(_DIGIT_RUNS)
    if _LONG_POSITIVE not in runs and _LONG_NEGATIVE not in runs:
        return
    # ValueError: malformed otherwise (orjson said so already); BadRequest is not one.
    with contextlib.suppress(ValueError, RecursionError):
        json.loads(raw, parse_int=_int_within_64_bits)


def _int_within_64_bits(literal: str) -> int:
    value = int(literal)
    if not _INT_MIN <= value < _INT_END:
        raise BadRequest(f"the integer {literal[:40]}{'...' if len(literal) > 40 else ''} is "
                         "beyond 64 bits: JSON numbers here are 64-bit integers or doubles "
                         "(send it as a string to keep every digit)")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _has_overflow(v: Any) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, list):
        return any(_has_overflow(x) for x in v)
    if isinstance(v, dict):
        return any(_has_overflow(x) for x in v.values())
    return False


def _overflow_outside_vectors(body: Any) -> bool:
    """Non-finite numbers anywhere but a search's `vector`/`vectors` or a document's `vector`."""
    if not isinstance(body, dict):
        return _has_overflow(body)
    for key, val in body.items():
        if key in ("vector", "vectors"):
            continue
        if key == "documents" and isinstance(val, list):
            for d in val:
                items = d.items() if isinstance(d, dict) else [("", d)]
                if any(_has_overflow(x) for k, x in items if k != "vector"):
                    return True
        elif _has_overflow(val):
            return True
    return False


def refuse_unknown(body: dict[str, Any], known: Set[str], hint: str = "") -> None:
    """400 naming the fields of `body` not in `known` (a misspelt field is refused, never
    ignored); `hint` follows the message."""
    unknown = set(body) - known
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}{hint}")


# The fields of an upsert's document form and of a delete's body (a misspelt "consistency"
# would otherwise be a quorum write the caller did not ask for).
UPSERT_FIELDS = frozenset({"documents", "consistency"})
DELETE_FIELDS = frozenset({"ids", "consistency"})


def parse_documents(body: Any, dim: int) -> DocBatch:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    refuse_unknown(body, UPSERT_FIELDS)
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise BadRequest("'documents' must be a non-empty list")
    consistency = body.get("consistency", "quorum")
    if consistency not in CONSISTENCY:
        raise BadRequest(f"'consistency' must be one of {', '.join(CONSISTENCY)}")
    ids: list[str] = []
    metas: list[bytes] = []
    raw_vectors: list[Any] = []
    for i, d in enumerate(docs):
        where = f"documents[{i}]"
        if not isinstance(d, dict):
            raise BadRequest(f"{where}: a document must be an object")
        unknown = set(d) - {"id", "vector", "metadata"}
        if unknown:
            raise BadRequest(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        doc_id = d.get("id")
        if doc_id is None:
            doc_id = str(uuid.uuid4())
        elif not valid_id(doc_id):
            raise BadRequest(f"{where}: 'id' must be a string of 1 to {MAX_ID_CHARS} characters")
        meta = d.get("metadata", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise BadRequest(f"{where}: 'metadata' must be a JSON object")
        if depth_exceeds(meta, MAX_METADATA_DEPTH):
            raise BadRequest(
                f"{where}: 'metadata' is nested too deep (at most {MAX_METADATA_DEPTH} levels)"
            )
        if "vector" not in d:
            raise BadRequest(f"{where}: 'vector' is required")
        v = d["vector"]
        if not isinstance(v, list):
            raise InvalidVector(f"{where}: 'vector' must be a list of numbers")
        if len(v) != dim:
            _one_vector(v, dim, where)
        ids.append(doc_id)
        metas.append(json_bytes(meta))  # kept in memory: its length, not orjson's buffer
        raw_vectors.append(v)
    return DocBatch(ids, _vector_rows(raw_vectors, dim, "documents"), metas, consistency)


def parse_ids(body: Any) -> list[str]:
    if not isinstance(body, dict) or not isinstance(body.get("ids"), list):
        raise BadRequest("body must be an object with a list 'ids'")
    refuse_unknown(body, DELETE_FIELDS)
    ids = body["ids"]
    if len(ids) > MAX_DELETE_IDS:
        raise BadRequest(f"at most {MAX_DELETE_IDS} ids in one delete, got {len(ids)}")
    for i, doc_id in enumerate(ids):
        if not valid_id(doc_id):
            raise BadRequest(f"ids[{i}]: an id is a string of 1 to {MAX_ID_CHARS} characters")
    return list(dict.fromkeys(ids))


def check_id(doc_id: str) -> str:
    if not valid_id(doc_id):
        raise BadRequest(f"an id is a string of 1 to {MAX_ID_CHARS} characters")
    return doc_id


SEARCH_FIELDS = frozenset({"vectors", "vector", "id", "ids", "k", "nprobe", "recall", "filter",
                           "include", "allow_partial", "timeout_ms", "explain"})


def parse_search(body: Any, dim: int) -> SearchRequest:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    refuse_unknown(body, SEARCH_FIELDS)
    if sum(q in body for q in ("vector", "vectors", "id", "ids")) != 1:
        raise BadRequest("give exactly one of 'vector', 'vectors', 'id' or 'ids'")
    query_ids = _query_ids(body)
    if query_ids is not None:
        vectors = np.zeros((len(query_ids), dim), np.float32)  # looked up by the read path
    elif "vector" in body:
        if not isinstance(body["vector"], list):
            raise InvalidVector("'vector' must be a list of numbers")
        if len(body["vector"]) != dim:
            _one_vector(body["vector"], dim, "vector")
        vectors = _vector_rows([body["vector"]], dim, "vector")
    else:
        raw = body["vectors"]
        if isinstance(raw, list) and len(raw) > MAX_QUERIES:
            raise BadRequest(f"at most {MAX_QUERIES} query vectors, got {len(raw)}")
        if isinstance(raw, list):
            for i, v in enumerate(raw):
                if not isinstance(v, list) or len(v) != dim:
                    _one_vector(v, dim, f"vectors[{i}]")
        vectors = _vector_rows(raw, dim, "vectors")
    return search_request(body, vectors, query_ids)


def search_request(
    body: dict[str, Any], vectors: np.ndarray, query_ids: list[str] | None
) -> SearchRequest:
    """The request from its valid query (`vectors`, or the documents `query_ids`) and the
    body's other fields, each checked here (node/http/fastsearch.py shares this part)."""
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise BadRequest(f"'k' must be an integer from 1 to {MAX_K}")
    if len(vectors) * k > MAX_QUERY_RESULTS:
        raise BadRequest(
            f"queries × k must be at most {MAX_QUERY_RESULTS}, got {len(vectors)} × {k}"
        )
    nprobe = body.get("nprobe")
    if nprobe is not None and (
        isinstance(nprobe, bool) or not isinstance(nprobe, int) or not 1 <= nprobe <= MAX_NPROBE
    ):
        raise BadRequest(f"'nprobe' must be an integer from 1 to {MAX_NPROBE}")
    recall = body.get("recall")
    if recall is not None:
        if nprobe is not None:
            raise BadRequest("give 'nprobe' or 'recall', not both")
        recall = check_target(recall)
    include = body.get("include", ["metadata"])
    # Checked item by item: a list or object among them cannot go into a set.
    if not isinstance(include, list) or not all(i in ("metadata", "vector") for i in include):
        raise BadRequest("'include' is a list of 'metadata' and 'vector'")
    if "vector" in include:
        _answer_floats(len(vectors) * k, vectors.shape[1], "queries × k")
    allow_partial = _flag(body, "allow_partial", True)
    timeout_ms = _timeout_ms(body)
    explain = _flag(body, "explain", False)
    flt = body.get("filter")
    return SearchRequest(
        vectors=vectors,
        k=k,
        nprobe=nprobe,
        filter=flt,
        predicate=parse_filter(flt),
        include_metadata="metadata" in include,
        include_vector="vector" in include,
        allow_partial=allow_partial,
        timeout_ms=timeout_ms,
        explain=explain,
        query_ids=query_ids,
        recall=recall,
    )


def _query_ids(body: dict[str, Any]) -> list[str] | None:
    """The stored documents a search asks by (`id` or `ids`), or None."""
    if "id" in body:
        if not valid_id(body["id"]):
            raise BadRequest(f"'id' must be a string of 1 to {MAX_ID_CHARS} characters")
        return [body["id"]]
    if "ids" not in body:
        return None
    ids = body["ids"]
    if not isinstance(ids, list) or not ids:
        raise BadRequest("'ids' must be a non-empty list of document ids")
    if len(ids) > MAX_QUERIES:
        raise BadRequest(f"at most {MAX_QUERIES} query ids, got {len(ids)}")
    for i, doc_id in enumerate(ids):
        if not valid_id(doc_id):
            raise BadRequest(f"ids[{i}]: an id is a string of 1 to {MAX_ID_CHARS} characters")
    return list(ids)


def _timeout_ms(body: dict[str, Any]) -> int | None:
    timeout_ms = body.get("timeout_ms")
    if timeout_ms is not None and (
        isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int)
        or not 1 <= timeout_ms <= MAX_TIMEOUT_MS
    ):
        raise BadRequest(f"'timeout_ms' must be an integer from 1 to {MAX_TIMEOUT_MS}")
    return timeout_ms


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a boolean")
    return value


def _known(body: Any, known: set[str]) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    refuse_unknown(body, known)
    return body


def parse_count(body: Any) -> CountRequest:
    """`{"filter"?, "allow_partial"? (default true), "timeout_ms"?}`; an empty body counts all."""
    body = _known(body, {"filter", "allow_partial", "timeout_ms"})
    flt = body.get("filter")
    return CountRequest(flt, parse_filter(flt), _flag(body, "allow_partial", True),
                        _timeout_ms(body))


def _answer_floats(rows: int, dim: int, what: str) -> None:
    """Refuse an answer whose vectors would be more than `MAX_ANSWER_FLOATS` floats."""
    if rows * dim > MAX_ANSWER_FLOATS:
        raise BadRequest(
            f"with 'vector' in include, {what} × dim must be at most {MAX_ANSWER_FLOATS:,}, "
            f"got {rows:,} × {dim:,}: ask for fewer results or leave 'vector' out")


def parse_scroll(body: Any, collection: str, shards: int, dim: int) -> ScrollRequest:
    """`{"filter"?, "limit"? (1..1000, 100), "cursor"? (str or null), "include"?,
    "allow_partial"? (default false: a scroll is a walk over everything), "timeout_ms"?}`."""
    body = _known(body, {"filter", "limit", "cursor", "include", "allow_partial", "timeout_ms"})
    limit = body.get("limit", 100)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SCROLL_LIMIT:
        raise BadRequest(f"'limit' must be an integer from 1 to {MAX_SCROLL_LIMIT}")
    include = body.get("include", ["metadata"])
    if not isinstance(include, list) or not all(i in ("metadata", "vector") for i in include):
        raise BadRequest("'include' is a list of 'metadata' and 'vector'")
    if "vector" in include:
        _answer_floats(limit, dim, "limit")
    cursor = body.get("cursor")
    flt = body.get("filter")
    return ScrollRequest(
        filter=flt,
        predicate=parse_filter(flt),
        limit=limit,
        position=None if cursor is None else decode_cursor(cursor, collection, shards),
        include_metadata="metadata" in include,
        include_vector="vector" in include,
        allow_partial=_flag(body, "allow_partial", False),
        timeout_ms=_timeout_ms(body),
    )


def compact_size(body: Any) -> int:
    """Bytes of `body` as compact JSON with every vector written at float32 precision: what
    the body limit measures, so that the digits a client's JSON library spends on float64
    renderings of float32 data do not count."""

    def shrink(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: _as_f32(v) if k in ("vector", "vectors") else shrink(v)
                    for k, v in obj.items()}
        if isinstance(obj, list):
            return [shrink(x) for x in obj]
        return obj

    return len(orjson.dumps(shrink(body), option=orjson.OPT_SERIALIZE_NUMPY))


def _as_f32(v: Any) -> Any:
    if isinstance(v, list) and v and _NUMBER_TYPES.issuperset(map(type, v)):
        try:
            with np.errstate(over="ignore"):
                return np.asarray(v, dtype=np.float32)
        except OverflowError:  # an integer beyond any float: validation rejects it later
            return v
    if isinstance(v, list):
        return [_as_f32(x) for x in v]
    return v
