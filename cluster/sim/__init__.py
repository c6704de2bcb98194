"""The scale simulator: the real gossip, cluster-state and placement code at hundreds to
thousands of nodes in one process, over the in-memory network under a manual clock (`core`,
`runs`), the rebalance planner and move schedule at size (`place`), and a search's fan-out at
width from measured per-node latencies (`fanout`). Nothing here re-implements the protocol or
runs in a node: `scripts/simulate.py` and `tests/test_scale_sim.py` use it.

May import: model, clock, membership, peers, state, replication, movement."""
