"""Anti-entropy digests, pure: hash buckets, per-bucket digests and the version order."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.digests import BUCKETS, bucket_of, digests, newer
from aquila.cluster.model.documents import Incoming

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)

Record = tuple[str, int, str]


@pytest.mark.parametrize(
    ("doc_id", "b256", "b16"),
    [("doc-1", 113, 1), ("a", 84, 4), ("", 199, 7), ("héllo", 142, 14)],
)
def test_bucket_of_is_stable(doc_id: str, b256: int, b16: int) -> None:
    # Golden values: replicas on different versions of the code must agree on buckets.
    assert bucket_of(doc_id) == b256
    assert bucket_of(doc_id, 16) == b16


@PROPERTY
@given(st.text(), st.integers(1, 4096))
def test_bucket_of_in_range(doc_id: str, buckets: int) -> None:
    b = bucket_of(doc_id, buckets)
    assert 0 <= b < buckets
    assert bucket_of(doc_id, buckets) == b


def test_buckets_spread_ids() -> None:
    counts = [0] * BUCKETS
    for i in range(BUCKETS * 40):
        counts[bucket_of(f"doc-{i}")] += 1
    assert min(counts) > 10 and max(counts) < 80  # 40 expected per bucket


records = st.lists(
    st.tuples(st.text(max_size=8), st.integers(0, 2**62), st.sampled_from(["n0", "n1", "n2"])),
    unique_by=lambda r: r[0],  # one record per id, as in a shard
    max_size=30,
)


@PROPERTY
@given(records, st.randoms(use_true_random=False), st.sampled_from([1, 7, BUCKETS]))
def test_digests_are_order_independent(rs: list[Record], rnd: random.Random, n: int) -> None:
    shuffled = list(rs)
    rnd.shuffle(shuffled)
    d = digests(rs, n)
    assert digests(shuffled, n) == d
    assert digests(iter(shuffled), n) == d
    assert len(d) == n and all(len(x) == 32 for x in d)


def test_empty_digests_are_equal_zeros() -> None:
    assert digests([], 4) == ["0" * 32] * 4
    assert digests([]) == digests([], BUCKETS)


@settings(PROPERTY, max_examples=60)
@given(records.filter(bool), st.data())
def test_a_changed_record_changes_exactly_its_bucket(rs: list[Record], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(rs) - 1))
    doc_id, version, writer = rs[i]
    changed = data.draw(st.sampled_from([
        (doc_id, version + 1, writer),  # another version
        (doc_id, version, writer + "x"),  # same version, another writer
    ]))
    other = rs[:i] + [changed] + rs[i + 1:]
    before, after = digests(rs), digests(other)
    assert [b for b in range(BUCKETS) if before[b] != after[b]] == [bucket_of(doc_id)]

    missing = rs[:i] + rs[i + 1:]  # a replica that never got the record
    assert [b for b in range(BUCKETS) if digests(missing)[b] != before[b]] == [bucket_of(doc_id)]


def rec(version: int, writer: str) -> Incoming:
    return Incoming("x", None, b"", version, writer)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (rec(1, "n0"), None, True),
        (rec(2, "n0"), rec(1, "n9"), True),
        (rec(1, "n9"), rec(2, "n0"), False),
        (rec(5, "n2"), rec(5, "n1"), True),
        (rec(5, "n1"), rec(5, "n2"), False),
        (rec(5, "n1"), rec(5, "n1"), False),  # equal: nothing to send
    ],
)
def test_newer(a: Incoming, b: Incoming | None, expected: bool) -> None:
    assert newer(a, b) is expected
