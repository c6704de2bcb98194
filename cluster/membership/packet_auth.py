"""Authentication of gossip packets and push-pull payloads with the cluster secret.

A sealed packet is

    MAC (32) | version (1) | time, Unix ms (8) | nonce (16) | sender length (2) | sender | body

where MAC = HMAC-SHA256(key, everything after it). The receiver checks the MAC before it
looks at anything else, then the header: a stale, future or replayed packet (`replay`) is
dropped, and so is one that claims to come from the receiver itself (its own packet sent
back). Only then is the body decoded. Without a secret packets are bare bodies.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from aquila.cluster.clock import Clock
from aquila.cluster.membership.messages import MAC_SIZE, AuthError
from aquila.cluster.model.replay import NotFresh, ReplayGuard

VERSION = 1
_HEADER = struct.Struct("!BQ16sH")


class StalePacket(AuthError):
    """An authentic packet that is stale, from the future, replayed, or our own."""


def derive_key(secret: str | None) -> bytes | None:
    """The packet MAC key, domain-separated so the same secret used elsewhere (peer
    requests) never yields the same key."""
    if not secret:
        return None
    return hmac.new(secret.encode(), b"aquila-gossip-mac-v2", hashlib.sha256).digest()


class PacketAuth:
    """Seals this node's packets and opens its peers'; holds its replay memory."""

    def __init__(self, secret: str | None, sender: str, clock: Clock) -> None:
        self._key = derive_key(secret)
        self._sender = sender.encode()[:0xFFFF]
        self._clock = clock
        self._guard = ReplayGuard()

    @property
    def overhead(self) -> int:
        """Bytes a sealed packet adds to its body."""
        return 0 if self._key is None else MAC_SIZE + _HEADER.size + len(self._sender)

    def seal(self, body: bytes) -> bytes:
        if self._key is None:
            return body
        ts = int(self._clock.wall() * 1000)
        signed = (
            _HEADER.pack(VERSION, ts, os.urandom(16), len(self._sender)) + self._sender + body
        )
        return hmac.new(self._key, signed, hashlib.sha256).digest() + signed

    def open(self, packet: bytes) -> bytes:
        """The body of an authentic, fresh packet; raises AuthError (StalePacket)."""
        if self._key is None:
            return packet
        if len(packet) < MAC_SIZE + _HEADER.size:
            raise AuthError("packet too short for a MAC and header")
        mac, signed = packet[:MAC_SIZE], packet[MAC_SIZE:]
        if not hmac.compare_digest(mac, hmac.new(self._key, signed, hashlib.sha256).digest()):
            raise AuthError("bad MAC")
        version, ts, nonce, n = _HEADER.unpack_from(signed)
        if version != VERSION or len(signed) < _HEADER.size + n:
            raise AuthError(f"unknown packet header (version {version})")
        sender = signed[_HEADER.size : _HEADER.size + n]
        if sender == self._sender:
            raise StalePacket("our own packet, sent back")
        try:
            self._guard.check(ts / 1000, nonce, self._clock.wall())
        except NotFresh as exc:
            raise StalePacket(str(exc)) from None
        return signed[_HEADER.size + n :]
