"""The messages of a peer channel (`channel.py`): one binary WebSocket message each, many
requests in flight at once on one connection, answered in any order.

Every message starts with a version byte, a kind, its sequence number in its direction (u64,
from 0; the receiver wants exactly the next one) and a request id (u32), little-endian:

- REQUEST: an op (one byte: the frame operations, `OPS`), the collection's name (u8 length,
  ASCII), the client request's id (u8 length, ASCII, may be empty), then the frame.
- ANSWER: a type byte (FRAME: the bytes are the answer; JSON: a small JSON answer; TOO_LARGE:
  the answer is larger than a channel carries, ask over HTTP; no bytes) and the bytes.
- ERROR: the HTTP status (u16) and the error body as the HTTP route would have answered it.
- HELLO, from the server once, before anything else: 16 random bytes, which go into the
  channel's keys. It carries no sequence number and no MAC (a changed nonce only makes every
  later MAC fail).

With a cluster secret every message but HELLO ends in an HMAC-SHA256 (32 bytes) over all of
it before, under the key of its direction (`channel_keys`: from the secret, the handshake's
signature and the server's nonce), so without the secret nothing can be injected, altered,
replayed (sequence numbers) or moved to another channel or direction (keys). What does not
decode is a `WireError`, typed by what was wrong; nothing else is raised on any input.
"""

from __future__ import annotations

import hmac
import struct
from typing import NamedTuple

from aquila.cluster.peers.auth import derive_key
from aquila.cluster.peers.client import PeerError

VERSION = 1
HELLO, REQUEST, ANSWER, ERROR = 0, 1, 2, 3
FRAME, JSON, TOO_LARGE = 0, 1, 2
# The operations that travel the channel (the peer protocol's binary frames), by code.
OPS = ("search", "write", "get")
OP_CODES = {op: i for i, op in enumerate(OPS)}
MAC_SIZE = 32
NONCE_SIZE = 16
MAX_SEQ = 2**64 - 1
MAX_ID = 2**32 - 1

_HEAD = struct.Struct("<BBQI")  # version, kind, sequence, request id
_REQ = struct.Struct("<BB")  # op, name length
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
HEAD_SIZE = _HEAD.size
# A request's own fields at most (op, a name of 255 bytes, a request id of 255), and a MAC.
OVERHEAD = HEAD_SIZE + 2 + 255 + 1 + 255 + 2 + MAC_SIZE
_NAME_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_RID_BYTES = _NAME_BYTES | {ord(".")}


class WireError(PeerError):
    """A channel message that is not one: the channel it came on is broken (retryable)."""


class Truncated(WireError):
    pass


class BadVersion(WireError):
    pass


class BadMac(WireError):
    pass


class BadSequence(WireError):
    pass


class BadField(WireError):
    """A well-sealed request with a field this node does not take (an operation, a name): that
    request is refused (a 400), the channel goes on."""

    def __init__(self, message: str, id_: int) -> None:
        super().__init__(message)
        self.id = id_


class Request(NamedTuple):
    id: int
    op: str
    name: str
    rid: str | None
    body: bytes


class Answer(NamedTuple):
    id: int
    kind: int  # ANSWER or ERROR
    type: int  # FRAME or JSON for an ANSWER, the HTTP status for an ERROR
    body: bytes


def channel_keys(secret: str | None, signature: str, nonce: bytes) -> tuple[bytes, bytes] | None:
    """(client to server, server to client) keys of one channel: from the secret's peer key,
    the handshake's signature (fresh and never accepted twice) and the server's nonce. None
    without a secret."""
    key = derive_key(secret)
    if key is None:
        return None
    base = hmac.digest(key, b"aquila-channel-v1\n" + signature.encode() + b"\n" + nonce,
                       "sha256")
    return (hmac.digest(base, b"client-to-server", "sha256"),
            hmac.digest(base, b"server-to-client", "sha256"))


def _seal(msg: bytes, key: bytes | None) -> bytes:
    return msg if key is None else msg + hmac.digest(key, msg, "sha256")


def encode_hello(nonce: bytes) -> bytes:
    return bytes((VERSION, HELLO)) + nonce


def decode_hello(data: bytes) -> bytes:
    """The server's nonce."""
    if len(data) < 2:
        raise Truncated("channel hello is truncated")
    if data[0] != VERSION:
        raise BadVersion(f"channel version {data[0]} (this node speaks {VERSION})")
    if data[1] != HELLO or len(data) != 2 + NONCE_SIZE:
        raise WireError("not a channel hello")
    return bytes(data[2:])


