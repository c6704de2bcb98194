"""The HTTP layer: public routes (`api`, `cluster_api`), peer routes (`internal_api`), access
control, the OpenAPI document, and parsing bodies into the cluster layer's typed requests
(`parse`, `fastparse`). Handlers parse, call the cluster service, serialise; no logic.

May import: aquila.cluster, and node's config, keys, blocking and metrics; not storage."""
