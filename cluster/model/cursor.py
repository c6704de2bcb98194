"""The scroll cursor: where a scroll goes on, as an opaque string a client passes back.

It is base64url (no padding) of the compact JSON `[2, collection, uid, shard, after]`: a format
version, the collection's name and its incarnation the scroll began in, the shard to go on in
and the last document id looked at there (null: the shard's start). A cursor passed to another
collection's scroll is a 400 that says so. Format 1 (`[1, uid, shard, after]`, without the
name, from nodes before it) is still read: a scroll begun before an upgrade goes on. Nothing
in it is secret (any position may be asked for), so it is not signed; what comes back is
checked instead, whole, before use: its size, its alphabet, its shape, every field's type and
range. A forged or damaged cursor is a 400, never a path to anything; a cursor of an earlier
incarnation of the collection is refused by the read path (404), which alone knows the
current one.
"""

from __future__ import annotations

import base64
import binascii

import orjson

from aquila.cluster.model.bounds import MAX_UID_CHARS
from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.operations import ScrollPosition, valid_id

CURSOR_VERSION = 2
_NAMELESS_VERSION = 1  # read, no longer written
# An id of 256 characters escaped as \uXXXX at worst, the uid and the rest, in base64.
MAX_CURSOR_CHARS = 4096


def encode_cursor(collection: str, pos: ScrollPosition) -> str:
    raw = orjson.dumps([CURSOR_VERSION, collection, pos.uid, pos.shard, pos.after])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, collection: str, shards: int) -> ScrollPosition:
    """The position in `cursor`, checked against collection `collection` of `shards`
    shards."""
    bad = BadRequest("'cursor' is not a cursor this collection gave; pass back next_cursor "
                     "as it was answered (null starts again)")
    if not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise bad from None
    # urlsafe_b64decode skips characters outside its alphabet: only a canonical cursor passes.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != cursor:
        raise bad
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad from None
    if not isinstance(value, list) or not value or type(value[0]) is not int:
        raise bad
    if value[0] == CURSOR_VERSION and len(value) == 5:
        _, name, uid, shard, after = value
        if not isinstance(name, str):
            raise bad
        if name != collection:
            raise BadRequest(f"'cursor' is a cursor of another collection ({name[:64]!r}), "
                             f"not of {collection!r}: pass each scroll its own next_cursor")
    elif value[0] == _NAMELESS_VERSION and len(value) == 4:
        _, uid, shard, after = value
    else:
        raise bad
    if not isinstance(uid, str) or len(uid) > MAX_UID_CHARS:
        raise bad
    if type(shard) is not int or not 0 <= shard < shards:
        raise bad
    if after is not None and not valid_id(after):
        raise bad
    return ScrollPosition(uid, shard, after)
