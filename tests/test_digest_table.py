"""A shard's digests in numpy (node/storage/digest_table.py): the same values, reads, XORs,
comparisons and stored form as the list of 128-bit ints they replace, and no Python int kept
per bucket (each write's new ints pinned Python's arenas after a bulk load)."""

from __future__ import annotations

import gc
import random

import pytest

from aquila.cluster.model.digests import BUCKETS, format_digests
from aquila.node.storage.digest_table import DigestTable


def test_values_round_trip_and_xor_like_a_list() -> None:
    rng = random.Random(5)
    values = [rng.getrandbits(128) for _ in range(BUCKETS)]
    values[3], values[4] = 0, (1 << 128) - 1
    table, plain = DigestTable(values), list(values)
    assert table == plain and plain == table and len(table) == BUCKETS
    for _ in range(2000):
        b, x = rng.randrange(BUCKETS), rng.getrandbits(128)
        table[b] ^= x
        plain[b] ^= x
    assert table.tolist() == plain and list(table) == plain
    assert format_digests(table.tolist()) == format_digests(plain)
    assert table == DigestTable(plain) and table != DigestTable(BUCKETS)


def test_empty_table_is_zeros_and_out_of_range_values_are_refused() -> None:
    table = DigestTable(8)
    assert table == [0] * 8
    with pytest.raises(ValueError):
        table[0] = 1 << 128
    with pytest.raises(ValueError):
        table[0] = -1
    assert table == [0] * 8


def test_no_int_object_is_kept_per_bucket() -> None:
    table = DigestTable([(1 << 100) + b for b in range(BUCKETS)])
    table[7] ^= 1 << 90
    assert not any(isinstance(r, int) for r in gc.get_referents(table))


def test_many_at_once_as_one_at_a_time() -> None:
    rng = random.Random(11)
    table = DigestTable([rng.getrandbits(128) for _ in range(BUCKETS)])
    plain = table.tolist()
    for _ in range(20):
        delta = {rng.randrange(BUCKETS): rng.getrandbits(128) for _ in range(rng.randrange(60))}
        staged = table.xored(delta)
        assert [b for b, _ in staged] == list(delta)
        assert [int.from_bytes(raw, "big") for _, raw in staged] == \
            [plain[b] ^ x for b, x in delta.items()]
        assert table == plain  # xored changes nothing
        table.xor_many(delta)
        for b, x in delta.items():
            plain[b] ^= x
        assert table == plain
    table.xor_many({})
    assert table.xored({}) == [] and table == plain
