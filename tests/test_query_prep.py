"""What a query goes through on the loop before its search: the bounds check of the fast
parse (`all_within`, the whole-batch form of `vectors_within`) and `prepare` (float32, unit
length for cosine), which must give the very bits `np.linalg.norm` gave: the same scores,
hence the same hits in the same order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aquila.cluster.model.bounds import MAX_VECTOR_VALUE, all_within, vectors_within
from aquila.node.storage.index import prepare


def reference_prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        x = x / norms
    return np.ascontiguousarray(x)


_FLOATS = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40),
                  elements=_FLOATS),
       st.sampled_from(["cosine", "l2", "ip"]), st.booleans())
def test_prepare_gives_the_bits_of_linalg_norm(x: np.ndarray, metric: str, flip: bool) -> None:
    if flip:  # not C-contiguous
        x = x[:, ::-1]
    got, want = prepare(x, metric), reference_prepare(x, metric)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert got.tobytes() == want.tobytes()


def test_prepare_leaves_a_zero_vector_as_it_is() -> None:
    x = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float64)
    assert prepare(x, "cosine").tolist() == [[0.0, 0.0], [0.6000000238418579, 0.800000011920929]]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, MAX_VECTOR_VALUE * 2,
                                   -MAX_VECTOR_VALUE * 2, MAX_VECTOR_VALUE, 0.0])
def test_all_within_is_vectors_within_for_the_whole_batch(value: float) -> None:
    x = np.ones((3, 4))
    x[1, 2] = value
    assert all_within(x) == bool(vectors_within(x).all())
    assert all_within(np.zeros((0, 4)))
