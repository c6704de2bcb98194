"""The OpenAPI 3.1 description of the whole public API (served at GET /openapi.json), as
strict as the server: every pattern, bound, enum and required field the server enforces, the
fields it refuses when unknown, each error status a route can answer, and the security that
this node's configuration asks for (none without a key; a bearer key with one). A schema-driven
fuzzer (tests/test_fuzz_openapi.py) holds the two to each other.
"""

from __future__ import annotations

from typing import Any

from aquila.cluster.model.bounds import (
    MAX_ANSWER_FLOATS,
    MAX_DELETE_IDS,
    MAX_DOCUMENT_METADATA,
    MAX_FILTER_CONDITIONS,
    MAX_FILTER_IN_VALUES,
    MAX_METADATA_DEPTH,
    MAX_NPROBE,
    MAX_QUERIES,
    MAX_QUERY_RESULTS,
    MAX_SEEDS,
    MAX_TIMEOUT_MS,
    MAX_VECTOR_VALUE,
)
from aquila.cluster.model.cursor import MAX_CURSOR_CHARS
from aquila.cluster.model.errors import ERRORS_BY_CODE
from aquila.cluster.model.operations import CONSISTENCY, MAX_ID_CHARS, MAX_K, MAX_SCROLL_LIMIT
from aquila.cluster.model.recall import MAX_RECALL, MIN_RECALL
from aquila.cluster.model.spec import INDEX_TYPES, MAX_DIM, MAX_REPLICATION, MAX_SHARDS, METRICS
from aquila.node.config import NodeConfig
from aquila.node.http.access import OPEN_ROUTES, is_read

_ERR = {"$ref": "#/components/schemas/Error"}
# Every code an error can carry: the contract's, 405's and that of an unexpected failure.
ERROR_CODES = [*ERRORS_BY_CODE, "method_not_allowed", "internal"]
NAME_PATTERN = "^[A-Za-z0-9_-]{1,64}$"
# Standard base64 with its padding, as the columnar upsert decodes it (strictly).
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# A collection's settings that the server bounds (spec.py's nlist and nprobe).
MAX_INDEX_PARAM = 1 << 20

# What each error status means; the routes list the statuses they can answer.
_ERROR_TEXT = {
    400: "bad_request, dimension_mismatch or invalid_vector: malformed JSON, a missing, "
         "unknown or wrong field, a name or id outside its pattern; nothing was changed",
    401: "unauthorized: no key or a wrong one (Authorization: Bearer <key>)",
    403: "forbidden: the read key may not do this",
    404: "not_found: no such collection or document",
    409: "already_exists: the collection exists with other settings",
    413: "payload_too_large: the body is over the node's limit (counted decompressed)",
    503: "unavailable: too few live replicas for the consistency asked, shards missing with "
         "allow_partial false, or the node is not ready; a retry may help",
}


def _resp(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"application/json": {"schema": schema or {"type": "object"}}}
    return {"description": desc, "content": body}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _resp(_ERROR_TEXT.get(c, "error"), _ERR) for c in codes}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], closed: bool = False, extra: dict[str, Any] | None = None,
         **props: Any) -> dict[str, Any]:
    """An object schema; `closed`: the server refuses fields it does not know. `extra`:
    properties whose names are Python keywords (from, in)."""
    out: dict[str, Any] = {"type": "object", "required": required,
                           "properties": {**props, **(extra or {})}}
    if closed:
        out["additionalProperties"] = False
    return out


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "a collection name",
    "schema": {"type": "string", "pattern": NAME_PATTERN},
}
_DOC = {
    "name": "doc_id",
    "in": "path",
    "required": True,
    "description": "a document id (percent-encoded)",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
}
_INT = {"type": "integer", "minimum": 0}
_VEC = {"type": "array",
        "items": {"type": "number", "minimum": -MAX_VECTOR_VALUE, "maximum": MAX_VECTOR_VALUE},
        "minItems": 1, "maxItems": MAX_DIM,
        "description": "as many numbers as the collection's dim (float32; NaN, Inf and values "
                       f"beyond ±{MAX_VECTOR_VALUE:g} are refused)"}
