"""The data path: the replica seam (`replica`: this node's copies or a peer's, chosen by one
lookup), the replica protocol on the wire (`remote`), the storage protocol the node implements
(`backend`) and its in-memory twin (`membackend`), the write path with hinted hand-off, the
read path with fan-out and merge, and the collections' lifecycle.

May import: model, clock, membership, peers, state."""
