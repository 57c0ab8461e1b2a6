"""Index caches under torchrun: one process per node builds, the others wait, all agree."""
import os

import numpy as np
import pytest

import megatron_reference as ref
from launch import run_torchrun
from megatron_ext.indexed_dataset import MMapIndexedDataset

pytestmark = pytest.mark.multiprocess


def torchrun(nproc, script, *args, timeout=180):
    return run_torchrun(script, args, nproc, timeout=timeout)


def test_two_ranks_build_the_cache_once(megatron_fixture, tmp_path):
    result = torchrun(2, "tools/build_dataset_indices.py", "--data-path", megatron_fixture,
                      "--train-samples", "10000", "--valid-samples", "10", "--seq-length", "512",
                      "--data-cache-path", str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count(" > built train index mappings") == 1  # the other rank waited
    assert output.count("train: 10390 samples of 513 tokens") == 2  # ... and then loaded it
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    doc_idx = np.load(tmp_path / "meg-gpt2-openwebtext_text_document_train_indexmap_10000ns_512sl_1234s_doc_idx.npy")
    expected = ref.index_mappings(np.arange(969, dtype=np.int32),
                                  MMapIndexedDataset(megatron_fixture).sizes, 10000, 512, 1234, 0.95)
    assert np.array_equal(doc_idx, expected[0])


def test_bad_split_fails_every_rank_cleanly(megatron_fixture, tmp_path):
    result = torchrun(2, "tools/build_dataset_indices.py", "--data-path", megatron_fixture,
                      "--train-samples", "100", "--test-samples", "5",
                      "--data-cache-path", str(tmp_path))
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("less than one sample") == 2