_SCALAR = {"type": ["string", "number", "boolean", "null"]}
_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}
_CONSISTENCY = {"type": "string", "enum": list(CONSISTENCY), "default": "quorum"}

_COND_KEY = {"type": "string", "minLength": 1, "description": "a dotted path into the metadata"}

_SCHEMAS: dict[str, Any] = {
    "Error": _obj(["error"], error=_obj(
        ["code", "message"],
        code={"type": "string", "enum": ERROR_CODES},
        message={"type": "string"},
    )),
    "IndexSettings": {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "enum": list(INDEX_TYPES), "default": "ivf_flat"},
            "nlist": {
                "type": ["integer", "null"], "minimum": 1, "maximum": MAX_INDEX_PARAM,
                "description": "null: about 4·√n, chosen per node when its index trains",
            },
            "nprobe": {"type": "integer", "minimum": 1, "maximum": MAX_INDEX_PARAM,
                       "default": 16},
        },
    },
    "CollectionSettings": {
        **_obj(
            ["dim"], closed=True,
            dim={"type": "integer", "minimum": 1, "maximum": MAX_DIM},
            metric={"type": "string", "enum": list(METRICS), "default": "l2"},
            shards={"type": "integer", "minimum": 1, "maximum": MAX_SHARDS, "default": 8},
            replication={"type": "integer", "minimum": 1, "maximum": MAX_REPLICATION,
                         "default": 1},
            index=_ref("IndexSettings"),
            name={"description": "ignored: the path names the collection"},
        ),
        "description": "ivf_pq needs a dim with a divisor from 2 to 64",
    },
    "Collection": _obj(
        ["name", "dim", "metric", "shards", "replication", "index", "count", "shard_states"],
        name={"type": "string", "pattern": NAME_PATTERN},
        dim={"type": "integer", "minimum": 1, "maximum": MAX_DIM},
        metric={"type": "string", "enum": list(METRICS)},
        shards={"type": "integer", "minimum": 1, "maximum": MAX_SHARDS},
        replication={"type": "integer", "minimum": 1, "maximum": MAX_REPLICATION},
        index=_obj(["type", "nlist", "nprobe"],
                   type={"type": "string", "enum": list(INDEX_TYPES)},
                   nlist={"type": ["integer", "null"]},
                   nprobe={"type": "integer"}),
        count=_INT,
        shard_states={"type": "array", "items": _obj(
            ["shard", "replicas", "count", "index_state"],
            shard=_INT,
            replicas={"type": "array", "items": {"type": "string"}},
            count=_INT,
            index_state={"type": "string", "enum": ["buffering", "training", "trained"]},
            index=_obj(["nlist", "vectors", "trained_at", "nlist_target", "retrain_at",
                        "recall_curve"],
                       nlist=_INT, vectors=_INT, trained_at=_INT, nlist_target=_INT,
                       retrain_at=_INT,
                       recall_curve={"type": "array", "description": "[nprobe, recall@10] "
                                     "measured when the index was trained; a search by "
                                     "`recall` takes the first nprobe that reached it",
                                     "items": {"type": "array", "items": {"type": "number"}}}),
        )},
    ),
    "Upsert": {
        "description": "a batch as documents, or columnar (ids, vectors in base64, metadata)",
        "oneOf": [_ref("UpsertDocuments"), _ref("UpsertColumnar")],
    },
    "UpsertColumnar": _obj(
        ["vectors_b64"], closed=True,
        ids={"type": "array", "items": _ID, "minItems": 1,
             "description": "one per row; UUIDs are generated when absent"},
        vectors_b64={"type": "string", "pattern": BASE64_PATTERN,
                     "description": "base64 of little-endian float32, len(ids) × dim"},
        metadata={"type": ["array", "null"], "items": {"type": ["object", "null"]},
                  "description": "one object (or null) per id, nested at most "
                                 f"{MAX_METADATA_DEPTH} levels deep, each at most "
                                 f"{MAX_DOCUMENT_METADATA:,} bytes minified"},
        consistency=_CONSISTENCY,
    ),
    "UpsertDocuments": _obj(
        ["documents"], closed=True,
        documents={
            "type": "array",
            "minItems": 1,
            "items": _obj(
                ["vector"], closed=True,
                id={**_ID, "type": ["string", "null"],
                    "description": "a UUID is generated when absent or null"},
                vector=_VEC,
                metadata={"type": ["object", "null"],
                          "description": f"nested at most {MAX_METADATA_DEPTH} levels deep, "
                                         f"at most {MAX_DOCUMENT_METADATA:,} bytes minified"},
            ),
        },
        consistency=_CONSISTENCY,
    ),
    "DeleteIds": _obj(
        ["ids"], closed=True,
        ids={"type": "array", "items": _ID, "maxItems": MAX_DELETE_IDS},
        consistency=_CONSISTENCY,
    ),
    "Condition": {
        "oneOf": [
            _obj(["key", "match"], closed=True, key=_COND_KEY, match=_SCALAR),
            _obj(["key", "in"], closed=True, key=_COND_KEY,
                 extra={"in": {"type": "array", "items": _SCALAR,
                               "maxItems": MAX_FILTER_IN_VALUES}}),
            _obj(["key", "range"], closed=True, key=_COND_KEY, range={
                "type": "object", "minProperties": 1, "additionalProperties": False,
                "properties": {op: {"type": "number"} for op in ("gte", "gt", "lte", "lt")},
            }),
        ],
    },
    "Filter": {
        "type": ["object", "null"],
        "additionalProperties": False,
        "description": f"The k best documents that match are returned. At most "
                       f"{MAX_FILTER_CONDITIONS} conditions in all clauses together.",
        "properties": {
            clause: {"type": "array", "items": _ref("Condition"),
                     "maxItems": MAX_FILTER_CONDITIONS}
            for clause in ("must", "should", "must_not")
        },
    },
    "Search": {
        **_obj(
            [], closed=True,
            vector=_VEC,
            vectors={"type": "array", "items": _VEC, "minItems": 1, "maxItems": MAX_QUERIES,
                     "description": f"queries × k at most {MAX_QUERY_RESULTS}; with 'vector' "
                     f"in include, queries × k × dim at most {MAX_ANSWER_FLOATS}"},
            id={**_ID, "description": "a stored document: its vector is the query, and it is "
                "left out of its own results"},
            ids={"type": "array", "items": _ID, "minItems": 1, "maxItems": MAX_QUERIES,
                 "description": "stored documents, one query each (as id)"},
            k={"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
            nprobe={"type": ["integer", "null"], "minimum": 1, "maximum": MAX_NPROBE},
            recall={"type": ["number", "null"], "minimum": MIN_RECALL, "maximum": MAX_RECALL,
                    "description": "in place of nprobe: each node searches with the fewest "
                    "probes that reached this recall@10 when it calibrated its index"},
            filter=_ref("Filter"),
            include={"type": "array", "items": {"type": "string",
                                                "enum": ["metadata", "vector"]},
                     "default": ["metadata"]},
            allow_partial={"type": "boolean", "default": True},
            timeout_ms={"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TIMEOUT_MS},
            explain={"type": "boolean", "default": False,
                     "description": "answer with `plans`: how each shard was searched"},
        ),
        "description": "exactly one of vector (one query), vectors, id or ids",
        "oneOf": [{"required": [q]} for q in ("vector", "vectors", "id", "ids")],
    },
    "Hit": _obj(
        ["id", "score"],
        id={"type": "string"},
        score={"type": "number", "description": "squared L2 (smaller is better) for l2; "
               "inner product or cosine similarity (larger is better)"},
        metadata={"type": "object"},
        vector={"type": "array", "items": {"type": "number"}},
    ),
    "SearchPlan": {
        **_obj(
            ["shard", "path"],
            shard=_INT,
            node={"type": "string"},
            path={"type": "string",
                  "enum": ["unfiltered", "exact", "selector", "postfilter", "none"]},
            matches=_INT, documents=_INT, cached={"type": "boolean"},
            nprobe=_INT, nprobe_mean={"type": "number", "minimum": 0}, candidates=_INT,
        ),
        "description": "How one shard was searched. `path`: `unfiltered`; for a filter, "
        "`exact` (few matches: their vectors scored directly), `selector` (many: the index "
        "searched with a bitmap of the matches, its lists widened until they hold as many "
        "matches as an unfiltered search scores vectors), `postfilter` (nearly all: the "
        "index searched unfiltered for `candidates` and the non-matches dropped) or `none` "
        "(nothing matches). `matches` of the shard's `documents` match; `cached`: the "
        "filter's match set was kept from an earlier search; `nprobe`: the most lists a "
        "query probed.",
    },
    "SearchResult": _obj(
        ["results", "partial", "missing_shards", "took_ms"],
        results={"type": "array", "items": {"type": "array", "items": _ref("Hit")},
                 "description": "one list per query, best first"},
        partial={"type": "boolean"},
        missing_shards={"type": "array", "items": _INT},
        took_ms={"type": "number", "minimum": 0},
        plans={"type": "array", "items": _ref("SearchPlan"),
               "description": "with `explain`: one per shard that answered, by shard"},
        nprobe={**_INT, "description": "with `recall`: the most probes a node used"},
        nprobes={"type": "array", "description": "with `recall`: the probes used per shard",
                 "items": _obj(["shard", "node", "nprobe"], shard=_INT,
                               node={"type": "string"}, nprobe=_INT)},
    ),
    "Count": {
        **_obj([], closed=True, filter=_ref("Filter"),
               allow_partial={"type": "boolean", "default": True},
               timeout_ms={"type": ["integer", "null"], "minimum": 1,
                           "maximum": MAX_TIMEOUT_MS}),
        "type": ["object", "null"],
        "description": "no body (or null) counts every document",
    },
    "CountResult": _obj(
        ["count", "partial", "missing_shards"],
        count=_INT, partial={"type": "boolean"},
        missing_shards={"type": "array", "items": _INT},
    ),
    "Scroll": {
        **_obj([], closed=True, filter=_ref("Filter"),
               limit={"type": "integer", "minimum": 1, "maximum": MAX_SCROLL_LIMIT,
                      "default": 100},
               cursor={"type": ["string", "null"], "minLength": 1,
                       "maxLength": MAX_CURSOR_CHARS,
                       "description": "next_cursor as a page answered it; null: the start"},
               include={"type": "array", "items": {"type": "string",
                                                   "enum": ["metadata", "vector"]},
                        "default": ["metadata"]},
               allow_partial={"type": "boolean", "default": False},
               timeout_ms={"type": ["integer", "null"], "minimum": 1,
                           "maximum": MAX_TIMEOUT_MS}),
        "type": ["object", "null"],
        "description": "following the cursors from null to null returns every document that "
                       "existed for the whole scroll exactly once",
    },
    "ScrollPage": _obj(
        ["documents", "next_cursor", "partial", "missing_shards"],
        documents={"type": "array", "items": _obj(
            ["id"], id={"type": "string"},
            metadata={"type": "object", "description": "when include has metadata"},
            vector={"type": "array", "items": {"type": "number"},
                    "description": "when include has vector"})},
        next_cursor={"type": ["string", "null"]},
        partial={"type": "boolean"},
        missing_shards={"type": "array", "items": _INT},
    ),
    "Document": _obj(
        ["id", "metadata"],
        id={"type": "string"},
        metadata={"type": "object"},
        vector={"type": "array", "items": {"type": "number"}},
    ),
    "Member": _obj(
        ["id", "addr", "state", "incarnation"],
        id={"type": "string"},
        addr={"type": "string"},
        state={"type": "string", "enum": ["alive", "suspect", "dead", "left"]},
        incarnation=_INT,
    ),
    "Move": _obj(
        ["collection", "shard", "from", "to"],
        collection={"type": "string"}, shard=_INT,
        extra={"from": {"type": ["string", "null"], "description": "null: a new replica"}},
        to={"type": "string"},
    ),
}

_CLUSTER = _obj(
    ["node", "epoch", "members"],
    node=_obj(["id", "addr"], id={"type": "string"}, addr={"type": "string"}),
    epoch=_INT,
    members={"type": "array", "items": _ref("Member")},
)
_SHARDS = _obj(
    ["epoch", "collections"],
    epoch=_INT,
    collections={"type": "object", "additionalProperties": {"type": "array", "items": _obj(
        ["shard", "replicas", "moving"],
        shard=_INT,
        replicas={"type": "array", "items": {"type": "string"}},
        moving={"oneOf": [{"type": "null"}, _obj(
            ["from", "to", "progress"],
            extra={"from": {"type": ["string", "null"]}},
            to={"type": "string"},
            progress={"type": "number", "minimum": 0, "maximum": 1},
        )]},
    )}},
)
_MOVES = _obj(["moves"], moves={"type": "array", "items": _ref("Move")})


def _text(desc: str, media: str) -> dict[str, Any]:
    return {"description": desc, "content": {media: {"schema": {"type": "string"}}}}


def _link(op: str, **params: str) -> dict[str, Any]:
    return {"operationId": op, "parameters": {f"path.{k}": v for k, v in params.items()}}


# From a collection to its documents and searches (fuzzers follow these, as clients do).
_FROM_COLLECTION = {
    "GetCollection": _link("getCollection", name="$request.path.name"),
    "Upsert": _link("upsert", name="$request.path.name"),
    "Search": _link("search", name="$request.path.name"),
    "Count": _link("count", name="$request.path.name"),
    "Scroll": _link("scroll", name="$request.path.name"),
}
_FROM_UPSERT = {
    "GetDocument": _link("getDocument", name="$request.path.name",
                         doc_id="$response.body#/ids/0"),
    "DeleteDocument": _link("deleteDocument", name="$request.path.name",
                            doc_id="$response.body#/ids/0"),
    "SearchByStoredId": {
        **_link("search", name="$request.path.name"),
        "requestBody": {"id": "$response.body#/ids/0", "k": 5},
    },
    "Count": _link("count", name="$request.path.name"),
    "Scroll": _link("scroll", name="$request.path.name"),
}


def _get_document(params: tuple[dict[str, Any], ...] = (_NAME, _DOC),
                  suffix: str = "") -> dict[str, Any]:
    return {
        "operationId": "getDocument" + suffix,
        "summary": "Get a document",
        "parameters": [
            *params,
            {"name": "vector", "in": "query", "description": "true: add the vector",
             "schema": {"type": "string",
                        "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0)$"}},
        ],
        "responses": {"200": _resp("document", _ref("Document")), **_errors(400, 404, 503)},
    }


def _delete_document(params: tuple[dict[str, Any], ...] = (_NAME, _DOC),
                     suffix: str = "") -> dict[str, Any]:
    return {
        "operationId": "deleteDocument" + suffix,
        "summary": "Delete a document",
        "parameters": list(params),
        "responses": {"200": _resp("deleted", _obj(["deleted"], deleted={"const": 1})),
                      **_errors(400, 404, 503)},
    }


def _paths() -> dict[str, Any]:
    c = "/v1/collections/{name}"
    return {
        "/v1/collections": {
            "get": {"operationId": "listCollections", "summary": "List collections",
                    "responses": {"200": _resp("collections", _obj(
                        ["collections"],
                        collections={"type": "array", "items": _ref("Collection")}))}},
        },
        c: {
            "put": {
                "operationId": "createCollection",
                "summary": "Create a collection (idempotent)",
                "parameters": [_NAME],
                "requestBody": _body("#/components/schemas/CollectionSettings"),
                "responses": {
                    "201": {**_resp("created", _ref("Collection")), "links": _FROM_COLLECTION},
                    "200": {**_resp("exists with the same settings", _ref("Collection")),
                            "links": _FROM_COLLECTION},
                    **_errors(400, 409, 503),
                },
            },
            "get": {
                "operationId": "getCollection",
                "summary": "Describe a collection",
                "parameters": [_NAME],
                "responses": {"200": _resp("description", _ref("Collection")),
                              **_errors(400, 404)},
            },
            "delete": {
                "operationId": "deleteCollection",
                "summary": "Delete a collection and its files",
                "parameters": [_NAME],
                "responses": {"200": _resp("deleted", _obj(["deleted"],
                                                           deleted={"const": True})),
                              **_errors(400, 404, 503)},
            },
        },
        c + "/documents": {
            "post": {
                "operationId": "upsert",
                "summary": "Upsert a batch; answered once durable per consistency",
                "description": (
                    "An existing id is replaced. The body limit (64 MiB by default, "
                    "AQUILA_MAX_BODY_BYTES) counts vectors at float32 precision, so a batch "
                    "of 10,000 documents of dim 384 fits however the client writes its "
                    "floats; a body over twice the limit is refused unread (413)."
                ),
                "parameters": [_NAME],
                "requestBody": _body("#/components/schemas/Upsert"),
                "responses": {
                    "200": {**_resp("ids and count", _obj(
                        ["ids", "upserted"], ids={"type": "array", "items": _ID},
                        upserted=_INT)), "links": _FROM_UPSERT},
                    **_errors(400, 404, 503),
                },
            }
        },
        c + "/documents/delete": {
            # This path is also the document whose id is "delete", which GET and DELETE name
            # as they do any other (the server answers them: its Allow header lists them).
            "get": {**_get_document((_NAME,), "NamedDelete"),
                    "summary": "Get the document whose id is 'delete'"},
            "delete": {**_delete_document((_NAME,), "NamedDelete"),
                       "summary": "Delete the document whose id is 'delete'"},
            "post": {
                "operationId": "deleteDocuments",
                "summary": f"Delete a batch of ids (at most {MAX_DELETE_IDS})",
                "parameters": [_NAME],
                "requestBody": _body("#/components/schemas/DeleteIds"),
                "responses": {"200": _resp("live documents deleted",
                                           _obj(["deleted"], deleted=_INT)),
                              **_errors(400, 404, 503)},
            }
        },
        c + "/documents/{doc_id}": {"get": _get_document(), "delete": _delete_document()},
        c + "/search": {
            "post": {
                "operationId": "search",
                "summary": "k nearest documents for each query (a vector or a stored document)",
                "parameters": [_NAME],
                "requestBody": _body("#/components/schemas/Search"),
                "responses": {"200": _resp("results", _ref("SearchResult")),
                              **_errors(400, 404, 503)},
            }
        },
        c + "/count": {
            "post": {
                "operationId": "count",
                "summary": "Count the documents (that match a filter)",
                "parameters": [_NAME],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": _ref("Count")}}},
                "responses": {"200": _resp("count", _ref("CountResult")),
                              **_errors(400, 404, 503)},
            }
        },
        c + "/scroll": {
            "post": {
                "operationId": "scroll",
                "summary": "A page of documents (that match a filter), and the cursor of the next",
                "parameters": [_NAME],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": _ref("Scroll")}}},
                "responses": {"200": _resp("page", _ref("ScrollPage")),
                              **_errors(400, 404, 503)},
            }
        },
        "/v1/cluster": {
            "get": {"operationId": "cluster", "summary": "This node and the members it sees",
                    "responses": {"200": _resp("members", _CLUSTER)}},
        },
        "/v1/cluster/shards": {
            "get": {"operationId": "shards", "summary": "Shard map with moves in progress",
                    "responses": {"200": _resp("shard map", _SHARDS)}},
        },
        "/v1/cluster/join": {
            "post": {
                "operationId": "join",
                "summary": "Join this node to the seeds' cluster",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _obj(["seeds"], closed=True, seeds={
                        "type": "array", "minItems": 1, "maxItems": MAX_SEEDS,
                        "items": {"type": "string", "description": "host:port"},
                    }),
                }}},
                "responses": {"200": _resp("joined", _obj(["joined", "members"],
                                                          joined=_INT, members=_INT)),
                              **_errors(400, 503)},
            }
        },
        "/v1/cluster/leave": {
            "post": {"operationId": "leave",
                     "summary": "Hand this node's shards away, then leave",
                     "responses": {"200": _resp("left", _obj(
                         ["moves", "left"], moves=_MOVES["properties"]["moves"],
                         left={"const": True})), **_errors(503)}},
        },
        "/v1/cluster/rebalance": {
            "post": {
                "operationId": "rebalance",
                "summary": "Plan (dry_run) or start a rebalance",
                "requestBody": {"content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"dry_run": {"type": "boolean", "default": False}},
                }}}},
                "responses": {"200": _resp("moves", _MOVES), **_errors(400, 503)},
            }
        },
        "/healthz": {
            "get": {"operationId": "healthz", "summary": "Liveness",
                    "responses": {"200": _resp("ok", _obj(["status"],
                                                          status={"const": "ok"}))}},
        },
        "/readyz": {
            "get": {"operationId": "readyz", "summary": "Readiness",
                    "responses": {"200": _resp("ready", _obj(["status"],
                                                             status={"const": "ready"})),
                                  **_errors(503)}},
        },
        "/metrics": {
            "get": {"operationId": "metrics", "summary": "Prometheus metrics",
                    "responses": {"200": _text("text exposition format", "text/plain")}},
        },
        "/openapi.json": {
            "get": {"operationId": "openapi", "summary": "This document",
                    "responses": {"200": _resp("OpenAPI", _obj(["openapi", "paths"]))}},
        },
        "/": {
            "get": {"operationId": "home", "summary": "Redirects to the dashboard (/ui)",
                    "responses": {"302": {"description": "to the dashboard", "headers": {
                        "Location": {"schema": {"type": "string", "const": "/ui"}}}}}},
        },
        "/ui": {
            "get": {"operationId": "dashboard",
                    "summary": "The dashboard (a web page; it asks for the key itself)",
                    "responses": {"200": _text("the page", "text/html")}},
        },
        "/ui/{file}": {
            "get": {
                "operationId": "dashboardFile",
                "summary": "The dashboard's script and style sheet",
                "parameters": [{"name": "file", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "the file", "content": {
                        m: {"schema": {"type": "string"}}
                        for m in ("text/javascript", "text/css", "text/html")}},
                    **_errors(404),
                },
            },
        },
    }


