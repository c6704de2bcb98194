"""Findings of the security review in gossip, on the in-memory network (see
tests/test_gossip_bounds.py for the harness): a forged packet must not leave a member with
state it cannot encode, nor make it emit messages its peers cannot decode."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from aquila.cluster.membership.messages import (
    DecodeError,
    PushPull,
    decode,
    encode,
)
from tests.test_gossip_bounds import A, Net


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
