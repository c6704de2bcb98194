"""The replicated cluster state: collections and their shard maps as last-writer-wins
entries (`entries`), spread by gossip, persisted, and reconciled with this node's storage
(`runtime`); changes made here are published to every member (`publish`).

May import: model, clock, membership, peers."""