def sendable_name(name: str) -> bool:
    """Whether a request can name this collection (else it goes over HTTP, which answers)."""
    return 0 < len(name) <= 255 and name.isascii() and _NAME_BYTES.issuperset(name.encode())


def encode_request(seq: int, rid_: int, op: str, name: str, rid: str | None, body: bytes,
                   key: bytes | None) -> bytes:
    """`name` must be `sendable_name`, `rid` of at most 255 characters of ID_RE's."""
    n = name.encode()
    r = b"" if rid is None else rid.encode()
    return _seal(b"".join((_HEAD.pack(VERSION, REQUEST, seq, rid_),
                           _REQ.pack(OP_CODES[op], len(n)), n, _U8.pack(len(r)), r, body)),
                 key)


def encode_answer(seq: int, rid_: int, type_: int, body: bytes, key: bytes | None) -> bytes:
    return _seal(_HEAD.pack(VERSION, ANSWER, seq, rid_) + _U8.pack(type_) + body, key)


def encode_error(seq: int, rid_: int, status: int, body: bytes, key: bytes | None) -> bytes:
    return _seal(_HEAD.pack(VERSION, ERROR, seq, rid_) + _U16.pack(status) + body, key)


def _open(data: bytes, key: bytes | None, seq: int) -> tuple[int, int, int]:
    """(kind, request id, end of the payload): the head and MAC checked."""
    if len(data) < 1:
        raise Truncated("empty channel message")
    if data[0] != VERSION:
        raise BadVersion(f"channel version {data[0]} (this node speaks {VERSION})")
    end = len(data) - (0 if key is None else MAC_SIZE)
    if end < HEAD_SIZE:
        raise Truncated("channel message is truncated")
    if key is not None and not hmac.compare_digest(
            hmac.digest(key, memoryview(data)[:end], "sha256"), data[end:]):
        raise BadMac("channel message fails its MAC (another secret, or altered)")
    _, kind, got, id_ = _HEAD.unpack_from(data)
    if got != seq:
        raise BadSequence(f"channel message {got} where {seq} was due (replayed or reordered)")
    return kind, id_, end


def decode_request(data: bytes, key: bytes | None, seq: int) -> Request:
    """A request from a client, whose message `seq` this must be."""
    kind, id_, end = _open(data, key, seq)
    if kind != REQUEST:
        raise WireError(f"channel message of kind {kind} where a request was due")
    pos = HEAD_SIZE
    if end < pos + 2:
        raise Truncated("channel request is truncated")
    op_code, n = _REQ.unpack_from(data, pos)
    pos += 2
    if op_code >= len(OPS):
        raise BadField(f"unknown channel operation {op_code}", id_)
    if end < pos + n + 1:
        raise Truncated("channel request is truncated")
    name = data[pos:pos + n]
    pos += n
    (r,) = _U8.unpack_from(data, pos)
    pos += 1
    if end < pos + r:
        raise Truncated("channel request is truncated")
    rid = data[pos:pos + r]
    pos += r
    if not name or not _NAME_BYTES.issuperset(name) or not _RID_BYTES.issuperset(rid):
        raise BadField("channel request with a malformed collection name or request id", id_)
    return Request(id_, OPS[op_code], name.decode(), rid.decode() if rid else None,
                   data[pos:end])


def decode_answer(data: bytes, key: bytes | None, seq: int) -> Answer:
    """An answer (or error) from a server, whose message `seq` this must be."""
    kind, id_, end = _open(data, key, seq)
    pos = HEAD_SIZE
    if kind == ANSWER:
        if end < pos + 1:
            raise Truncated("channel answer is truncated")
        type_ = data[pos]
        if type_ not in (FRAME, JSON, TOO_LARGE):
            raise WireError(f"channel answer of unknown type {type_}")
        return Answer(id_, kind, type_, data[pos + 1:end])
    if kind == ERROR:
        if end < pos + 2:
            raise Truncated("channel error is truncated")
        (status,) = _U16.unpack_from(data, pos)
        if not 400 <= status <= 599:
            raise WireError(f"channel error with status {status}")
        return Answer(id_, kind, status, data[pos + 2:end])
    raise WireError(f"channel message of kind {kind} where an answer was due")
