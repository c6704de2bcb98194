"""Requests between nodes: the `PeerClient` protocol and the internal routes' paths, the
HTTP client, the channel per peer for the binary frames (`channel`, its messages in `wire`),
request signatures (sender, recipient, time, nonce), and the in-process twin that carries
requests between nodes of one process over `membership.memnet`.

May import: model, clock, membership."""
