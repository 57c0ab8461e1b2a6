"""Datasets from the data flags: `--data-path` (one prefix or a blend) and BigScience's
`--{train,valid,test}-weighted-split-paths` groups, split into (train, valid, test)."""
from __future__ import annotations

import logging

import numpy as np

from ascendspeed.data.blendable_dataset import BlendableDataset, parse_data_prefix
from ascendspeed.data.gpt_dataset import (BIGSCIENCE_CUTOFF_LAST_EPOCH, SPLIT_NAMES, GPTDataset,
                                          get_split_by_range_, get_train_valid_test_split_)
from ascendspeed.errors import DatasetError
from ascendspeed.progress import NoProgress
from megatron_ext.indexed_dataset import IndexedDatasetError, make_dataset

logger = logging.getLogger(__name__)


def _open_indexed_dataset(prefix: str, data_impl: str, skip_warmup: bool):
    try:
        return make_dataset(prefix, data_impl, skip_warmup)
    except IndexedDatasetError as error:  # megatron_ext knows nothing of our error hierarchy
        raise DatasetError(str(error)) from error


def build_train_valid_test_datasets(data_prefix, splits_string: str,
                                    train_valid_test_num_samples, seq_length: int, seed: int, *,
                                    data_impl: str = "mmap", skip_warmup: bool = True,
                                    cutoff_last_epoch: float = BIGSCIENCE_CUTOFF_LAST_EPOCH,
                                    data_cache_path: str | None = None, build_group=None,
                                    progress=NoProgress):
    """(train, valid, test) datasets for `--data-path PREFIX` or a blend `W1 P1 W2 P2 ...`;
    a split with no documents gives None. `progress`: shown each index build (ascendspeed.progress)."""
    options = dict(data_impl=data_impl, skip_warmup=skip_warmup, cutoff_last_epoch=cutoff_last_epoch,
                   data_cache_path=data_cache_path, build_group=build_group, progress=progress)
    prefixes, weights, per_dataset_num_samples = parse_data_prefix(
        data_prefix, train_valid_test_num_samples)
    if weights is None:
        return _build_splits(prefixes[0], splits_string, train_valid_test_num_samples, seq_length,
                             seed, **options)
    components = [_build_splits(prefix, splits_string, num_samples, seq_length, seed, **options)
                  for prefix, num_samples in zip(prefixes, per_dataset_num_samples)]
    return tuple(BlendableDataset.from_components([c[split] for c in components], weights)
                 for split in range(3))


def _build_splits(data_prefix: str, splits_string: str, train_valid_test_num_samples,
                  seq_length: int, seed: int, *, data_impl, skip_warmup, **options):
    indexed_dataset = _open_indexed_dataset(data_prefix, data_impl, skip_warmup)
    total = indexed_dataset.sizes.shape[0]  # GPT counts sequences, not doc_idx documents
    splits = get_train_valid_test_split_(splits_string, total)
    logger.info(" > dataset split of %s (%d sequences): %s", data_prefix, total,
                ", ".join(f"{n} [{splits[i]}, {splits[i + 1]})" for i, n in enumerate(SPLIT_NAMES)))
    datasets = []
    for index, name in enumerate(SPLIT_NAMES):
        dataset = None
        if splits[index + 1] > splits[index]:
            documents = np.arange(splits[index], splits[index + 1], dtype=np.int32)
            dataset = GPTDataset(name, data_prefix, documents, indexed_dataset,
                                 train_valid_test_num_samples[index], seq_length, seed, **options)
        datasets.append(dataset)
    return tuple(datasets)


def build_dataset_group(dataset_group_name: str, paths, weights, splits,
                        train_valid_test_num_samples, seq_length: int, seed: int,
                        train_valid_test: str, *, data_impl: str = "mmap",
                        skip_warmup: bool = True,
                        cutoff_last_epoch: float = BIGSCIENCE_CUTOFF_LAST_EPOCH,
                        data_cache_path: str | None = None, build_group=None,
                        progress=NoProgress):
    """One named group of BigScience's `--{train,valid,test}-weighted-split-paths`:
    each prefix contributes documents [round(START*N), round(END*N)) and the group is blended."""
    index = SPLIT_NAMES.index(train_valid_test)
    options = dict(cutoff_last_epoch=cutoff_last_epoch, data_cache_path=data_cache_path,
                   build_group=build_group, progress=progress)

    def single(prefix, range_string, num_samples):
        indexed_dataset = _open_indexed_dataset(prefix, data_impl, skip_warmup)
        start, end = get_split_by_range_(range_string, indexed_dataset.sizes.shape[0])
        if end <= start:
            return None
        documents = np.arange(start, end, dtype=np.int32)
        return GPTDataset(dataset_group_name, prefix, documents, indexed_dataset,
                          num_samples[index], seq_length, seed, **options)

    if len(paths) == 1:
        return single(paths[0], splits[0], train_valid_test_num_samples)
    data_prefix = [item for pair in zip(weights, paths) for item in pair]
    prefixes, normalized, per_dataset = parse_data_prefix(data_prefix, train_valid_test_num_samples)
    datasets = [single(p, s, n) for p, s, n in zip(prefixes, splits, per_dataset)]
    return BlendableDataset.from_components(datasets, normalized)


def parse_weighted_split_paths(values, flag: str):
    """BigScience's 'NAME: W1 S1:E1 P1, W2 S2:E2 P2' -> [(name, weights, splits, paths)]."""
    groups = []
    for value in values:
        if ":" not in value:
            raise DatasetError(f"{flag} {value!r}: expected 'NAME: WEIGHT START:END PREFIX, ...'")
        name, rest = value.split(":", 1)
        weights, splits, paths = [], [], []
        for entry in rest.split(","):
            parts = entry.split()
            if len(parts) != 3:
                raise DatasetError(f"{flag} {value!r}: each dataset must be 'WEIGHT "
                                         f"START:END PREFIX', got {entry.strip()!r}")
            weights.append(parts[0])
            splits.append(parts[1])
            paths.append(parts[2])
        groups.append((name.strip(), weights, splits, paths))
    if flag.startswith("--train") and len(groups) > 1:
        raise DatasetError(f"{flag}: only one dataset group is allowed for training")
    return groups


def build_datasets(config, train_valid_test_num_samples, build_group=None, progress=NoProgress):
    """(train, valid, test) for a DataConfig: `--data-path` (one prefix or a blend) or BigScience's
    `--{train,valid,test}-weighted-split-paths` groups. With several groups for a split, that
    split is a list of datasets. `progress`: shown each index build (ascendspeed.progress)."""
    options = dict(data_impl=config.data_impl, skip_warmup=not config.mmap_warmup,
                   cutoff_last_epoch=config.cutoff_last_epoch,
                   data_cache_path=config.data_cache_path, build_group=build_group,
                   progress=progress)
    if config.data_path:
        return build_train_valid_test_datasets(list(config.data_path), config.split,
                                               train_valid_test_num_samples, config.seq_length,
                                               config.seed, **options)
    datasets = []
    for split in SPLIT_NAMES:
        values = getattr(config, f"{split}_weighted_split_paths")
        groups = parse_weighted_split_paths(values, f"--{split}-weighted-split-paths") if values else []
        built = [build_dataset_group(name, paths, weights, splits, train_valid_test_num_samples,
                                     config.seq_length, config.seed, split, **options)
                 for name, weights, splits, paths in groups]
        datasets.append(built[0] if len(built) == 1 else (built or None))
    return tuple(datasets)
