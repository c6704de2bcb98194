"""Shared types and pure math: documents and hits, collection specs, filters, errors,
sharding and placement, versions (hybrid logical clock), anti-entropy digests, the typed
requests the cluster layer carries out, replay memory for signatures, address parsing.

No I/O, no clock, no threads.

May import: nothing from aquila outside this package (numpy and orjson only)."""
