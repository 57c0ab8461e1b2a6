"""Blended datasets: Megatron's 1.005 counts, greedy blending index, option-2 groups."""
import os

import numpy as np
import pytest

import megatron_reference as ref
from ascendspeed.data.blendable_dataset import BlendableDataset, parse_data_prefix
from ascendspeed.data.builders import (build_dataset_group, build_train_valid_test_datasets,
                                       parse_weighted_split_paths)
from ascendspeed.data.index_helpers import build_blending_indices
from ascendspeed.errors import DatasetError


def test_spec_blend_vector(megatron_fixture, tmp_path):
    p = megatron_fixture
    prefixes, weights, counts = parse_data_prefix(["0.3", p, "0.7", p], [3000, 50, 0])
    assert counts == [[905, 16, 0], [2111, 36, 0]]
    train, valid, test = build_train_valid_test_datasets(["0.3", p, "0.7", p], "969, 30, 1",
                                                         [3000, 50, 0], 512, 1234,
                                                         data_cache_path=str(tmp_path))
    assert len(train) == 5194 and train.dataset_index.dtype == np.uint8
    assert train.dataset_index[:12].tolist() == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]
    assert np.bincount(train.dataset_index).tolist() == [1558, 3636]
    assert len(test) == 2  # the 758-token test document gives one sample per component
    index, sample = ref.blending_indices(ref.blend_counts(["0.3", "0.7"], [0])[0], len(train))
    assert np.array_equal(train.dataset_index, index)
    assert np.array_equal(train.dataset_sample_index, sample)
    # Item s of the blend is item dataset_sample_index[s] of component dataset_index[s].
    for s in (0, 1, 2, 100, 2999):
        component = train.datasets[train.dataset_index[s]]
        assert np.array_equal(train[s]["text"], component[train.dataset_sample_index[s]]["text"])


def test_spec_weighted_counts():
    _, weights, counts = parse_data_prefix(["2", "a", "1", "b", "5", "c"], [30000, 600, 20])
    assert counts == [[7538, 151, 6], [3769, 76, 3], [18844, 377, 13]]
    assert weights == ref.blend_counts(["2", "1", "5"], [0])[0]


@pytest.mark.parametrize("weights,size", [([0.3, 0.7], 997), ([2, 1, 5], 3000),
                                          ([1e-3, 1, 1, 0.5], 4001), ([1], 10)])
def test_blending_indices_equal_reference(weights, size):
    normalized = np.array(weights, dtype=np.float64) / np.sum(weights)
    index, sample = build_blending_indices(normalized, size)
    want_index, want_sample = ref.blending_indices(weights, size)
    assert np.array_equal(index, want_index) and np.array_equal(sample, want_sample)


@pytest.mark.parametrize("data_path,message", [
    (["0.5", "a", "0.5"], "pairs 'WEIGHT PREFIX'"),
    (["x", "a", "1", "b"], "weight 'x' for a is not a number"),
    (["0", "a", "0", "b"], "sum to 0"),
    (["-1", "a", "2", "b"], ">= 0"),
    ([], "empty"),
])
def test_bad_data_path(data_path, message):
    with pytest.raises(DatasetError, match=message):
        parse_data_prefix(data_path, [10, 1, 1])


def test_reading_past_the_requested_blend_is_a_clear_error(megatron_fixture, tmp_path):
    train, _, _ = build_train_valid_test_datasets(["1", megatron_fixture, "3", megatron_fixture],
                                                  "969, 30, 1", [100, 0, 0], 1024, 1234,
                                                  data_cache_path=str(tmp_path))
    blend = BlendableDataset(train.datasets, [1e-6, 1.0])  # all of it asked of component 1
    with pytest.raises(IndexError, match="reached past the samples"):
        blend[len(blend) - 1]


def test_weighted_split_paths_group(megatron_fixture, tmp_path):
    p = megatron_fixture
    (group,) = parse_weighted_split_paths([f"OWT: 0.3 0:0.5 {p}, 0.7 0.5:1.0 {p}"],
                                          "--train-weighted-split-paths")
    name, weights, splits, paths = group
    assert name == "OWT" and weights == ["0.3", "0.7"] and splits == ["0:0.5", "0.5:1.0"]
    dataset = build_dataset_group(name, paths, weights, splits, [1000, 0, 0], 256, 1234, "train",
                                  data_cache_path=str(tmp_path))
    first, second = dataset.datasets
    assert first.doc_idx.min() == 0 and first.doc_idx.max() == 499
    assert second.doc_idx.min() == 500 and second.doc_idx.max() == 999
    assert os.path.exists(tmp_path / "meg-gpt2-openwebtext_text_document_OWT_indexmap_302ns_256sl_1234s_doc_idx.npy")
    assert os.path.exists(tmp_path / "meg-gpt2-openwebtext_text_document_OWT_indexmap_704ns_256sl_1234s_doc_idx.npy")
    want = ref.blending_indices([0.3, 0.7], len(dataset))[0]
    assert np.array_equal(dataset.dataset_index, want)


def test_weighted_split_paths_single_prefix(megatron_fixture, tmp_path):
    dataset = build_dataset_group("V", [megatron_fixture], ["1"], ["0.9:1"], [0, 20, 0], 256, 1234,
                                  "valid", data_cache_path=str(tmp_path))
    assert dataset.doc_idx.min() == 900 and len(dataset) >= 20


@pytest.mark.parametrize("value,message", [("no colon here", "expected 'NAME: WEIGHT"),
                                           ("N: 1 0:1", "each dataset must be")])
def test_bad_weighted_split_paths(value, message):
    with pytest.raises(DatasetError, match=message):
        parse_weighted_split_paths([value], "--valid-weighted-split-paths")


def test_only_one_train_group():
    with pytest.raises(DatasetError, match="only one dataset group"):
        parse_weighted_split_paths(["A: 1 0:1 x", "B: 1 0:1 y"], "--train-weighted-split-paths")
