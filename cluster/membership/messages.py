"""Gossip wire messages and piggyback packing.

Every message is a JSON object (orjson; no object serialisation) with a type id `t` and a version `v`.
A packet is one message, usually a compound; with a cluster secret it is sealed with a MAC,
a timestamp and a nonce (`packet_auth`), and a packet whose MAC is missing or wrong is dropped.
"""

from __future__ import annotations

import base64
import enum
import functools
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from aquila.cluster.model.bounds import (
    MAX_ADDR_CHARS,
    MAX_COMPOUND_PARTS,
    MAX_INCARNATION,
    MAX_MEMBER_META_DEPTH,
    MAX_MEMBERS,
    MAX_NODE_ID_CHARS,
    MAX_SEQ,
    BoundsError,
    checked_int,
    checked_list,
    checked_str,
    depth_exceeds,
)
from aquila.cluster.model.config_parse import parse_hostport

# Bumped when a message gains a field older nodes must not ignore. Decoders accept newer
# versions and read the fields they know (unknown fields are ignored), like memberlist's
# protocol version range.
PROTOCOL_VERSION = 1

# Keep every UDP packet under a typical path MTU so it is never IP-fragmented.
MAX_PACKET_SIZE = 1400

MAC_SIZE = 32

# Encoded member metadata must leave room for other updates in a packet.
MAX_META_SIZE = 512
# Base64 of user data (the cluster state in a push-pull): 64 MiB of state.
MAX_USER_CHARS = 1 << 26


class MsgType(enum.IntEnum):
    """Wire type ids. ONLY APPEND TO THIS LIST: old nodes must keep decoding new traffic."""

    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    NACK = 3
    ALIVE = 4
    SUSPECT = 5
    DEAD = 6
    COMPOUND = 7
    USER = 8
    PUSH_PULL = 9


class DecodeError(ValueError):
    """A packet that is not a well-formed message."""


class AuthError(ValueError):
    """A packet whose MAC is missing or wrong."""


@dataclass(frozen=True)
class Ping:
    """Direct probe; `target` is the id the sender believes lives at our address."""

    seq: int
    target: str
    source_id: str
    source_addr: str


@dataclass(frozen=True)
class IndirectPing:
    """Ask the receiver to probe `target_addr` for us and relay the ack (or a nack)."""

    seq: int
    target: str
    target_addr: str
    nack: bool
    source_id: str
    source_addr: str


@dataclass(frozen=True)
class Ack:
    seq: int


@dataclass(frozen=True)
class Nack:
    """Sent by an indirect prober that got no ack: proof that *it* is alive and reachable."""

    seq: int


@dataclass(frozen=True)
class Alive:
    incarnation: int
    node: str
    addr: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suspect:
    incarnation: int
    node: str
    from_: str


@dataclass(frozen=True)
class Dead:
    """`from_ == node` means a graceful leave: the member becomes `left`, not `dead`."""

    incarnation: int
    node: str
    from_: str


@dataclass(frozen=True)
class User:
    """An opaque message of the layer above (the Delegate), piggybacked on gossip."""

    data: bytes


@dataclass(frozen=True)
class Compound:
    parts: tuple[Message, ...]


@dataclass(frozen=True)
class MemberRow:
    """One row of a push-pull full-state exchange."""

    node: str
    addr: str
    state: str
    incarnation: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class PushPull:
    join: bool
    members: tuple[MemberRow, ...]
    user_state: bytes


Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | User | Compound | PushPull


# --- encoding -------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def to_obj(msg: Message) -> dict[str, Any]:
    v = PROTOCOL_VERSION
    match msg:
        case Ping():
            return {
                "t": MsgType.PING,
                "v": v,
                "seq": msg.seq,
                "target": msg.target,
                "sid": msg.source_id,
                "saddr": msg.source_addr,
            }
        case IndirectPing():
            return {
                "t": MsgType.INDIRECT_PING,
                "v": v,
                "seq": msg.seq,
                "target": msg.target,
                "taddr": msg.target_addr,
                "nack": msg.nack,
                "sid": msg.source_id,
                "saddr": msg.source_addr,
            }
        case Ack():
            return {"t": MsgType.ACK, "v": v, "seq": msg.seq}
        case Nack():
            return {"t": MsgType.NACK, "v": v, "seq": msg.seq}
        case Alive():
            return {
                "t": MsgType.ALIVE,
                "v": v,
                "inc": msg.incarnation,
                "node": msg.node,
                "addr": msg.addr,
                "meta": msg.meta,
            }
        case Suspect():
            return {
                "t": MsgType.SUSPECT,
                "v": v,
                "inc": msg.incarnation,
                "node": msg.node,
                "from": msg.from_,
            }
        case Dead():
            return {
                "t": MsgType.DEAD,
                "v": v,
                "inc": msg.incarnation,
                "node": msg.node,
                "from": msg.from_,
            }
        case User():
            return {"t": MsgType.USER, "v": v, "data": _b64(msg.data)}
        case Compound():
            return {"t": MsgType.COMPOUND, "v": v, "parts": [to_obj(p) for p in msg.parts]}
        case PushPull():
            return {
                "t": MsgType.PUSH_PULL,
                "v": v,
                "join": msg.join,
                "members": [[m.node, m.addr, m.state, m.incarnation, m.meta] for m in msg.members],
                "user": _b64(msg.user_state),
            }
    raise TypeError(f"not a message: {msg!r}")


