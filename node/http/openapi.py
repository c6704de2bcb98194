"""The OpenAPI 3 description of the whole public API (served at GET /openapi.json)."""

from __future__ import annotations

from typing import Any

from aquila.cluster.model.bounds import (
    MAX_DELETE_IDS,
    MAX_FILTER_CONDITIONS,
    MAX_FILTER_IN_VALUES,
    MAX_METADATA_DEPTH,
    MAX_NPROBE,
    MAX_QUERIES,
    MAX_QUERY_RESULTS,
    MAX_SEEDS,
    MAX_TIMEOUT_MS,
)
from aquila.cluster.model.errors import ERRORS_BY_CODE

_ERR = {"$ref": "#/components/schemas/Error"}
# Every code an error can carry: the contract's, 405's and that of an unexpected failure.
ERROR_CODES = [*ERRORS_BY_CODE, "method_not_allowed", "internal"]


def _resp(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"application/json": {"schema": schema or {"type": "object"}}}
    return {"description": desc, "content": body}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _resp("error", _ERR) for c in codes}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
}
_DOC = {
    "name": "doc_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
}
_VEC = {"type": "array", "items": {"type": "number"}}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {
                        "type": "string",
                        "enum": ERROR_CODES,
                    },
                    "message": {"type": "string"},
                },
            }
        },
    },
    "CollectionSettings": {
        "type": "object",
        "required": ["dim"],
        "properties": {
            "dim": {"type": "integer", "minimum": 1, "maximum": 65536},
            "metric": {"type": "string", "enum": ["l2", "ip", "cosine"], "default": "l2"},
            "shards": {"type": "integer", "minimum": 1, "maximum": 1024, "default": 8},
            "replication": {"type": "integer", "minimum": 1, "default": 1},
            "index": {
                "type": "object",
                "properties": {
                    "type": {
                        "type": "string",
                        "enum": ["ivf_flat", "ivf_sq8", "ivf_pq", "flat"],
                        "default": "ivf_flat",
                    },
                    "nlist": {
                        "type": ["integer", "null"],
                        "minimum": 1,
                        "description": "null: about 4·√n, chosen per node when its index trains",
                    },
                    "nprobe": {"type": "integer", "minimum": 1, "default": 16},
                },
            },
        },
    },
    "Collection": {
        "allOf": [
            {"$ref": "#/components/schemas/CollectionSettings"},
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "count": {"type": "integer"},
                    "shard_states": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "shard": {"type": "integer"},
                                "replicas": {"type": "array", "items": {"type": "string"}},
                                "count": {"type": "integer"},
                                "index_state": {
                                    "type": "string",
                                    "enum": ["buffering", "training", "trained"],
                                },
                            },
                        },
                    },
                },
            },
        ]
    },
    "Upsert": {
        "type": "object",
        "required": ["documents"],
        "properties": {
            "documents": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["vector"],
                    "properties": {
                        "id": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 256,
                            "description": "a UUID is generated when absent",
                        },
                        "vector": _VEC,
                        "metadata": {
                            "type": "object",
                            "description": f"nested at most {MAX_METADATA_DEPTH} levels deep",
                        },
                    },
                },
            },
            "consistency": {
                "type": "string",
                "enum": ["one", "quorum", "all"],
                "default": "quorum",
            },
        },
    },
    "Search": {
        "type": "object",
        "properties": {
            "vector": _VEC,
            "vectors": {
                "type": "array",
                "items": _VEC,
                "maxItems": MAX_QUERIES,
                "description": f"queries × k at most {MAX_QUERY_RESULTS}",
            },
            "k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
            "nprobe": {"type": "integer", "minimum": 1, "maximum": MAX_NPROBE},
            "filter": {
                "type": "object",
                "description": "{must, should, must_not}: lists of {key, match | in | range}; the k best "
                f"matching documents are returned. At most {MAX_FILTER_CONDITIONS} conditions in "
                f"all, and {MAX_FILTER_IN_VALUES} values in one `in`",
            },
            "include": {
                "type": "array",
                "items": {"type": "string", "enum": ["metadata", "vector"]},
            },
            "allow_partial": {"type": "boolean", "default": True},
            "timeout_ms": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_MS},
            "explain": {
                "type": "boolean", "default": False,
                "description": "answer with `plans`: how each shard was searched",
            },
        },
    },
    "SearchPlan": {
        "type": "object",
        "description": "How one shard was searched. `path`: `unfiltered`; for a filter, "
        "`exact` (few matches: their vectors scored directly), `selector` (many: the index "
        "searched with a bitmap of the matches, its lists widened until they hold as many "
        "matches as an unfiltered search scores vectors), `postfilter` (nearly all: the index "
        "searched unfiltered for `candidates` and the non-matches dropped) or `none` (nothing "
        "matches). `matches` of the shard's `documents` match; `cached`: the filter's match "
        "set was kept from an earlier search; `nprobe`: the most lists a query probed.",
        "properties": {
            "shard": {"type": "integer"},
            "node": {"type": "string"},
            "path": {"type": "string",
                     "enum": ["unfiltered", "exact", "selector", "postfilter", "none"]},
            "matches": {"type": "integer"},
            "documents": {"type": "integer"},
            "cached": {"type": "boolean"},
            "nprobe": {"type": "integer"},
            "nprobe_mean": {"type": "number"},
            "candidates": {"type": "integer"},
        },
    },
    "SearchResult": {
        "type": "object",
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "score": {
                                "type": "number",
                                "description": "squared L2 (smaller is better) for l2; inner product or cosine similarity "
                                "(larger is better)",
                            },
                            "metadata": {"type": "object"},
                            "vector": _VEC,
                        },
                    },
                },
            },
            "partial": {"type": "boolean"},
            "missing_shards": {"type": "array", "items": {"type": "integer"}},
            "took_ms": {"type": "number"},
            "plans": {
                "type": "array", "items": {"$ref": "#/components/schemas/SearchPlan"},
                "description": "with `explain`: one per shard that answered, by shard",
            },
        },
    },
}


