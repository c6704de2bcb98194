"""Shared types and pure math: documents and hits, collection specs, filters, errors,
sharding and placement, versions (hybrid logical clock), anti-entropy digests, the typed
requests the cluster layer carries out, replay memory for signatures, address parsing, and
the id of the client request a piece of work serves (`request_id`, a contextvar).

No I/O, no clock, no threads.

May import: nothing from aquila outside this package (numpy and orjson only)."""
