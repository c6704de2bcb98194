"""aquila.cluster: everything about being many nodes: membership, the replicated cluster
state, the data path across replicas, data movement, and the shared model they speak.

Layers, lowest first; a package imports only from the ones before it (tests/test_layers.py
checks this), and nothing here imports `aquila.node`:

    model        shared types and pure math: documents, specs, filters, errors, sharding,
                 placement, versions (hlc), digests, typed requests
    clock        where time comes from (one module: SystemClock, ManualClock)
    membership   who is in the cluster: SWIM gossip, the member table, the member view
    peers        requests between nodes: the client protocol, HTTP, signatures, the twin
    state        the replicated cluster state: collections and shard maps, reconciliation
    replication  the data path: the replica seam, writes, reads, fan-out, collections
    movement     moving data: rebalance plans and their driver, self-healing, repair
    service      one node's cluster side assembled from all of the above
    admin        the `aquila` admin commands (model only: they talk HTTP to a node)
    sim          the scale simulator (every layer below service; nothing imports it)
"""
