"""Findings of the security review in gossip, on the in-memory network (see
tests/test_gossip_bounds.py for the harness): a forged packet must not leave a member with
state it cannot encode, nor make it emit messages its peers cannot decode."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from aquila.cluster.membership.messages import (
    Alive,
    DecodeError,
    PushPull,
    decode,
    encode,
    encode_compound,
)
from aquila.cluster.membership.table import State
from aquila.cluster.model.bounds import MAX_INCARNATION
from tests.test_gossip_bounds import A, B, Net


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    n = Net()
    await n.start()
    await n.run(1.0)
    yield n
    await n.stop()


def _deep_meta(levels: int) -> dict[str, object]:
    inner: list[object] = []
    for _ in range(levels):
        inner = [inner]
    return {"a": inner}


def test_member_metadata_nested_deep_is_a_decode_error() -> None:
    """Metadata within the size limit but nested so deep that the member's row in a push-pull
    (three levels further in) no longer encodes."""
    meta = _deep_meta(250)
    assert len(orjson.dumps(meta)) <= 512
    with pytest.raises(DecodeError):
        decode(orjson.dumps({"t": 4, "v": 1, "inc": 1, "node": "z", "addr": "10.0.0.9:1",
                             "meta": meta}))
    # Spliced by hand: orjson itself cannot write this row inside a message.
    row = b'["z","10.0.0.9:1","alive",1,' + orjson.dumps(meta) + b"]"
    with pytest.raises(DecodeError):
        decode(b'{"t":9,"v":1,"join":false,"members":[' + row + b'],"user":""}')


async def test_a_deep_metadata_alive_does_not_break_push_pull(net: Net) -> None:
    """Before: the forged member was added, and from then on this node's push-pull state did
    not encode (every push-pull with it failed, its HTTP route answered an error)."""
    meta = _deep_meta(250)
    await net.forge(A, orjson.dumps({"t": 4, "v": 1, "inc": 1, "node": "z",
                                     "addr": "10.0.0.9:1", "meta": meta}))
    await net.run(0.5)
    assert net.a.member("z") is None
    reply = decode(net.a.handle_push_pull(encode(PushPull(False, (), b""))))
    assert isinstance(reply, PushPull)
    assert net.loops_alive()


async def test_a_forged_alive_at_the_ceiling_does_not_make_a_node_undecodable(
    net: Net,
) -> None:
    """An Alive about b at the largest incarnation, with other metadata, sent to b: b refuted
    with one more, above what any peer decodes, so every packet b sent (its acks too, the
    refutation piggybacked on them) was dropped and the others declared b dead, for good."""
    await net.forge(B, encode(Alive(MAX_INCARNATION, "b", B, {"x": 1})))
    await net.run(5.0)
    assert net.b.local_member().incarnation <= MAX_INCARNATION
    for row in net.b._table.rows():  # everything b says about itself still decodes
        decode(encode(PushPull(False, (row,), b"")))
    assert net.a.member("b").state == State.ALIVE  # type: ignore[union-attr]
    assert net.loops_alive()


async def test_one_undecodable_part_costs_only_itself(net: Net) -> None:
    """A compound is decoded part by part: an accusation beyond the bounds beside a valid
    Alive drops the accusation only."""
    alive = encode(Alive(1, "q", "10.0.0.7:1"))
    bad = b'{"t":5,"v":1,"inc":%d,"node":"b","from":"x"}' % MAX_INCARNATION
    before = net.a.stats.malformed
    await net.forge(A, encode_compound([bad, alive]))
    await net.run(0.1)
    assert net.a.member("q") is not None
    assert net.a.stats.malformed == before + 1
