"""Python face of the native index builders in csrc/dataset_helpers.cpp (ascendspeed._C)."""
from __future__ import annotations

import numpy as np

try:
    from ascendspeed import _C
except ImportError as error:  # the package was not installed, or its build was removed
    raise ImportError(
        "ascendspeed's native helpers (ascendspeed._C) are not built; install the project with "
        "`pip install -e .` (needs g++ and the Python headers)") from error

_SHUFFLE_DTYPES = (np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.int64))
INT32_MAX = np.iinfo(np.int32).max


def shuffle(rng: np.random.RandomState, values: np.ndarray) -> None:
    """`rng.shuffle(values)` for a 1-D array, bit-identical to numpy's legacy RandomState shuffle
    (same permutation, same RNG state afterwards), but with the memory latency hidden."""
    if (values.ndim != 1 or values.dtype not in _SHUFFLE_DTYPES
            or not values.flags.c_contiguous or not values.flags.writeable):
        rng.shuffle(values)
        return
    name, key, pos, has_gauss, cached_gaussian = rng.get_state(legacy=True)
    if name != "MT19937":
        rng.shuffle(values)
        return
    key = np.array(key, dtype=np.uint32)
    pos = _C.legacy_shuffle(values, key, int(pos))
    rng.set_state((name, key, pos, has_gauss, cached_gaussian))


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                     num_samples: int) -> np.ndarray:
    """sample_idx [num_samples + 1, 2]: int32 as Megatron stores it, int64 once positions in
    doc_idx no longer fit int32."""
    int64_rows = len(doc_idx) >= INT32_MAX
    return _C.build_sample_idx(np.ascontiguousarray(sizes, dtype=np.int32),
                               np.ascontiguousarray(doc_idx, dtype=np.int32),
                               int(seq_length), int(num_samples), int64_rows)


def build_blending_indices(weights: np.ndarray, size: int, verbose: bool = False):
    """(dataset_index uint8[size], dataset_sample_index int64[size]) by Megatron's greedy rule."""
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    dataset_index = np.zeros(size, dtype=np.uint8)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    _C.build_blending_indices(dataset_index, dataset_sample_index, weights, len(weights), size,
                              verbose)
    return dataset_index, dataset_sample_index
