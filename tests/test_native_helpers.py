"""The native shuffle is numpy's RandomState.shuffle, bit for bit, including the RNG state after."""
import numpy as np
import pytest

from ascendspeed.data import index_helpers


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int64])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 624, 625, 1000, 65537, 1_000_003])
def test_shuffle_equals_numpy(dtype, n):
    expected_rng, rng = np.random.RandomState(1234), np.random.RandomState(1234)
    expected = np.arange(n, dtype=dtype)
    expected_rng.shuffle(expected)
    got = np.arange(n, dtype=dtype)
    index_helpers.shuffle(rng, got)
    assert np.array_equal(got, expected)
    # The stream continues identically (Megatron draws doc_idx, then shuffle_idx, from one RNG).
    assert np.array_equal(rng.randint(0, 2 ** 31, size=5), expected_rng.randint(0, 2 ** 31, size=5))


def test_shuffle_after_other_draws_and_in_sequence():
    expected_rng, rng = np.random.RandomState(7), np.random.RandomState(7)
    expected_rng.random_sample(3)
    rng.random_sample(3)
    for n in (10, 5000, 123):
        a, b = np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32)
        expected_rng.shuffle(a)
        index_helpers.shuffle(rng, b)
        assert np.array_equal(a, b)


def test_non_contiguous_falls_back_to_numpy():
    expected_rng, rng = np.random.RandomState(3), np.random.RandomState(3)
    a, b = np.arange(40, dtype=np.int32)[::2].copy(), np.arange(40, dtype=np.int32)[::2]
    expected_rng.shuffle(a)
    index_helpers.shuffle(rng, b)
    assert np.array_equal(a, b)
