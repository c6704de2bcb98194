"""Hinted hand-off store: per node, per (collection, shard), the newest write of each id."""

from __future__ import annotations

import numpy as np
import pytest

from aquila.cluster.model.documents import Incoming
from aquila.cluster.replication.hints import Hints


def doc(doc_id: str, version: int = 1, writer: str = "n0", deleted: bool = False) -> Incoming:
    vec = None if deleted else np.full(2, version, dtype=np.float32)
    return Incoming(doc_id, vec, b"" if deleted else b'{"v":%d}' % version, version, writer)


def held(h: Hints, node: str) -> dict[tuple[str, int], list[tuple[str, int, str]]]:
    return {
        key: sorted((d.id, d.version, d.writer) for d in docs)
        for key, docs in h.take(node).items()
    }


def test_add_take_pending() -> None:
    h = Hints()
    h.add("b", "c1", 0, [doc("x"), doc("y")])
    h.add("b", "c1", 1, [doc("z")])
    h.add("c", "c2", 0, [doc("x")])
    assert (h.pending(), h.pending("b"), h.pending("c"), h.pending("zz")) == (4, 3, 1, 0)
    assert sorted(h.nodes()) == ["b", "c"]

    assert held(h, "b") == {("c1", 0): [("x", 1, "n0"), ("y", 1, "n0")],
                            ("c1", 1): [("z", 1, "n0")]}
    assert (h.pending(), h.pending("b")) == (1, 0)
    assert h.nodes() == ["c"]
    assert h.take("b") == {}  # taken means removed
    assert held(h, "c") == {("c2", 0): [("x", 1, "n0")]}
    assert (h.pending(), h.nodes(), h.dropped) == (0, [], 0)


def test_same_id_in_other_shard_or_collection_is_another_hint() -> None:
    h = Hints()
    h.add("b", "c1", 0, [doc("x")])
    h.add("b", "c1", 1, [doc("x")])
    h.add("b", "c2", 0, [doc("x")])
    assert h.pending("b") == 3


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [
        (doc("x", 1), doc("x", 2), (2, "n0")),  # newer version replaces
        (doc("x", 2), doc("x", 1), (2, "n0")),  # older does not
        (doc("x", 5, "n1"), doc("x", 5, "n2"), (5, "n2")),  # same version: writer breaks it
        (doc("x", 5, "n2"), doc("x", 5, "n1"), (5, "n2")),
        (doc("x", 3), doc("x", 4, deleted=True), (4, "n0")),  # a delete is a write too
        (doc("x", 4, deleted=True), doc("x", 3), (4, "n0")),
    ],
)
def test_newest_write_of_an_id_wins(first: Incoming, second: Incoming, kept: tuple[int, str]) -> None:
    for together in (False, True):
        h = Hints()
        if together:
            h.add("b", "c1", 0, [first, second])
        else:
            h.add("b", "c1", 0, [first])
            h.add("b", "c1", 0, [second])
        assert h.pending() == 1
        [d] = h.take("b")[("c1", 0)]
        assert (d.version, d.writer) == kept
        assert h.pending() == 0


def test_bounded_drops_new_ids_and_counts_them() -> None:
    h = Hints(max_docs=3)
    h.add("b", "c1", 0, [doc("x"), doc("y")])
    h.add("c", "c1", 0, [doc("z"), doc("w"), doc("v")])  # the bound is across nodes
    assert (h.pending(), h.dropped) == (3, 2)
    assert held(h, "c") == {("c1", 0): [("z", 1, "n0")]}

    # Taking frees room: three slots again, two of them used by b.
    h.add("c", "c1", 0, [doc("z")])
    assert (h.pending(), h.dropped) == (3, 2)

    # Full: a newer version of an id already held still replaces it (no new slot needed),
    # while a new id is dropped.
    h.add("b", "c1", 0, [doc("x", 9), doc("new")])
    assert (h.pending(), h.dropped) == (3, 3)
    assert held(h, "b") == {("c1", 0): [("x", 9, "n0"), ("y", 1, "n0")]}
    assert h.pending() == 1


def test_zero_capacity_keeps_nothing() -> None:
    h = Hints(max_docs=0)
    h.add("b", "c1", 0, [doc("x"), doc("y")])
    assert (h.pending(), h.pending("b"), h.dropped) == (0, 0, 2)


def test_nodes_lists_only_nodes_with_pending_hints() -> None:
    h = Hints(max_docs=1)
    h.add("b", "c1", 0, [doc("x")])
    h.add("c", "c1", 0, [doc("y")])  # dropped: the store is full
    assert h.pending("c") == 0
    assert h.nodes() == ["b"]