def encode(msg: Message) -> bytes:
    return orjson.dumps(to_obj(msg))


def encode_compound(parts: list[bytes]) -> bytes:
    """Splice already-encoded messages into one compound without re-encoding them."""
    head = b'{"t":%d,"v":%d,"parts":[' % (MsgType.COMPOUND, PROTOCOL_VERSION)
    return head + b",".join(parts) + b"]}"


# Bytes a compound adds around its parts, plus one comma per part (see encode_compound).
COMPOUND_OVERHEAD = len(encode_compound([]))


def _inc(v: Any, accusation: bool = False) -> int:
    # An accusation must leave room for the accused's refutation (one more), which must
    # still decode everywhere: see cluster/model/bounds.py.
    return checked_int(v, 0, MAX_INCARNATION - 1 if accusation else MAX_INCARNATION,
                       "incarnation")


def _seq(v: Any) -> int:
    return checked_int(v, 0, MAX_SEQ, "seq")


def _node(v: Any) -> str:
    return checked_str(v, MAX_NODE_ID_CHARS, "node id", min_chars=1)


def _addr(v: Any) -> str:
    """A member address: host:port and nothing else (it is where we send packets)."""
    return _valid_addr(str(checked_str(v, MAX_ADDR_CHARS, "address")))


@functools.lru_cache(maxsize=4096)
def _valid_addr(v: str) -> str:
    """`v` if it parses as host:port (ValueError otherwise, which is not cached). The same
    few addresses arrive in every packet: parsing them each time was a tenth of the CPU of a
    1,000-node simulation."""
    parse_hostport(v)
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise BoundsError("expected a boolean")
    return v


def _meta(v: Any) -> dict[str, Any]:
    """Member metadata: an object whose encoding fits the size gossip allows, nested little
    enough that it still encodes inside a push-pull row (orjson stops at 255 levels, and a
    row's metadata sits three levels in)."""
    if v is None or (type(v) is dict and not v):
        return {}
    if not isinstance(v, dict) or depth_exceeds(v, MAX_MEMBER_META_DEPTH):
        raise BoundsError(f"meta must be an object nested at most {MAX_MEMBER_META_DEPTH} deep")
    if len(orjson.dumps(v)) > MAX_META_SIZE:
        raise BoundsError(f"meta must be an object of at most {MAX_META_SIZE} bytes encoded")
    return v


def _row(r: Any) -> MemberRow:
    if not isinstance(r, list) or len(r) != 5:
        raise BoundsError("a member row is [node, addr, state, incarnation, meta]")
    n, a, state, i, m = r
    if state not in ("alive", "suspect", "dead", "left"):
        raise BoundsError(f"unknown member state {state!r}")
    return MemberRow(_node(n), _addr(a), state, _inc(i, accusation=state != "alive"), _meta(m))


def from_obj(obj: Any, *, nested: bool = False) -> Message:
    """The message in a decoded JSON object; DecodeError unless every field has its type and
    lies within its bounds (cluster/model/bounds.py). Compounds do not nest, so decoding never
    recurses more than once."""
    try:
        if not isinstance(obj, dict):
            raise DecodeError("message is not an object")
        t = obj["t"]
        if isinstance(obj.get("v"), bool) or not isinstance(obj.get("v"), int):
            raise DecodeError("message without a version")
        if t == MsgType.PING:
            return Ping(_seq(obj["seq"]), _node(obj["target"]), _node(obj["sid"]),
                        _addr(obj["saddr"]))
        if t == MsgType.INDIRECT_PING:
            return IndirectPing(
                _seq(obj["seq"]),
                _node(obj["target"]),
                _addr(obj["taddr"]),
                _bool(obj["nack"]),
                _node(obj["sid"]),
                _addr(obj["saddr"]),
            )
        if t == MsgType.ACK:
            return Ack(_seq(obj["seq"]))
        if t == MsgType.NACK:
            return Nack(_seq(obj["seq"]))
        if t == MsgType.ALIVE:
            return Alive(_inc(obj["inc"]), _node(obj["node"]), _addr(obj["addr"]),
                         _meta(obj.get("meta")))
        if t == MsgType.SUSPECT:
            return Suspect(_inc(obj["inc"], True), _node(obj["node"]), _node(obj["from"]))
        if t == MsgType.DEAD:
            return Dead(_inc(obj["inc"], True), _node(obj["node"]), _node(obj["from"]))
        if t == MsgType.USER:
            return User(base64.b64decode(checked_str(obj["data"], MAX_USER_CHARS, "data"),
                                         validate=True))
        if t == MsgType.COMPOUND:
            if nested:
                raise DecodeError("a compound inside a compound")
            parts = checked_list(obj["parts"], MAX_COMPOUND_PARTS, "parts")
            return Compound(tuple(from_obj(p, nested=True) for p in parts))
        if t == MsgType.PUSH_PULL:
            members = checked_list(obj["members"], MAX_MEMBERS, "members")
            return PushPull(
                _bool(obj["join"]),
                tuple(_row(r) for r in members),
                base64.b64decode(checked_str(obj["user"], MAX_USER_CHARS, "user"),
                                 validate=True),
            )
    except DecodeError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"malformed message: {exc}") from exc
    raise DecodeError(f"unknown message type {t!r}")


