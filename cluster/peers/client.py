"""Requests to other nodes' internal routes, as the cluster layer makes them: the client
protocol (answered over HTTP by `peers.Peers`, in one process by `mempeers.MemoryPeers`), the
error for a node that cannot be reached, and the routes' paths."""

from __future__ import annotations

from typing import Any, Protocol

from aquila.cluster.model.errors import Unavailable

STATE_PATH = "/internal/v1/state"
PUSH_PULL_PATH = "/internal/v1/pushpull"
COLLECTION_PREFIX = "/internal/v1/collections/"
# The content type of a binary frame of the peer protocol (`replication.frames`); a raw body
# to any other route than push-pull travels as one, and an answer of this type is one.
FRAME_TYPE = "application/x-aquila-frame"


def collection_path(name: str, op: str) -> str:
    """The internal route of operation `op` on collection `name`."""
    return f"{COLLECTION_PREFIX}{name}/{op}"


class PeerError(Unavailable):
    """A peer could not be reached or did not answer in time: worth trying another replica."""


class PeerClient(Protocol):
    """Failures raise `AquilaError`s: the peer's own, rebuilt from its answer, or PeerError
    (transient) when it could not be reached."""

    async def request(
        self, addr: str, method: str, path: str, body: Any = None, *, to: str | None,
        timeout: float | None = None, raw: bytes | None = None,  # noqa: ASYNC109
        max_answer: int | None = None,
    ) -> Any:
        """JSON `body` (or `raw` bytes: push-pull, a binary frame) to the route `path` of the
        node at `addr`; the decoded answer (bytes when the node answered with bytes). `to` is the node id expected at `addr`, which alone may accept
        the request (None only for a push-pull to a seed whose id is not known yet).
        `max_answer`: the most bytes the request can be answered with (the client's own cap
        otherwise); a longer answer is the node's failure (PeerError)."""
        ...
