"""Who is in the cluster: SWIM gossip with Lifeguard over a packet transport (UDP, or the
in-memory `memnet`), the pure member table and suspicion math, the gossip wire messages and
their authentication, and `MemberView`, the one place that says who is alive and who leads.

May import: model, clock."""
