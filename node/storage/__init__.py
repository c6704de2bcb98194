"""This node's storage: the engine (collections on disk), a collection's local part (one
RocksDB store and one FAISS index over its local shards), shards' bookkeeping, searches, and
`EngineBackend`, the `ShardBackend` the cluster layer sees. Blocking calls go through
`node.blocking`.

May import: aquila.cluster.model and clock, and node's blocking and files; not http nor app."""
