"""Megatron-compatible flags, parsed once into typed, validated config objects.

Each group of flags has an `add_*_args(parser)` function and a frozen dataclass built from the
parsed namespace. Flag names, defaults and meanings follow Megatron-LM / Megatron-DeepSpeed so
that existing launch scripts keep working.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

TOKENIZER_TYPES = ("GPT2BPETokenizer", "PretrainedFromHF", "SentencePieceTokenizer",
                   "GPTSentencePieceTokenizer")


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag and what was expected."""


# ---------------------------------------------------------------------------------- tokenizer
@dataclass(frozen=True)
class TokenizerConfig:
    tokenizer_type: str
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_model: str | None = None
    vocab_extra_ids: int = 0
    make_vocab_size_divisible_by: int = 128
    pad_vocab_size_to: int | None = None

    def __post_init__(self):
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(f"--tokenizer-type {self.tokenizer_type!r}: expected one of "
                              f"{', '.join(TOKENIZER_TYPES)}")
        required = {"GPT2BPETokenizer": ("vocab_file", "merge_file"),
                    "PretrainedFromHF": ("tokenizer_name_or_path",),
                    "SentencePieceTokenizer": ("tokenizer_model",),
                    "GPTSentencePieceTokenizer": ("tokenizer_model",)}[self.tokenizer_type]
        for field in required:
            if getattr(self, field) is None:
                raise ConfigError(f"--tokenizer-type {self.tokenizer_type} needs "
                                  f"--{field.replace('_', '-')}")
        if self.make_vocab_size_divisible_by < 1:
            raise ConfigError("--make-vocab-size-divisible-by must be >= 1")
        if self.vocab_extra_ids < 0:
            raise ConfigError("--vocab-extra-ids must be >= 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TokenizerConfig":
        return cls(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                   merge_file=args.merge_file, tokenizer_name_or_path=args.tokenizer_name_or_path,
                   tokenizer_model=args.tokenizer_model, vocab_extra_ids=args.vocab_extra_ids,
                   make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                   pad_vocab_size_to=args.pad_vocab_size_to)


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", type=str, default=None, choices=TOKENIZER_TYPES)
    group.add_argument("--vocab-file", type=str, default=None, help="GPT-2 BPE vocab.json")
    group.add_argument("--merge-file", type=str, default=None, help="GPT-2 BPE merges.txt")
    group.add_argument("--tokenizer-name-or-path", type=str, default=None,
                       help="local Hugging Face tokenizer directory (PretrainedFromHF)")
    group.add_argument("--tokenizer-model", type=str, default=None, help="sentencepiece .model file")
    group.add_argument("--vocab-extra-ids", type=int, default=0)
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="pad the vocab to a multiple of this times the tensor-parallel size")
    group.add_argument("--pad-vocab-size-to", type=int, default=None,
                       help="pad the vocab to exactly this size (BLOOM: 250880)")
    return parser


# ---------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how the index mappings are built."""
    data_path: tuple[str, ...] | None = None
    split: str = "969, 30, 1"
    train_weighted_split_paths: tuple[str, ...] | None = None
    valid_weighted_split_paths: tuple[str, ...] | None = None
    test_weighted_split_paths: tuple[str, ...] | None = None
    seq_length: int = 1024
    seed: int = 1234
    cutoff_last_epoch: float = 0.95
    data_cache_path: str | None = None
    data_impl: str = "mmap"
    mmap_warmup: bool = False
    dataloader_type: str = "single"
    num_workers: int = 2

    def __post_init__(self):
        if self.data_path is not None and any(
                x is not None for x in (self.train_weighted_split_paths,
                                        self.valid_weighted_split_paths,
                                        self.test_weighted_split_paths)):
            raise ConfigError("--data-path/--split and --{train,valid,test}-weighted-split-paths "
                              "are mutually exclusive")
        if self.seq_length <= 0:
            raise ConfigError(f"--seq-length must be positive, got {self.seq_length}")
        if not 0.0 <= self.cutoff_last_epoch <= 1.0:
            raise ConfigError(f"--cutoff-last-epoch must be in [0, 1], got {self.cutoff_last_epoch}")
        if self.data_impl not in ("mmap", "infer"):
            raise ConfigError(f"--data-impl {self.data_impl!r}: only 'mmap' (or 'infer') can be used "
                              f"for GPT pretraining")
        if self.dataloader_type not in ("single", "cyclic"):
            raise ConfigError(f"--dataloader-type {self.dataloader_type!r}: expected single or cyclic")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataConfig":
        def tup(value):
            return tuple(value) if value is not None else None

        return cls(data_path=tup(args.data_path), split=args.split or "969, 30, 1",
                   train_weighted_split_paths=tup(args.train_weighted_split_paths),
                   valid_weighted_split_paths=tup(args.valid_weighted_split_paths),
                   test_weighted_split_paths=tup(args.test_weighted_split_paths),
                   seq_length=args.seq_length, seed=args.seed,
                   cutoff_last_epoch=args.cutoff_last_epoch,
                   data_cache_path=args.data_cache_path, data_impl=args.data_impl,
                   mmap_warmup=args.mmap_warmup, dataloader_type=args.dataloader_type,
                   num_workers=args.num_workers)


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="PREFIX, or WEIGHT1 PREFIX1 WEIGHT2 PREFIX2 ... for a blend")
    group.add_argument("--split", type=str, default=None,
                       help="train/valid/test proportions, e.g. '969, 30, 1' (the default)")
    for name in ("train", "valid", "test"):
        group.add_argument(f"--{name}-weighted-split-paths", nargs="*", default=None,
                           help="'NAME: W1 START:END PREFIX1, W2 START:END PREFIX2' (BigScience)")
        group.add_argument(f"--{name}-weighted-split-paths-path", type=str, default=None,
                           help=f"a file holding the --{name}-weighted-split-paths value")
    group.add_argument("--seq-length", type=int, default=1024)
    group.add_argument("--seed", type=int, default=1234)
    group.add_argument("--cutoff-last-epoch", type=float, default=0.95,
                       help="a last epoch holding fewer than this fraction of an epoch's samples is "
                            "shuffled separately (0.95 BigScience/BLOOM; 0.80 NVIDIA Megatron-LM "
                            "and AscendSpeed 2023)")
    group.add_argument("--data-cache-path", type=str, default=None,
                       help="directory for the index caches (default: next to the data)")
    group.add_argument("--data-impl", type=str, default="mmap", choices=("mmap", "infer"))
    group.add_argument("--mmap-warmup", action="store_true")
    group.add_argument("--dataloader-type", type=str, default="single", choices=("single", "cyclic"))
    group.add_argument("--num-workers", type=int, default=2)
    return parser


def resolve_weighted_split_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Read `--{name}-weighted-split-paths-path` files into their `--{name}-weighted-split-paths`."""
    for name in ("train", "valid", "test"):
        path = getattr(args, f"{name}_weighted_split_paths_path", None)
        if path is None:
            continue
        if getattr(args, f"{name}_weighted_split_paths") is not None:
            raise ConfigError(f"give --{name}-weighted-split-paths or its -path variant, not both")
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError as error:
            raise ConfigError(f"--{name}-weighted-split-paths-path {path}: {error}") from error
        setattr(args, f"{name}_weighted_split_paths", lines)
    return args