def decode(data: bytes) -> Message:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DecodeError("message is not an object")
    return from_obj(obj)


def decode_packet(data: bytes) -> tuple[list[Message], int]:
    """The messages of a gossip packet and how many of its parts were dropped. A compound's
    parts are decoded one by one, as memberlist does: a part this node cannot decode (out of
    bounds, or a newer peer's) costs only itself, never the acks and updates beside it, so
    one bad update piggybacked on a node's every packet cannot get that node declared dead.
    DecodeError when the packet as a whole is not a message."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("t") != MsgType.COMPOUND:
        return [from_obj(obj)], 0
    # The envelope checked as from_obj checks it, then each part on its own.
    try:
        if isinstance(obj.get("v"), bool) or not isinstance(obj.get("v"), int):
            raise DecodeError("message without a version")
        parts = checked_list(obj.get("parts"), MAX_COMPOUND_PARTS, "parts")
    except BoundsError as exc:
        raise DecodeError(f"malformed message: {exc}") from exc
    out: list[Message] = []
    for p in parts:
        try:
            out.append(from_obj(p, nested=True))
        except DecodeError:
            continue
    return out, len(parts) - len(out)


# --- piggyback queue ------------------------------------------------------------------


@dataclass
class _Broadcast:
    key: str | None
    data: bytes
    seq: int
    transmits: int = 0
    on_done: Callable[[], None] | None = None
    dropped: bool = False  # superseded or sent enough: its heap entry is skipped


class BroadcastQueue:
    """memberlist's TransmitLimitedQueue: updates waiting to be piggybacked.

    A newer update about the same member replaces the older one (the older is stale), the
    least-transmitted updates go first (newest breaking ties, they are the least known),
    and each update is dropped after `limit()` transmissions.

    A heap ordered by (transmits, newest first) with lazy deletion, so one `take` costs
    O(taken · log q) rather than sorting the whole queue: when a thousand nodes join, every
    member queues a thousand updates and sends hundreds of packets from that queue.
    """

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._heap: list[tuple[int, int, _Broadcast]] = []
        self._by_key: dict[str, _Broadcast] = {}
        self._count = 0
        self._seq = 0
        # The shortest update queued since the queue was last empty: a lower bound on what
        # the live ones need, so `take` stops once even that no longer fits.
        self._min_cost = 0

    def __len__(self) -> int:
        return self._count

    def queue(
        self, key: str | None, data: bytes, on_done: Callable[[], None] | None = None
    ) -> None:
        if key is not None:
            old = self._by_key.pop(key, None)
            if old is not None:
                self._drop(old)
        self._seq += 1
        # A copy of exactly its length: orjson's result keeps its ~4 KiB initial buffer, and
        # while a thousand members join, each member queues a thousand updates (4 GB in a
        # 1,000-node simulation, 4 MB on each real node).
        b = _Broadcast(key, bytes(memoryview(data)), self._seq, on_done=on_done)
        if key is not None:
            self._by_key[key] = b
        cost = len(data) + 1
        self._min_cost = cost if self._count == 0 else min(self._min_cost, cost)
        self._count += 1
        heapq.heappush(self._heap, (0, -b.seq, b))
        if len(self._heap) > 2 * self._count + 64:
            # Superseded entries pile up when updates churn faster than packets go out.
            self._heap = [e for e in self._heap if not e[2].dropped]
            heapq.heapify(self._heap)

    def _drop(self, b: _Broadcast) -> None:
        b.dropped = True
        self._count -= 1
        if b.key is not None and self._by_key.get(b.key) is b:
            del self._by_key[b.key]
        if b.on_done:
            b.on_done()

    def take(self, budget: int) -> list[bytes]:
        """Pick updates whose encoded size (plus a separator each) fits in `budget` bytes."""
        if not self._count:
            return []
        limit = self._limit()
        out: list[bytes] = []
        back: list[tuple[int, int, _Broadcast]] = []
        heap = self._heap
        while heap and budget >= self._min_cost:
            entry = heapq.heappop(heap)
            b = entry[2]
            if b.dropped:
                continue
            cost = len(b.data) + 1
            if cost > budget:
                back.append(entry)
                continue
            budget -= cost
            out.append(b.data)
            b.transmits += 1
            if b.transmits >= limit:
                self._drop(b)
            else:
                back.append((b.transmits, entry[1], b))
        for entry in back:
            heapq.heappush(heap, entry)
        return out
