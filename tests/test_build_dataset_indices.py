"""tools/build_dataset_indices.py: bad input is a message and a non-zero exit."""
import os

import numpy as np
import pytest

from megatron_ext.indexed_dataset import MMapIndexedDatasetBuilder
from tools import build_dataset_indices


@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "corpus_text_document")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.RandomState(0)
    for _ in range(50):
        builder.add_item(rng.randint(0, 100, size=rng.randint(5, 40)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def run(capsys, *argv):
    code = build_dataset_indices.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_builds_and_reports(corpus, capsys):
    code, output = run(capsys, "--data-path", corpus, "--split", "90,10,0", "--seq-length", "16",
                       "--train-samples", "100", "--valid-samples", "5")
    assert code == 0 and "train: " in output and "samples of 17 tokens" in output
    assert os.path.exists(f"{corpus}_train_indexmap_100ns_16sl_1234s_doc_idx.npy")


@pytest.mark.parametrize("make_bad,message", [
    (lambda p: os.remove(p + ".bin"), "corpus_text_document.bin: data file not found"),
    (lambda p: os.remove(p + ".idx"), "corpus_text_document.idx: index file not found"),
    (lambda p: open(p + ".idx", "r+b").truncate(40), "truncated or corrupt"),
])
def test_broken_dataset_files(corpus, capsys, make_bad, message):
    make_bad(corpus)
    code, output = run(capsys, "--data-path", corpus, "--train-samples", "10", "--seq-length", "8")
    assert code != 0 and message in output


@pytest.mark.parametrize("data_path,message", [
    (["0.5", "{p}", "0.5"], "pairs 'WEIGHT PREFIX'"),
    (["half", "{p}", "1", "{p}"], "is not a number"),
    (["0", "{p}", "0", "{p}"], "sum to 0"),
])
def test_bad_data_path_lists(corpus, capsys, data_path, message):
    argv = ["--data-path", *[x.format(p=corpus) for x in data_path], "--train-samples", "10",
            "--seq-length", "8"]
    code, output = run(capsys, *argv)
    assert code != 0 and message in output


def test_split_too_small(corpus, capsys):
    code, output = run(capsys, "--data-path", corpus, "--split", "80,10,10", "--seq-length", "512",
                       "--train-samples", "10", "--test-samples", "5")
    assert code != 0 and "shorter --seq-length" in output


def test_weighted_split_paths_option_2(corpus, capsys):
    code, output = run(capsys, "--train-weighted-split-paths", f"TRAIN: 1 0:0.8 {corpus}, 2 0:0.8 {corpus}",
                       "--valid-weighted-split-paths", f"VALID: 1 0.8:1 {corpus}",
                       "--seq-length", "16", "--train-samples", "50", "--valid-samples", "5")
    assert code == 0, output
    assert "train: blend of 2 datasets" in output and "valid: " in output
    assert os.path.exists(f"{corpus}_VALID_indexmap_5ns_16sl_1234s_doc_idx.npy")