def _apply_access(paths: dict[str, Any], config: NodeConfig) -> None:
    """Per route, the security and the error statuses the node's keys and body limit add."""
    keyed = bool(config.api_key or config.read_key)
    for path, ops in paths.items():
        for method, op in ops.items():
            responses = op["responses"]
            extra: list[int] = []
            if method not in ("get", "delete"):
                extra.append(413)
            if keyed and (method.upper(), path) in OPEN_ROUTES:
                op["security"] = []
            elif keyed:
                extra.append(401)
                if config.read_key and not is_read(method.upper(), path):
                    extra.append(403)
            for code in extra:
                responses.setdefault(str(code), _errors(code)[str(code)])


def openapi_document(config: NodeConfig | None = None) -> dict[str, Any]:
    """The description of this node's API; `config` decides its security (none: no key)."""
    config = config or NodeConfig()
    paths = _paths()
    _apply_access(paths, config)
    keyed = bool(config.api_key or config.read_key)
    access = (
        "This node has a key configured: send `Authorization: Bearer <key>` on every request "
        "but /healthz, /readyz and the dashboard (/ui). The read key, when configured, gives "
        "the GET routes, search, count and scroll only (403 `forbidden` otherwise)."
        if keyed else
        "This node has no key configured: no request needs one."
    )
    components: dict[str, Any] = {"schemas": _SCHEMAS}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Aquila",
            "version": "1",
            "description": "Distributed vector database. Every node serves the whole API. "
            + access + " Errors are `{\"error\": {\"code\", \"message\"}}`; a rejected request "
            "changes nothing. Any request with a body over the node's limit is answered 413.",
        },
        "components": components,
        "paths": paths,
    }
    if keyed:
        components["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "The node's API key, or its read key for reads.",
        }}
        doc["security"] = [{"bearer": []}]
    return doc
