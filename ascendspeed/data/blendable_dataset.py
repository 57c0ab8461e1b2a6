"""Blends of datasets (`--data-path W1 P1 W2 P2 ...`) exactly as Megatron-DeepSpeed builds them:
each component is asked for ceil(count * w * 1.005) samples, and position s of the blend goes to
the component furthest behind its share (Megatron's greedy build_blending_indices)."""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ascendspeed.data import index_helpers
from ascendspeed.errors import DatasetError

logger = logging.getLogger(__name__)

BLEND_MARGIN = 1.005  # absorbs the greedy blend's deviation from the exact shares


def parse_data_prefix(data_prefix, train_valid_test_num_samples):
    """`[PREFIX]` -> ([PREFIX], None, None); `[W1, P1, W2, P2, ...]` -> (prefixes, weights
    normalised as Megatron does, per-dataset [train, valid, test] sample counts)."""
    if isinstance(data_prefix, str):
        data_prefix = [data_prefix]
    data_prefix = list(data_prefix)
    if not data_prefix:
        raise DatasetError("--data-path is empty; give a dataset prefix or 'W1 P1 W2 P2 ...'")
    if len(data_prefix) == 1:
        return data_prefix, None, None
    if len(data_prefix) % 2 != 0:
        raise DatasetError(
            f"--data-path has {len(data_prefix)} entries; a blend needs pairs 'WEIGHT PREFIX' "
            f"(got {' '.join(map(str, data_prefix))})")
    weights = []
    for weight, prefix in zip(data_prefix[0::2], data_prefix[1::2]):
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise DatasetError(f"--data-path: weight {weight!r} for {prefix} is not a number "
                                     f"(expected 'WEIGHT PREFIX' pairs)") from None
        if not math.isfinite(value) or value < 0:
            raise DatasetError(f"--data-path: weight {weight!r} for {prefix} must be a "
                                     f"finite number >= 0")
        weights.append(value)
    prefixes = [str(p).strip() for p in data_prefix[1::2]]
    weight_sum = 0.0
    for weight in weights:  # summed left to right, like Megatron, for bit-identical shares
        weight_sum += weight
    if not weight_sum > 0.0:
        raise DatasetError(f"--data-path: the weights {data_prefix[0::2]} sum to 0")
    weights = [weight / weight_sum for weight in weights]
    per_dataset = [[int(math.ceil(val * weight * BLEND_MARGIN)) for val in train_valid_test_num_samples]
                   for weight in weights]
    return prefixes, weights, per_dataset


class BlendableDataset(torch.utils.data.Dataset):
    """Item s is item `dataset_sample_index[s]` of component `dataset_index[s]`."""

    def __init__(self, datasets, weights):
        if len(datasets) != len(weights):
            raise DatasetError(f"{len(datasets)} datasets but {len(weights)} weights")
        if not 0 < len(datasets) < 255:
            raise DatasetError(f"a blend holds 1 to 254 datasets, got {len(datasets)}")
        self.datasets = list(datasets)
        self.size = sum(len(dataset) for dataset in self.datasets)  # all components, in full
        weights = np.array(weights, dtype=np.float64)
        sum_weights = np.sum(weights)
        if not sum_weights > 0.0:
            raise DatasetError(f"blend weights {weights.tolist()} sum to 0")
        weights /= sum_weights
        self.weights = weights
        start = time.time()
        self.dataset_index, self.dataset_sample_index = index_helpers.build_blending_indices(
            weights, self.size)
        logger.info(" > built blending indices for %d samples of %d datasets in %.2f s",
                    self.size, len(self.datasets), time.time() - start)

    @classmethod
    def from_components(cls, datasets, weights):
        """Blend the components that exist; Megatron drops empty splits (None or zero length)."""
        kept = [(d, w) for d, w in zip(datasets, weights) if d is not None and len(d) > 0]
        if not kept:
            return None
        if len(kept) < len(datasets):
            logger.warning(" > blending %d of %d datasets (the others have no samples in this "
                           "split)", len(kept), len(datasets))
        return cls([d for d, _ in kept], [w for _, w in kept])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx):
        dataset = int(self.dataset_index[idx])
        sample = int(self.dataset_sample_index[idx])
        if sample >= len(self.datasets[dataset]):
            raise IndexError(
                f"blend position {idx} asks for sample {sample} of component {dataset}, which holds "
                f"{len(self.datasets[dataset])}: the blend reached past the samples its weights "
                f"requested (train for fewer samples, or raise that component's weight)")
        return self.datasets[dataset][sample]
