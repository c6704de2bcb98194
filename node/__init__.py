"""aquila.node: one Aquila server process. The HTTP layer, this node's storage, and the
wiring of the cluster layer (`aquila.cluster`, which it may import; never the reverse).

    http         the REST API and the peer routes: parse at the edge, call, serialise
    storage      this node's shards: RocksDB, FAISS, the engine (imports neither http nor app)
    blocking     the one place threads start (FAISS, RocksDB, big bodies)
    cluster_node the cluster service wired to the engine, HTTP peers, UDP gossip and files
    app          make_app(config, clock=, transport=, peers=) and the start and stop order
    importer     the `aquila import` command (a client of the REST API)
    cli, config, keys, files, metrics
"""
