"""Moving data between nodes: pure rebalance planning (`plan`), the driver that carries each
move through its stages (`rebalance`), anti-entropy repair between replicas (`repair`), and the
healer that runs hand-offs, repair, self-healing and orphan collection in the background.

May import: model, clock, membership, peers, state, replication."""
