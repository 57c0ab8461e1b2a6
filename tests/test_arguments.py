"""Data and tokenizer flags parse like Megatron's and are validated once."""
import argparse

import pytest

from ascendspeed.arguments import (DataConfig, TokenizerConfig, add_data_args, add_tokenizer_args,
                                   resolve_weighted_split_paths)
from ascendspeed.errors import ConfigError


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    add_tokenizer_args(parser)
    return resolve_weighted_split_paths(parser.parse_args(list(argv)))


def test_megatron_defaults():
    config = DataConfig.from_args(parse("--data-path", "x_text_document"))
    assert config.split == "969, 30, 1" and config.seq_length == 1024 and config.seed == 1234
    assert config.cutoff_last_epoch == 0.95 and config.dataloader_type == "single"
    assert config.data_path == ("x_text_document",)


def test_launch_script_data_flags():
    args = parse("--data-path", "0.3", "a", "0.7", "b", "--split", "949,50,1", "--seq-length",
                 "2048", "--seed", "42", "--data-impl", "mmap", "--cutoff-last-epoch", "0.8",
                 "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", "tok",
                 "--pad-vocab-size-to", "250880")
    data, tokenizer = DataConfig.from_args(args), TokenizerConfig.from_args(args)
    assert data.data_path == ("0.3", "a", "0.7", "b") and data.cutoff_last_epoch == 0.8
    assert tokenizer.pad_vocab_size_to == 250880 and tokenizer.make_vocab_size_divisible_by == 128


def test_weighted_split_paths_from_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("TRAIN: 1 0:1 a\n")
    args = parse("--train-weighted-split-paths-path", str(path))
    assert DataConfig.from_args(args).train_weighted_split_paths == ("TRAIN: 1 0:1 a",)


@pytest.mark.parametrize("argv,message", [
    (["--data-path", "a", "--train-weighted-split-paths", "T: 1 0:1 a"], "mutually exclusive"),
    (["--data-path", "a", "--seq-length", "0"], "--seq-length must be positive"),
    (["--data-path", "a", "--cutoff-last-epoch", "1.5"], "--cutoff-last-epoch"),
])
def test_bad_data_flags(argv, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig.from_args(parse(*argv))


@pytest.mark.parametrize("argv,message", [
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json"], "needs --merge-file"),
    (["--tokenizer-type", "PretrainedFromHF"], "needs --tokenizer-name-or-path"),
    (["--tokenizer-type", "SentencePieceTokenizer"], "needs --tokenizer-model"),
])
def test_bad_tokenizer_flags(argv, message):
    with pytest.raises(ConfigError, match=message):
        TokenizerConfig.from_args(parse(*argv))
