"""Authentication of peer requests (`/internal/*`) with the cluster secret.

A signed request carries six headers: the sender's node id, the recipient's (`*` for a
push-pull, sent to a seed address before its id is known), the time it was signed (Unix
milliseconds), a random nonce, the SHA-256 of its body, and an HMAC-SHA256 over all of
these plus the method and the path with its query string. A request addressed to another
node is refused, so a request captured on its way to one node cannot be replayed to another
(whose replay memory has not seen it). Because the body's hash is in
a signed header, the receiver authenticates a request *before* reading its body: it checks
that every header is present and well formed, the HMAC, and the timestamp's freshness and
the nonce's novelty (`replay.ReplayGuard`: a captured request replayed is refused). Only
then does it read the body (at most its size limit) and compare its hash. `Peers` signs
(`PeerSigner`); node/http/internal_api.py checks (`PeerVerifier`). Without a secret (a
development node on loopback) nothing is signed and everything is accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aquila.cluster.model.replay import NotFresh, ReplayGuard

SENDER_HEADER = "X-Aquila-Peer"
RECIPIENT_HEADER = "X-Aquila-Peer-To"
ANY_RECIPIENT = "*"
TIME_HEADER = "X-Aquila-Peer-Time"
NONCE_HEADER = "X-Aquila-Peer-Nonce"
BODY_HEADER = "X-Aquila-Peer-Body"
SIGNATURE_HEADER = "X-Aquila-Peer-Signature"

# Exact formats (fullmatch): the sender is a percent-encoded node id, so the signed text
# has no separator in it; the rest are digits and lower-case hex of fixed length.
_FORMATS = {
    SENDER_HEADER: re.compile(r"[A-Za-z0-9._~%-]{1,768}"),
    RECIPIENT_HEADER: re.compile(r"[A-Za-z0-9._~%-]{1,768}|\*"),
    TIME_HEADER: re.compile(r"[0-9]{1,15}"),
    NONCE_HEADER: re.compile(r"[0-9a-f]{32}"),
    BODY_HEADER: re.compile(r"[0-9a-f]{64}"),
    SIGNATURE_HEADER: re.compile(r"[0-9a-f]{64}"),
}


class PeerAuthError(Exception):
    """A peer request that is not authentic (the message says why)."""


def derive_key(secret: str | None) -> bytes | None:
    """The request MAC key, domain-separated from gossip's key of the same secret."""
    if not secret:
        return None
    return hmac.new(secret.encode(), b"aquila-peer-http-v2", hashlib.sha256).digest()


def _signed_text(fields: dict[str, str], method: str, path: str) -> bytes:
    # Fields joined by newlines, which none of them can contain (see _FORMATS; a request
    # line's method and path cannot either).
    return "\n".join(
        ("aquila-peer-v2", method.upper(), path,
         *(fields[name] for name in _FORMATS if name != SIGNATURE_HEADER))
    ).encode()


def _mac(key: bytes, text: bytes) -> str:
    return hmac.new(key, text, hashlib.sha256).hexdigest()


class PeerSigner:
    """Signs this node's requests to its peers."""

    def __init__(
        self, secret: str | None, sender: str, wall: Callable[[], float] = time.time
    ) -> None:
        self._key = derive_key(secret)
        self._sender = urllib.parse.quote(sender, safe="")
        self._wall = wall

    def headers(
        self, method: str, path: str, body: bytes, recipient: str | None
    ) -> dict[str, str]:
        """The signature headers of a request to node `recipient` (None: whoever answers at
        the address, for push-pull only); `path` exactly as it goes on the request line
        (query string included). Empty without a secret."""
        if self._key is None:
            return {}
        fields = {
            SENDER_HEADER: self._sender,
            RECIPIENT_HEADER: ANY_RECIPIENT if recipient is None
            else urllib.parse.quote(recipient, safe=""),
            TIME_HEADER: str(int(self._wall() * 1000)),
            NONCE_HEADER: os.urandom(16).hex(),
            BODY_HEADER: hashlib.sha256(body).hexdigest(),
        }
        fields[SIGNATURE_HEADER] = _mac(self._key, _signed_text(fields, method, path))
        return fields


@dataclass(frozen=True)
class Signed:
    """What an authenticated request's headers vouch for."""

    sender: str
    body_hash: str


class PeerVerifier:
    """Checks peer requests; holds the replay memory of one node."""

    def __init__(
        self,
        secret: str | None,
        wall: Callable[[], float] = time.time,
        guard: ReplayGuard | None = None,
    ) -> None:
        self.secret = secret
        self._key = derive_key(secret)
        self._wall = wall
        self._guard = guard or ReplayGuard()

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def check_headers(
        self, method: str, path: str, headers: Mapping[str, str], me: str
    ) -> Signed | None:
        """Authenticate a request to node `me` from its method, raw path (with query) and
        headers alone, before its body is read. Raises PeerAuthError; None without a
        secret."""
        if self._key is None:
            return None
        values: dict[str, str] = {}
        for name, fmt in _FORMATS.items():
            value = headers.get(name)
            if value is None:
                raise PeerAuthError(f"missing {name} header")
            if not fmt.fullmatch(value):
                raise PeerAuthError(f"malformed {name} header")
            values[name] = value
        want = _mac(self._key, _signed_text(values, method, path))
        if not hmac.compare_digest(want, values[SIGNATURE_HEADER]):
            raise PeerAuthError("wrong signature (another cluster secret, or altered)")
        to = values[RECIPIENT_HEADER]
        if to != ANY_RECIPIENT and urllib.parse.unquote(to) != me:
            raise PeerAuthError(f"addressed to another node ({urllib.parse.unquote(to)!r})")
        ts, nonce = values[TIME_HEADER], values[NONCE_HEADER]
        try:
            self._guard.check(int(ts) / 1000, bytes.fromhex(nonce), self._wall())
        except NotFresh as exc:
            raise PeerAuthError(str(exc)) from None
        return Signed(urllib.parse.unquote(values[SENDER_HEADER]), values[BODY_HEADER])

    @staticmethod
    def check_body(signed: Signed | None, body: bytes) -> None:
        """The body read after `check_headers` must be the one that was signed."""
        if signed is not None and not hmac.compare_digest(
            hashlib.sha256(body).hexdigest(), signed.body_hash
        ):
            raise PeerAuthError("body does not match its signed hash")
