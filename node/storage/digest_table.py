"""A shard's anti-entropy digests (one 128-bit value per bucket) in one numpy array.

Kept as a list of Python ints, every write replaced its buckets' ints with new ones: after a
bulk load the last ones (256 a shard, 2,048 on a node of eight shards) were scattered over
Python's small-object arenas among the load's temporaries, each keeping its arena (1 MiB,
given back only once empty) resident: 25–29 MiB above the same node restarted. Here they are
two 64-bit words a bucket, XORed in place: nothing allocated per write but the int read."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

_LOW = (1 << 64) - 1


class DigestTable:
    """`table[b]` is bucket b's digest as an int, `table[b] = v` sets it (so `table[b] ^= x`
    works); iterates and compares as the list of ints it stands for."""

    __slots__ = ("_words",)

    def __init__(self, values: Iterable[int] | int) -> None:
        if isinstance(values, int):
            self._words = np.zeros((values, 2), np.uint64)
            return
        vals = list(values)
        self._words = np.zeros((len(vals), 2), np.uint64)
        for b, v in enumerate(vals):
            self[b] = v

    def __len__(self) -> int:
        return len(self._words)

    def __getitem__(self, bucket: int) -> int:
        hi, lo = self._words[bucket].tolist()
        return (int(hi) << 64) | int(lo)

    def __setitem__(self, bucket: int, value: int) -> None:
        if not 0 <= value < 1 << 128:
            raise ValueError("a digest is 128 bits")
        row = self._words[bucket]
        row[0] = value >> 64
        row[1] = value & _LOW

    def xor_many(self, delta: dict[int, int]) -> None:
        """`table[b] ^= x` for every bucket b → x of `delta`, in one numpy step."""
        if delta:
            buckets, words = self._split(delta)
            self._words[buckets] ^= words

    def xored(self, delta: dict[int, int]) -> list[tuple[int, bytes]]:
        """Per bucket b → x of `delta`: b and `table[b] ^ x` as 16 big-endian bytes (the
        stored form), the table unchanged."""
        if not delta:
            return []
        buckets, words = self._split(delta)
        raw = (self._words[buckets] ^ words).astype(">u8").tobytes()
        return [(b, raw[16 * i:16 * i + 16]) for i, b in enumerate(delta)]

    @staticmethod
    def _split(delta: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        n = len(delta)
        buckets = np.fromiter(delta, np.int64, n)  # a dict's keys: no bucket twice
        words = np.empty((n, 2), np.uint64)
        words[:, 0] = np.fromiter((x >> 64 for x in delta.values()), np.uint64, n)
        words[:, 1] = np.fromiter((x & _LOW for x in delta.values()), np.uint64, n)
        return buckets, words

    def __iter__(self) -> Iterator[int]:
        return (self[b] for b in range(len(self)))

    def tolist(self) -> list[int]:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DigestTable):
            return bool(np.array_equal(self._words, other._words))
        if isinstance(other, (list, tuple)):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DigestTable({self.tolist()!r})"
