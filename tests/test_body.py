"""node/http/body.py: a body's limit applies to its decompressed size, counted as it inflates."""

from __future__ import annotations

import asyncio
import os
import zlib
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.errors import BadRequest, PayloadTooLarge
from aquila.node.http.body import read_body

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)


class Chunks:
    """A request's content, delivered in pieces; counts the pieces that were asked for."""

    def __init__(self, data: bytes, size: int, stall_after: int | None = None,
                 arrived: bool = True) -> None:
        self.data = data
        self.size = size
        self.pulled = 0
        self.stall_after = stall_after  # pieces delivered before the sender goes quiet
        self.arrived = arrived  # the whole body is in (else it comes as it is read)

    def is_eof(self) -> bool:
        # As aiohttp's StreamReader: True once the whole body has arrived (it is read
        # without a timer); a sender that stalls never gets there.
        return self.stall_after is None and self.arrived

    def read_nowait(self) -> bytes:
        # What has arrived, at once (as aiohttp's: all of it once is_eof()).
        rest = self.data[self.pulled * self.size:]
        self.pulled = -(-len(self.data) // self.size)
        return rest

    async def readany(self) -> bytes:
        if self.stall_after is not None and self.pulled >= self.stall_after:
            await asyncio.Event().wait()  # a client that never sends the rest
        start = self.pulled * self.size
        if start >= len(self.data):
            return b""
        self.pulled += 1
        return self.data[start : start + self.size]


def request(data: bytes, encoding: str | None, size: int = 16384, arrived: bool = True
            ) -> tuple[web.Request, Chunks]:
    content = Chunks(data, size, arrived=arrived)
    headers = {"Content-Encoding": encoding} if encoding else {}
    return cast(web.Request, SimpleNamespace(headers=headers, content=content)), content


def pack(data: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return zlib.compress(data, wbits=31)
    if encoding == "deflate":
        return zlib.compress(data)
    return data


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_bomb_is_refused_after_inflating_just_past_the_limit() -> None:
    """64 MiB of zeros in 64 KiB of gzip: refused within the first piece of input, having
    inflated at most one step (1 MiB) past the limit, never the whole."""
    packer = zlib.compressobj(9, wbits=31)
    packed = b"".join([packer.compress(bytes(1 << 20)) for _ in range(64)] + [packer.flush()])
    assert len(packed) < 128 * 1024
    req, content = request(packed, "gzip", size=4096)
    with pytest.raises(PayloadTooLarge):
        run(read_body(req, 100_000))
    assert content.pulled <= 2, content.pulled  # the rest of the body was never read
    assert content.pulled < len(packed) // 4096


@PROPERTY
@given(
    data=st.binary(max_size=5000) | st.integers(0, 20_000).map(lambda n: b"a" * n),
    encoding=st.sampled_from([None, "identity", "gzip", "x-gzip", "deflate"]),
    limit=st.integers(1, 12_000),
    size=st.integers(1, 3000),
    arrived=st.booleans(),
)
def test_the_body_or_413_exactly_at_the_limit(data: bytes, encoding: str | None, limit: int,
                                             size: int, arrived: bool) -> None:
    wire = pack(data, "gzip" if encoding == "x-gzip" else encoding or "identity")
    req, _ = request(wire, encoding, size, arrived)
    if len(data) > limit:
        with pytest.raises(PayloadTooLarge):
            run(read_body(req, limit))
    else:
        assert run(read_body(req, limit)) == data


@pytest.mark.parametrize(("encoding", "wire"), [
    ("gzip", b"not gzip"),
    ("gzip", zlib.compress(b"{}" * 100, wbits=31)[:-3]),
    ("gzip", zlib.compress(b"{}", wbits=31) + b"x"),
    ("deflate", b"\x78\x9c\x00\x00"),
    ("br", b"{}"),
    ("gzip, gzip", b"{}"),
    ("zstd", b"{}"),
])
def test_what_does_not_decompress_is_400(encoding: str, wire: bytes) -> None:
    req, _ = request(wire, encoding)
    with pytest.raises(BadRequest):
        run(read_body(req, 1 << 20))


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_a_body_that_stops_arriving_is_400(monkeypatch: pytest.MonkeyPatch,
                                           encoding: str | None) -> None:
    monkeypatch.setattr("aquila.node.http.body.IDLE_TIMEOUT_S", 0.05)
    req, content = request(pack(os.urandom(100_000), encoding or ""), encoding, size=1000)
    content.stall_after = 3
    with pytest.raises(BadRequest, match="no part of the body arrived"):
        run(read_body(req, 1 << 20))
    assert content.pulled == 3