def openapi_document() -> dict[str, Any]:
    c = "/v1/collections/{name}"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Aquila",
            "version": "1",
            "description": "Distributed vector database. Every node serves the whole API; "
            "when the node has an API key (or a read key) configured, send "
            "`Authorization: Bearer <key>` on all but /healthz and /readyz; without one, no "
            "key is needed. The read key gives GET routes, search, count and scroll only "
            "(403 `forbidden` otherwise).",
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "Required only when the node has a key configured.",
            }},
        },
        # Bearer, or nothing when the node has no key (an empty requirement is optional).
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/collections": {
                "get": {"summary": "List collections", "responses": {"200": _resp("collections")}}
            },
            c: {
                "put": {
                    "summary": "Create a collection (idempotent)",
                    "parameters": [_NAME],
                    "requestBody": _body("#/components/schemas/CollectionSettings"),
                    "responses": {
                        "201": _resp("created", {"$ref": "#/components/schemas/Collection"}),
                        "200": _resp("exists with the same settings"),
                        **_errors(400, 401, 409),
                    },
                },
                "get": {
                    "summary": "Describe a collection",
                    "parameters": [_NAME],
                    "responses": {
                        "200": _resp("description", {"$ref": "#/components/schemas/Collection"}),
                        **_errors(401, 404),
                    },
                },
                "delete": {
                    "summary": "Delete a collection and its files",
                    "parameters": [_NAME],
                    "responses": {"200": _resp("deleted"), **_errors(401, 404)},
                },
            },
            c + "/documents": {
                "post": {
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
                        "200": _resp("ids and count"),
                        **_errors(400, 401, 404, 413, 503),
                    },
                }
            },
            c + "/documents/delete": {
                "post": {
                    "summary": f"Delete a batch of ids (at most {MAX_DELETE_IDS})",
                    "parameters": [_NAME],
                    "responses": {"200": _resp("{deleted: n}"), **_errors(400, 401, 404, 503)},
                }
            },
            c + "/documents/{doc_id}": {
                "get": {
                    "summary": "Get a document",
                    "parameters": [
                        _NAME,
                        _DOC,
                        {"name": "vector", "in": "query", "schema": {"type": "boolean"}},
                    ],
                    "responses": {"200": _resp("document"), **_errors(400, 401, 404)},
                },
                "delete": {
                    "summary": "Delete a document",
                    "parameters": [_NAME, _DOC],
                    "responses": {"200": _resp("{deleted: 1}"), **_errors(401, 404)},
                },
            },
            c + "/search": {
                "post": {
                    "summary": "k nearest documents for each query vector",
                    "parameters": [_NAME],
                    "requestBody": _body("#/components/schemas/Search"),
                    "responses": {
                        "200": _resp("results", {"$ref": "#/components/schemas/SearchResult"}),
                        **_errors(400, 401, 404, 413, 503),
                    },
                }
            },
            "/v1/cluster": {
                "get": {
                    "summary": "This node and the members it sees",
                    "responses": {"200": _resp("members")},
                }
            },
            "/v1/cluster/shards": {
                "get": {
                    "summary": "Shard map with moves in progress",
                    "responses": {"200": _resp("shard map")},
                }
            },
            "/v1/cluster/join": {
                "post": {
                    "summary": "Join this node to the seeds' cluster",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["seeds"],
                            "properties": {"seeds": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": MAX_SEEDS,
                                "items": {"type": "string", "description": "host:port"},
                            }},
                        }}},
                    },
                    "responses": {"200": _resp("joined"), **_errors(400, 503)},
                }
            },
            "/v1/cluster/leave": {
                "post": {
                    "summary": "Hand this node's shards away, then leave",
                    "responses": {"200": _resp("left"), **_errors(503)},
                }
            },
            "/v1/cluster/rebalance": {
                "post": {
                    "summary": "Plan (dry_run) or start a rebalance",
                    "requestBody": {
                        "content": {"application/json": {"schema": {
                            "type": "object",
                            "properties": {"dry_run": {"type": "boolean", "default": False}},
                        }}},
                    },
                    "responses": {"200": _resp("moves"), **_errors(400, 503)},
                }
            },
            "/healthz": {
                "get": {"summary": "Liveness", "security": [], "responses": {"200": _resp("ok")}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness",
                    "security": [],
                    "responses": {"200": _resp("ready"), **_errors(503)},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition format"}},
                }
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": _resp("OpenAPI")}}
            },
        },
    }
