"""Megatron-compatible flags, parsed once into typed, validated config objects.

Each group of flags has an `add_*_args(parser)` function and a frozen dataclass built from the
parsed namespace. Flag names, defaults and meanings follow Megatron-LM / Megatron-DeepSpeed so
that existing launch scripts keep working.
"""
from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass

from ascendspeed.core.pipeline_parallel.partition import validate_pretrain_config
from ascendspeed.errors import ConfigError
from ascendspeed.microbatches import NumMicroBatchesCalculator, train_iters_with_rampup

TOKENIZER_TYPES = ("GPT2BPETokenizer", "PretrainedFromHF", "SentencePieceTokenizer",
                   "GPTSentencePieceTokenizer")


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


# ================================================================================== the trainer
# Everything below serves `pretrain_bloom.py`: one parser with Megatron-LM / Megatron-DeepSpeed
# flag names and defaults, and `PretrainConfig.from_args(args, world_size)`, which turns the parsed
# namespace into frozen, validated dataclasses once. Modules take the pieces they need.

POSITION_EMBEDDING_TYPES = ("absolute", "rotary", "alibi")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("model")
    group.add_argument("--num-layers", type=int, default=None)
    group.add_argument("--hidden-size", type=int, default=None)
    group.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 * hidden size")
    group.add_argument("--num-attention-heads", type=int, default=None)
    group.add_argument("--max-position-embeddings", type=int, default=None,
                       help="default: --seq-length (ALiBi has no position table)")
    group.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    group.add_argument("--hidden-dropout", type=float, default=0.1)
    group.add_argument("--attention-dropout", type=float, default=0.1)
    group.add_argument("--init-method-std", type=float, default=0.02)
    group.add_argument("--embed-layernorm", action="store_true",
                       help="LayerNorm after the word embeddings (BLOOM)")
    group.add_argument("--position-embedding-type", type=str, default="absolute",
                       choices=POSITION_EMBEDDING_TYPES,
                       help="Megatron-DeepSpeed's default is 'absolute'; BLOOM needs 'alibi'")
    return parser


def add_parallel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    group.add_argument("--pp-partition-method", type=str, default=None,
                       help="pipeline stage partitioning, e.g. 'type:transformer|embedding'")
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--distributed-backend", type=str, default=None,
                       help="gloo, nccl, hccl or a device map (cpu:gloo,cuda:nccl); default: the "
                            "device's. Host tensors always travel over cpu:gloo")
    group.add_argument("--use-distributed-optimizer", action="store_true",
                       help="ZeRO-1: optimizer state and fp32 master weights sharded over DP")
    group.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                       help="bound on every collective and group creation (default 10, as "
                            "Megatron-LM); a stopped or dead rank then fails the job")
    group.add_argument("--DDP-impl", dest="ddp_impl", type=str, default="local",
                       choices=("local", "torch"),
                       help="both run the bucketed gradient all-reduce of ascendspeed.optimizer")
    group.add_argument("--no-contiguous-buffers-in-local-ddp", action="store_true",
                       help="accepted; gradients always live in one contiguous fp32 buffer")
    group.add_argument("--overlap-grad-reduce", dest="overlap_grad_reduce", action="store_true",
                       default=True, help="start each bucket's reduction during backward (default)")
    group.add_argument("--no-overlap-grad-reduce", dest="overlap_grad_reduce", action="store_false")
    group.add_argument("--ddp-bucket-size", type=int, default=None,
                       help="elements per gradient bucket; default max(40M, 1M x DP)")
    group.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                       help="set by torch.distributed.launch; torchrun uses LOCAL_RANK instead")
    return parser


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, default=None)
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="default: micro batch size * data-parallel size")
    group.add_argument("--rampup-batch-size", nargs="*", default=None,
                       help="START INCREMENT SAMPLES (Megatron's batch-size ramp-up)")
    group.add_argument("--train-iters", type=int, default=None)
    group.add_argument("--train-samples", type=int, default=None)
    group.add_argument("--eval-interval", type=int, default=1000)
    group.add_argument("--eval-iters", type=int, default=100)
    group.add_argument("--exit-interval", type=int, default=None,
                       help="exit after the iteration that is a multiple of this")
    group.add_argument("--exit-duration-in-mins", type=int, default=None)
    group.add_argument("--exit-signal-handler", action="store_true")
    group.add_argument("--kill-switch-path", default=None, metavar="FILE",
                       help="when FILE exists, save (with --save) and exit 0 at the next iteration")
    group.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                       action="store_true", default=True,
                       help="stop at a non-finite loss or gradient norm, before the step (default)")
    group.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                       action="store_false")
    group.add_argument("--heartbeat-file", default=None, metavar="FILE",
                       help="the job's status file for tools/pulse.py (default: SAVE/heartbeat.json)")
    group.add_argument("--clip-grad", type=float, default=1.0,
                       help="global gradient-norm clipping (0 disables)")
    group.add_argument("--fp16", action="store_true")
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--loss-scale", type=float, default=None, help="static loss scale (fp16)")
    group.add_argument("--initial-loss-scale", type=float, default=2 ** 32)
    group.add_argument("--min-loss-scale", type=float, default=1.0)
    group.add_argument("--loss-scale-window", type=float, default=1000)
    group.add_argument("--hysteresis", type=int, default=2)
    group.add_argument("--checkpoint-activations", action="store_true")
    group.add_argument("--recompute-activations", action="store_true")
    group.add_argument("--recompute-granularity", type=str, default=None,
                       choices=("full", "selective"))
    group.add_argument("--peak-flops", type=float, default=None,
                       help="peak FLOP/s of one device (e.g. 312e12), for the MFU in the log line; "
                            "default: no MFU")
    return parser


def add_kernel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("fused kernels (each has its plain PyTorch reference)")
    group.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                       help="run every op's plain PyTorch reference instead of its fused kernel")
    group.add_argument("--no-fused-cross-entropy", dest="fused_cross_entropy",
                       action="store_false",
                       help="the fp32-copy cross entropy instead of the chunked one that reads the "
                            "logits in their dtype")
    group.add_argument("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false",
                       help="(Megatron's flag) the written-out bias + BLOOM GeLU instead of the "
                            "fused one that saves only its input")
    group.add_argument("--no-fused-attention", "--no-masked-softmax-fusion", dest="fused_attention",
                       action="store_false",
                       help="SDPA with an additive ALiBi bias instead of the fused causal ALiBi "
                            "kernel (Megatron's --no-masked-softmax-fusion means the same here)")
    group.add_argument("--no-fused-optimizer", dest="fused_optimizer", action="store_false",
                       help="foreach AdamW and a per-gradient inf check instead of fused AdamW "
                            "and one fused unscale + inf check")
    return parser


def add_optimizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("optimizer and learning rate")
    group.add_argument("--optimizer", type=str, default="adam", choices=("adam", "sgd"),
                       help="'adam' is AdamW (decoupled weight decay), as in Megatron")
    group.add_argument("--lr", type=float, default=None)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument("--lr-decay-style", type=str, default="linear", choices=LR_DECAY_STYLES)
    group.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    group.add_argument("--lr-decay-samples", type=int, default=None,
                       help="default: --train-samples")
    group.add_argument("--lr-warmup-fraction", type=float, default=None,
                       help="warm-up as a fraction of the decay steps")
    group.add_argument("--lr-warmup-iters", type=int, default=0)
    group.add_argument("--lr-warmup-samples", type=int, default=0)
    group.add_argument("--lr-warmup-init", type=float, default=0.0,
                       help="learning rate at the start of the warm-up")
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.999)
    group.add_argument("--adam-eps", type=float, default=1e-08)
    return parser


def add_checkpointing_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save", type=str, default=None)
    group.add_argument("--save-interval", type=int, default=None)
    group.add_argument("--load", type=str, default=None)
    group.add_argument("--no-load-optim", action="store_true", default=None)
    group.add_argument("--no-load-rng", action="store_true", default=None)
    group.add_argument("--finetune", action="store_true",
                       help="load the model only: iteration 0, fresh optimizer, RNG and data")
    group.add_argument("--use-checkpoint-args", action="store_true",
                       help="take the model's shape flags from the --load checkpoint")
    group.add_argument("--no-save-optim", action="store_true", default=None)
    group.add_argument("--no-save-rng", action="store_true", default=None)
    return parser


def add_logging_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", type=int, default=100)
    group.add_argument("--tensorboard-dir", type=str, default=None)
    group.add_argument("--tensorboard-queue-size", type=int, default=1000)
    group.add_argument("--log-timers-to-tensorboard", action="store_true")
    group.add_argument("--log-batch-size-to-tensorboard", action="store_true")
    group.add_argument("--log-validation-ppl-to-tensorboard", action="store_true")
    group.add_argument("--no-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard",
                       action="store_false")
    return parser


def add_deepspeed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("deepspeed (compatibility)")
    group.add_argument("--deepspeed", action="store_true",
                       help="accepted: with ZeRO stage 0 and fp32 it is plain data parallelism")
    group.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                       type=str, default=None, help="ds_config.json; read and checked")
    group.add_argument("--zero-stage", type=int, default=None,
                       help="default: the ds_config's zero_optimization.stage, else 0")
    group.add_argument("--deepspeed-activation-checkpointing", action="store_true")
    return parser


def add_generation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("text generation")
    group.add_argument("--out-seq-length", type=int, default=1024,
                       help="tokens to generate per prompt (Megatron-DeepSpeed's meaning), "
                            "unless --max-new-tokens is given")
    group.add_argument("--max-new-tokens", type=int, default=None,
                       help="tokens to generate per prompt (overrides --out-seq-length)")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=0.0,
                       help="nucleus sampling in (0, 1]; 0 = off")
    group.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0,
                       help="sample among the k most likely tokens; 0 = off, 1 = greedy")
    group.add_argument("--greedy", action="store_true")
    group.add_argument("--recompute", action="store_true",
                       help="recompute all attention for every generated token instead of "
                            "keeping a key/value cache")
    group.add_argument("--prompt", action="append", default=None,
                       help="a prompt (repeatable); without prompts or --sample-input-file, "
                            "prompts are read from stdin")
    group.add_argument("--sample-input-file", type=str, default=None,
                       help="UTF-8 text file, one prompt per line")
    group.add_argument("--sample-output-file", type=str, default=None,
                       help="JSON lines: {\"prompt\", \"text\", \"token_ids\"} per prompt")
    group.add_argument("--stop", action="append", default=None,
                       help="stop a sequence when its generated text contains this string "
                            "(repeatable; the text is cut before it)")
    return parser


def build_parser(extra_args_provider=None) -> argparse.ArgumentParser:
    """Every flag of the launch scripts; `extra_args_provider(parser)` may add more (Megatron)."""
    parser = argparse.ArgumentParser(description="AscendSpeed BLOOM pretraining",
                                     allow_abbrev=False)
    for add in (add_model_args, add_parallel_args, add_training_args, add_optimizer_args,
                add_checkpointing_args, add_logging_args, add_data_args, add_tokenizer_args,
                add_deepspeed_args, add_generation_args, add_kernel_args):
        add(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser) or parser
    return parser


def parse_args(argv=None, extra_args_provider=None,
               ignore_unknown_args: bool = False) -> argparse.Namespace:
    """Parse the flags (`sys.argv[1:]` when argv is None). An unknown flag exits with argparse's
    usage error unless `ignore_unknown_args`. No validation here: see PretrainConfig.from_args."""
    parser = build_parser(extra_args_provider)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    return resolve_weighted_split_paths(args)


# ---------------------------------------------------------------------------------- refusals
def _ds_section(ds: dict | None, *names: str) -> dict:
    for name in names:
        section = (ds or {}).get(name)
        if isinstance(section, dict):
            return section
    return {}


def _ds_zero_stage(ds: dict | None) -> int:
    return int(_ds_section(ds, "zero_optimization").get("stage", 0) or 0)


# Flags (and ds_config settings) that parse, so that today's launch scripts get through the
# parser, but whose feature has not landed. Each entry is (flag, test); the test returns something
# true (a string adds detail) when the namespace asks for the feature. PretrainConfig.from_args
# refuses every one that is set, in one message. Remove an entry in the change that lands it.
_ZERO_2_3 = "ZeRO stage 2/3 is not supported; stage 1 = --use-distributed-optimizer"

NOT_YET_SUPPORTED = (
    ("--zero-stage", lambda a, ds: (a.zero_stage or 0) > 1 and f"got {a.zero_stage}; {_ZERO_2_3}"),
    ("--deepspeed_config zero_optimization.stage",
     lambda a, ds: _ds_zero_stage(ds) > 1 and f"got {_ds_zero_stage(ds)}; {_ZERO_2_3}"),
    ("--deepspeed_config optimizer/scheduler sections",
     lambda a, ds: any(k in (ds or {}) for k in ("optimizer", "scheduler"))
     and "the optimizer and schedule come from the flags"),
    ("--optimizer", lambda a, ds: a.optimizer != "adam" and f"got {a.optimizer}; runs adam"),
)

# Flags accepted with no effect on pretraining; PretrainConfig.notices says so, for the log.
ACCEPTED_WITHOUT_EFFECT = (
    ("--log-timers-to-tensorboard", lambda a: a.log_timers_to_tensorboard,
     "no timers are written to TensorBoard yet"),
    ("--deepspeed", lambda a: a.deepspeed,
     "no DeepSpeed engine: ZeRO stage 0 in fp32 is plain data parallelism"),
    ("--out-seq-length/--temperature/--top_p/--top_k/--greedy/--recompute",
     lambda a: (a.out_seq_length, a.temperature, a.top_p, a.top_k, a.greedy, a.recompute)
     != (1024, 1.0, 0.0, 0, False, False) or any(getattr(a, name, None) is not None for name in (
         "max_new_tokens", "prompt", "sample_input_file", "sample_output_file", "stop")),
     "text-generation flags; no effect on pretraining"),
)


def refuse_unsupported(args: argparse.Namespace, ds_config: dict | None = None) -> None:
    """ConfigError listing every flag in NOT_YET_SUPPORTED that `args` sets."""
    lines = []
    for flag, test in NOT_YET_SUPPORTED:
        detail = test(args, ds_config)
        if detail:
            extra = f" ({detail})" if isinstance(detail, str) else ""
            lines.append(f"{flag}: not yet supported in this version{extra}")
    if lines:
        raise ConfigError("\n".join(lines))


def read_deepspeed_config(path: str) -> dict:
    """The ds_config JSON as a dict; a clear ConfigError naming the file otherwise."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError as error:
        raise ConfigError(f"--deepspeed_config {path}: file not found") from error
    except OSError as error:
        raise ConfigError(f"--deepspeed_config {path}: cannot read ({error})") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON (line {error.lineno}, "
                          f"column {error.colno}: {error.msg})") from error
    if not isinstance(config, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object, got "
                          f"{type(config).__name__}")
    return config


def _check_deepspeed_config(path: str, ds: dict, *, micro_batch_size: int, global_batch_size: int,
                            num_microbatches: int, clip_grad: float,
                            zero_stage: int | None) -> None:
    """The ds_config's batch sizes, clipping and ZeRO stage must agree with the flags."""
    expected = {"train_micro_batch_size_per_gpu": ("--micro-batch-size", micro_batch_size),
                "train_batch_size": ("--global-batch-size", global_batch_size),
                "gradient_accumulation_steps": ("--global-batch-size / (--micro-batch-size * "
                                                "data-parallel size)", num_microbatches),
                "gradient_clipping": ("--clip-grad", clip_grad)}
    for key, (flag, value) in expected.items():
        if key in ds:
            given = ds[key]
            if not isinstance(given, (int, float)) or isinstance(given, bool) or given != value:
                raise ConfigError(f"--deepspeed_config {path}: {key} is {given!r} but {flag} "
                                  f"gives {value}")
    if zero_stage is not None and "stage" in _ds_section(ds, "zero_optimization") \
            and _ds_zero_stage(ds) != zero_stage:
        raise ConfigError(f"--deepspeed_config {path}: zero_optimization.stage is "
                          f"{_ds_zero_stage(ds)} but --zero-stage is {zero_stage}")


# ---------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    ffn_hidden_size: int | None = None  # None -> 4 * hidden_size
    max_position_embeddings: int | None = None  # None -> seq_length
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    embed_layernorm: bool = False
    position_embedding_type: str = "absolute"  # the parser's (Megatron's) default; refused below
    recompute_granularity: str | None = None  # None | "full" | "selective"

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.max_position_embeddings is None:
            object.__setattr__(self, "max_position_embeddings", self.seq_length)
        for flag, value in (("--num-layers", self.num_layers), ("--hidden-size", self.hidden_size),
                            ("--num-attention-heads", self.num_attention_heads),
                            ("--ffn-hidden-size", self.ffn_hidden_size),
                            ("--seq-length", self.seq_length),
                            ("--max-position-embeddings", self.max_position_embeddings)):
            if value is None or value <= 0:
                raise ConfigError(f"{flag} must be a positive integer, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} is not divisible by "
                              f"--num-attention-heads {self.num_attention_heads}")
        if self.seq_length > self.max_position_embeddings:
            raise ConfigError(f"--seq-length {self.seq_length} is larger than "
                              f"--max-position-embeddings {self.max_position_embeddings}")
        if self.position_embedding_type != "alibi":
            raise ConfigError(f"--position-embedding-type {self.position_embedding_type}: BLOOM "
                              f"uses ALiBi; pass --position-embedding-type alibi")
        for flag, value in (("--hidden-dropout", self.hidden_dropout),
                            ("--attention-dropout", self.attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{flag} must be in [0, 1), got {value}")
        if self.layernorm_epsilon <= 0:
            raise ConfigError(f"--layernorm-epsilon must be positive, got {self.layernorm_epsilon}")
        if self.init_method_std <= 0:
            raise ConfigError(f"--init-method-std must be positive, got {self.init_method_std}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelConfig":
        for flag in ("num_layers", "hidden_size", "num_attention_heads"):
            if getattr(args, flag) is None:
                raise ConfigError(f"--{flag.replace('_', '-')} is required")
        return cls(num_layers=args.num_layers, hidden_size=args.hidden_size,
                   num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                   ffn_hidden_size=args.ffn_hidden_size,
                   max_position_embeddings=args.max_position_embeddings,
                   layernorm_epsilon=args.layernorm_epsilon, hidden_dropout=args.hidden_dropout,
                   attention_dropout=args.attention_dropout, init_method_std=args.init_method_std,
                   embed_layernorm=args.embed_layernorm,
                   position_embedding_type=args.position_embedding_type,
                   recompute_granularity=recompute_granularity(args))


def recompute_granularity(args: argparse.Namespace) -> str | None:
    """Megatron-DeepSpeed's --checkpoint-activations means full recompute; Megatron-LM's
    --recompute-activations means selective. --deepspeed-activation-checkpointing only picks an
    implementation in Megatron-DeepSpeed, so on its own it recomputes nothing (as there)."""
    if args.recompute_granularity is not None:
        return args.recompute_granularity
    if args.checkpoint_activations:
        return "full"
    if args.recompute_activations:
        return "selective"
    return None


# ---------------------------------------------------------------------------------- parallelism
@dataclass(frozen=True)
class ParallelConfig:
    world_size: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    distributed_backend: str | None = None  # None: the device's (ascendspeed.device)
    num_layers_per_virtual_pipeline_stage: int | None = None  # the interleaved schedule
    pp_partition_method: str | None = None  # None: even; 'type:transformer|embedding'
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False  # ZeRO-1 (also --zero-stage 1)
    overlap_grad_reduce: bool = True
    ddp_bucket_size: int | None = None  # elements; None: max(40M, 1M x DP)
    distributed_timeout_minutes: float = 10.0  # every collective and group creation

    def __post_init__(self):
        for flag, value in (("world size", self.world_size),
                            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
                            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.world_size % model_parallel:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} = {model_parallel}")
        if self.distributed_backend is not None:
            from ascendspeed import device  # here: importing this module needs no torch

            device.check_backend(self.distributed_backend)  # its fit to the device: at init
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ConfigError(f"--ddp-bucket-size must be >= 1, got {self.ddp_bucket_size}")
        if not 0 < self.distributed_timeout_minutes < float("inf"):
            raise ConfigError(f"--distributed-timeout-minutes must be a positive number of "
                              f"minutes, got {self.distributed_timeout_minutes}")

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size
                                   * self.pipeline_model_parallel_size)

    @property
    def distributed_timeout(self) -> datetime.timedelta:
        return datetime.timedelta(minutes=self.distributed_timeout_minutes)

    @property
    def bucket_size(self) -> int:
        """Elements per gradient bucket (Megatron-core's default)."""
        return self.ddp_bucket_size or max(40_000_000, 1_000_000 * self.data_parallel_size)

    @classmethod
    def from_args(cls, args: argparse.Namespace, world_size: int,
                  ds: dict | None = None) -> "ParallelConfig":
        zero_stage = args.zero_stage if args.zero_stage is not None else _ds_zero_stage(ds)
        sequence_parallel = bool(args.sequence_parallel) and args.tensor_model_parallel_size > 1
        return cls(world_size=world_size,
                   tensor_model_parallel_size=args.tensor_model_parallel_size,
                   pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                   distributed_backend=args.distributed_backend,
                   num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
                   pp_partition_method=args.pp_partition_method,
                   sequence_parallel=sequence_parallel,
                   use_distributed_optimizer=bool(args.use_distributed_optimizer) or zero_stage == 1,
                   overlap_grad_reduce=args.overlap_grad_reduce,
                   ddp_bucket_size=args.ddp_bucket_size,
                   distributed_timeout_minutes=args.distributed_timeout_minutes)


# ---------------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = None
    save_interval: int | None = None
    load: str | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    finetune: bool = False
    exit_signal_handler: bool = False  # SIGTERM/SIGINT: save (with --save), then exit

    def __post_init__(self):
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError(f"--save-interval must be >= 1, got {self.save_interval}")
        if self.save_interval is not None and self.save is None:
            raise ConfigError("--save-interval needs --save DIR")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CheckpointConfig":
        return cls(save=args.save, save_interval=args.save_interval, load=args.load,
                   no_load_optim=bool(args.no_load_optim), no_load_rng=bool(args.no_load_rng),
                   no_save_optim=bool(args.no_save_optim), no_save_rng=bool(args.no_save_rng),
                   finetune=bool(args.finetune), exit_signal_handler=bool(args.exit_signal_handler))


# ---------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainingConfig:
    """Batch sizes, length of the run, evaluation, exit and logging.

    `train_iters` is always set: with --train-samples it is train_samples // global_batch_size, as
    Megatron's update_train_iters does without ramp-up; `train_samples` keeps what was given."""
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    train_iters: int
    train_samples: int | None = None
    rampup_batch_size: tuple[int, int, int] | None = None  # START INCREMENT SAMPLES
    eval_interval: int = 1000
    eval_iters: int = 100
    exit_interval: int | None = None
    exit_duration_in_mins: int | None = None
    seed: int = 1234
    clip_grad: float = 1.0
    log_interval: int = 100
    tensorboard_dir: str | None = None
    tensorboard_queue_size: int = 1000
    log_batch_size_to_tensorboard: bool = False
    log_validation_ppl_to_tensorboard: bool = False
    log_loss_scale_to_tensorboard: bool = True
    peak_flops: float | None = None  # FLOP/s of one device; None: no MFU
    check_for_nan_in_loss_and_grad: bool = True  # stop before a step on a non-finite loss/grad norm
    kill_switch_path: str | None = None  # the file whose existence stops the run cleanly
    heartbeat_file: str | None = None  # None: SAVE/heartbeat.json when saving, else none

    def __post_init__(self):
        for flag, value in (("--micro-batch-size", self.micro_batch_size),
                            ("--global-batch-size", self.global_batch_size),
                            ("number of micro-batches", self.num_microbatches),
                            ("--eval-interval", self.eval_interval),
                            ("--log-interval", self.log_interval),
                            ("--tensorboard-queue-size", self.tensorboard_queue_size)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.global_batch_size % (self.micro_batch_size * self.num_microbatches):
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not "
                              f"{self.num_microbatches} micro-batches of --micro-batch-size "
                              f"{self.micro_batch_size} per data-parallel rank")
        if self.train_iters < 1:
            raise ConfigError(f"the run has no iteration: --train-iters {self.train_iters}"
                              + (f" (--train-samples {self.train_samples} // --global-batch-size "
                                 f"{self.global_batch_size})" if self.train_samples else ""))
        if self.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0, got {self.eval_iters}")
        for flag, value in (("--exit-interval", self.exit_interval),
                            ("--exit-duration-in-mins", self.exit_duration_in_mins)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.clip_grad < 0:
            raise ConfigError(f"--clip-grad must be >= 0 (0 disables), got {self.clip_grad}")
        if self.peak_flops is not None:
            if self.peak_flops < 1e9:
                raise ConfigError(f"--peak-flops {self.peak_flops:g}: give FLOP/s per device "
                                  f"(e.g. 312e12 for 312 TFLOP/s), not TFLOP/s")

    @property
    def data_parallel_size(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_microbatches)

    def train_valid_test_num_samples(self) -> tuple[int, int, int]:
        """Samples each split must provide (Megatron's build_train_valid_test_data_iterators)."""
        train = self.train_samples or self.train_iters * self.global_batch_size
        eval_iters = (self.train_iters // self.eval_interval + 1) * self.eval_iters
        return train, eval_iters * self.global_batch_size, self.eval_iters * self.global_batch_size

    @classmethod
    def from_args(cls, args: argparse.Namespace, data_parallel_size: int) -> "TrainingConfig":
        if args.micro_batch_size is None:
            raise ConfigError("--micro-batch-size is required")
        micro = args.micro_batch_size
        if micro < 1:
            raise ConfigError(f"--micro-batch-size must be >= 1, got {micro}")
        global_batch = args.global_batch_size
        if global_batch is None:
            global_batch = micro * data_parallel_size
        if global_batch < 1 or global_batch % (micro * data_parallel_size):
            raise ConfigError(
                f"--global-batch-size {global_batch} is not divisible by --micro-batch-size "
                f"{micro} x data-parallel size {data_parallel_size} = {micro * data_parallel_size}")
        if args.train_iters is not None and args.train_samples is not None:
            raise ConfigError(f"--train-iters {args.train_iters} and --train-samples "
                              f"{args.train_samples}: give exactly one")
        if args.train_iters is None and args.train_samples is None:
            raise ConfigError("give --train-iters or --train-samples (the length of the run)")
        rampup = None
        if args.rampup_batch_size is not None:
            try:
                rampup = tuple(int(v) for v in args.rampup_batch_size)
            except ValueError:
                rampup = ()
            if len(rampup) != 3:
                raise ConfigError(f"--rampup-batch-size {' '.join(args.rampup_batch_size)}: expected "
                                  f"three integers START INCREMENT SAMPLES, e.g. 192 16 9_765_625")
            if args.train_samples is None:
                raise ConfigError("--rampup-batch-size needs --train-samples (not --train-iters), as "
                                  "in Megatron: iterations follow from the ramp")
        if args.train_samples is not None:
            if args.train_samples < 1:
                raise ConfigError(f"--train-samples must be >= 1, got {args.train_samples}")
            train_iters = args.train_samples // global_batch
            if rampup is not None:
                try:
                    calculator = NumMicroBatchesCalculator(global_batch, micro, data_parallel_size,
                                                           rampup)
                except ValueError as error:
                    raise ConfigError(str(error)) from None
                train_iters = train_iters_with_rampup(args.train_samples, calculator)
        else:
            train_iters = args.train_iters
        return cls(micro_batch_size=micro, global_batch_size=global_batch,
                   num_microbatches=global_batch // (micro * data_parallel_size),
                   train_iters=train_iters, train_samples=args.train_samples,
                   rampup_batch_size=rampup,
                   eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                   exit_interval=args.exit_interval,
                   exit_duration_in_mins=args.exit_duration_in_mins, seed=args.seed,
                   clip_grad=args.clip_grad, log_interval=args.log_interval,
                   tensorboard_dir=args.tensorboard_dir,
                   tensorboard_queue_size=args.tensorboard_queue_size,
                   log_batch_size_to_tensorboard=args.log_batch_size_to_tensorboard,
                   log_validation_ppl_to_tensorboard=args.log_validation_ppl_to_tensorboard,
                   log_loss_scale_to_tensorboard=args.log_loss_scale_to_tensorboard,
                   peak_flops=args.peak_flops,
                   check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad,
                   kill_switch_path=args.kill_switch_path, heartbeat_file=args.heartbeat_file)


# ---------------------------------------------------------------------------------- optimizer
@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (`--optimizer adam`); weight decay skips biases and norms (optimizer/param_groups)."""
    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    optimizer: str = "adam"

    def __post_init__(self):
        if self.optimizer != "adam":
            raise ConfigError(f"--optimizer {self.optimizer}: not yet supported in this version")
        if self.lr < 0:
            raise ConfigError(f"--lr must be >= 0, got {self.lr}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for flag, value in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{flag} must be in [0, 1), got {value}")
        if self.adam_eps <= 0:
            raise ConfigError(f"--adam-eps must be positive, got {self.adam_eps}")

    @property
    def betas(self) -> tuple[float, float]:
        return self.adam_beta1, self.adam_beta2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OptimizerConfig":
        if args.lr is None:
            raise ConfigError("--lr is required")
        return cls(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                   adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                   adam_eps=args.adam_eps, optimizer=args.optimizer)


# ---------------------------------------------------------------------------------- lr schedule
@dataclass(frozen=True)
class LRScheduleConfig:
    """The learning-rate schedule as the flags gave it, and resolved into scheduler steps.

    As in Megatron-LM, scheduler steps are samples in both modes: iteration-based flags are
    multiplied by the global batch size, and the scheduler advances by the global batch size
    each iteration (`step(increment=global_batch_size)`). `decay_iters` / `decay_samples` hold
    Megatron's resolved values (default: the length of the run)."""
    style: str
    warmup_steps: float
    decay_steps: float
    warmup_init: float = 0.0
    warmup_iters: int = 0
    warmup_samples: int = 0
    warmup_fraction: float | None = None
    decay_iters: int | None = None
    decay_samples: int | None = None

    def __post_init__(self):
        if self.style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {self.style!r}: expected one of "
                              f"{', '.join(LR_DECAY_STYLES)}")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction <= 1.0:
            raise ConfigError(f"--lr-warmup-fraction must be in [0, 1], got {self.warmup_fraction}")
        if self.decay_steps <= 0:
            raise ConfigError(f"the learning-rate decay has no steps (--lr-decay-iters "
                              f"{self.decay_iters}, --lr-decay-samples {self.decay_samples})")
        if not 0 <= self.warmup_steps < self.decay_steps:
            raise ConfigError(
                f"the learning-rate warm-up ({self.warmup_steps:g} samples from --lr-warmup-iters "
                f"{self.warmup_iters} / --lr-warmup-samples {self.warmup_samples} / "
                f"--lr-warmup-fraction {self.warmup_fraction}) must be shorter than the decay "
                f"({self.decay_steps:g} samples)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, global_batch_size: int) -> "LRScheduleConfig":
        """Megatron's validate_args checks for iterations vs samples, then its
        get_optimizer_param_scheduler conversion to steps."""
        warmup_iters, warmup_samples = args.lr_warmup_iters, args.lr_warmup_samples
        fraction = args.lr_warmup_fraction
        if warmup_iters and warmup_samples:
            raise ConfigError(f"--lr-warmup-iters {warmup_iters} and --lr-warmup-samples "
                              f"{warmup_samples}: give the warm-up in iterations or in samples, "
                              f"not both")
        if fraction is not None and (warmup_iters or warmup_samples):
            flag, value = (("--lr-warmup-iters", warmup_iters) if warmup_iters
                           else ("--lr-warmup-samples", warmup_samples))
            raise ConfigError(f"--lr-warmup-fraction {fraction} and {flag} {value}: give only "
                              f"one of them")
        if args.train_samples is None:  # iteration-based training
            for flag, value in (("--lr-decay-samples", args.lr_decay_samples),
                                ("--lr-warmup-samples", warmup_samples or None)):
                if value is not None:
                    raise ConfigError(f"{flag} {value} with --train-iters {args.train_iters}: "
                                      f"iteration-based training takes "
                                      f"{flag.replace('samples', 'iters')}")
            decay_iters = args.lr_decay_iters if args.lr_decay_iters is not None \
                else args.train_iters
            decay_steps = decay_iters * global_batch_size
            warmup_steps = (fraction * decay_steps if fraction is not None
                            else warmup_iters * global_batch_size)
            decay_samples = None
        else:  # sample-based training
            for flag, value in (("--lr-decay-iters", args.lr_decay_iters),
                                ("--lr-warmup-iters", warmup_iters or None)):
                if value is not None:
                    raise ConfigError(f"{flag} {value} with --train-samples {args.train_samples}: "
                                      f"sample-based training takes "
                                      f"{flag.replace('iters', 'samples')}")
            decay_samples = args.lr_decay_samples if args.lr_decay_samples is not None \
                else args.train_samples
            decay_steps = decay_samples
            warmup_steps = fraction * decay_steps if fraction is not None else warmup_samples
            decay_iters = None
        return cls(style=args.lr_decay_style, warmup_steps=warmup_steps, decay_steps=decay_steps,
                   warmup_init=args.lr_warmup_init, warmup_iters=warmup_iters,
                   warmup_samples=warmup_samples, warmup_fraction=fraction,
                   decay_iters=decay_iters, decay_samples=decay_samples)


# ---------------------------------------------------------------------------------- data files
def data_prefixes(data: DataConfig) -> list[tuple[str, str]]:
    """(flag, prefix) for every dataset named by --data-path or the weighted split paths."""
    prefixes = []
    if data.data_path:
        values = list(data.data_path)
        if len(values) == 1:
            prefixes.append(("--data-path", values[0]))
        else:
            if len(values) % 2:
                raise ConfigError(f"--data-path {' '.join(values)}: a blend is 'WEIGHT PREFIX' "
                                  f"pairs, got {len(values)} values")
            for weight, prefix in zip(values[0::2], values[1::2]):
                try:
                    float(weight)
                except ValueError:
                    raise ConfigError(f"--data-path: {weight!r} is not a weight; a blend is "
                                      f"'WEIGHT PREFIX' pairs") from None
                prefixes.append(("--data-path", prefix))
    for name in ("train", "valid", "test"):
        for value in getattr(data, f"{name}_weighted_split_paths") or ():
            for entry in value.split(":", 1)[-1].split(","):
                parts = entry.split()
                if len(parts) == 3:  # WEIGHT START:END PREFIX; the data module reports bad ones
                    prefixes.append((f"--{name}-weighted-split-paths", parts[2]))
    return prefixes


def check_data_files(data: DataConfig) -> None:
    """Every dataset prefix has its .idx and .bin (files only; nothing is loaded)."""
    import os

    if not data.data_path and not data.train_weighted_split_paths:
        raise ConfigError("give --data-path PREFIX (or --train-weighted-split-paths)")
    for flag, prefix in data_prefixes(data):
        missing = [prefix + ext for ext in (".idx", ".bin") if not os.path.isfile(prefix + ext)]
        if missing:
            raise ConfigError(f"{flag} {prefix}: {' and '.join(missing)} not found (expected the "
                              f"prefix of a dataset written by tools/preprocess_data.py)")


# ---------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class GenerationConfig:
    """What examples/bloom/generate_bloom.py does with a loaded model (the model, tokenizer and
    parallel flags are the trainer's). Sampling follows Megatron: greedy = --greedy or --top_k 1."""
    max_new_tokens: int = 1024  # --max-new-tokens, else --out-seq-length
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 1234
    stop: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    sample_input_file: str | None = None
    sample_output_file: str | None = None
    recompute: bool = False  # no key/value cache: the whole sequence again for every token
    batch_size: int = 1  # prompts generated together (--micro-batch-size)

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ConfigError(f"--max-new-tokens/--out-seq-length must be > 0, got "
                              f"{self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"--micro-batch-size must be >= 1, got {self.batch_size}")
        if any(not s for s in self.stop):
            raise ConfigError("--stop: an empty stop string would stop at once")
        try:
            self.sampling()
        except ValueError as error:
            raise ConfigError(f"--{error}") from None

    def sampling(self):
        """The ascendspeed.generation SamplingParams (validated there: the server shares it)."""
        from ascendspeed.generation.sampling import SamplingParams

        return SamplingParams(greedy=self.greedy, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GenerationConfig":
        max_new = args.max_new_tokens if args.max_new_tokens is not None else args.out_seq_length
        return cls(max_new_tokens=max_new, greedy=bool(args.greedy), temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   stop=tuple(args.stop or ()), prompts=tuple(args.prompt or ()),
                   sample_input_file=args.sample_input_file,
                   sample_output_file=args.sample_output_file, recompute=bool(args.recompute),
                   batch_size=args.micro_batch_size or 1)


# ---------------------------------------------------------------------------------- all of it
@dataclass(frozen=True)
class PrecisionConfig:
    """--fp16 / --bf16 (or the ds_config's fp16/bf16 sections) and fp16 loss scaling.
    loss_scale None means dynamic scaling (Megatron's default for fp16)."""
    params_dtype: str = "float32"  # float32 | bfloat16 | float16
    loss_scale: float | None = None
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2

    def __post_init__(self):
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"params dtype {self.params_dtype!r}: expected float32, bfloat16 or float16")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ConfigError(f"--loss-scale must be positive (omit it for dynamic scaling), got {self.loss_scale}")
        if self.initial_loss_scale <= 0 or self.min_loss_scale <= 0:
            raise ConfigError("--initial-loss-scale and --min-loss-scale must be positive")
        if self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ConfigError("--loss-scale-window and --hysteresis must be >= 1")

    @classmethod
    def from_args(cls, args: argparse.Namespace, ds: dict | None = None,
                  ds_path: str | None = None) -> "PrecisionConfig":
        fp16, bf16 = bool(args.fp16), bool(args.bf16)
        ds_fp16 = _ds_section(ds, "fp16")
        ds_bf16 = _ds_section(ds, "bf16", "bfloat16")
        if ds_fp16.get("enabled"):
            fp16 = True
        if ds_bf16.get("enabled"):
            bf16 = True
        if fp16 and bf16:
            raise ConfigError(f"--fp16 and --bf16 (flags or {ds_path or 'ds_config'}): choose one")
        values = dict(loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
                      min_loss_scale=args.min_loss_scale,
                      loss_scale_window=int(args.loss_scale_window),
                      hysteresis=args.hysteresis)
        if ds_fp16.get("enabled"):  # DeepSpeed's fields: loss_scale 0 = dynamic
            if ds_fp16.get("loss_scale", 0):
                values["loss_scale"] = float(ds_fp16["loss_scale"])
            if "initial_scale_power" in ds_fp16:
                values["initial_loss_scale"] = 2.0 ** int(ds_fp16["initial_scale_power"])
            for ours, theirs in (("loss_scale_window", "loss_scale_window"),
                                 ("hysteresis", "hysteresis"), ("min_loss_scale", "min_loss_scale")):
                if theirs in ds_fp16:
                    values[ours] = type(values[ours])(ds_fp16[theirs])
        dtype = "float16" if fp16 else "bfloat16" if bf16 else "float32"
        return cls(params_dtype=dtype, **values)


@dataclass(frozen=True)
class KernelConfig:
    """Which fused kernels run; each one's plain PyTorch path stays as its reference."""
    fused_optimizer: bool = True  # fused AdamW step; one fused unscale + inf check
    fused_cross_entropy: bool = True  # chunked, in the logits' dtype, no fp32 copy of them
    bias_gelu_fusion: bool = True  # bias + GeLU saving only its input, ATen's gelu kernels
    fused_attention: bool = True  # the C++ causal ALiBi kernel (model/fused.py)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "KernelConfig":
        return cls(fused_optimizer=args.fused_kernels and args.fused_optimizer,
                   fused_cross_entropy=args.fused_kernels and args.fused_cross_entropy,
                   bias_gelu_fusion=args.fused_kernels and args.bias_gelu_fusion,
                   fused_attention=args.fused_kernels and args.fused_attention)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything pretrain_bloom.py needs, validated together. Build with from_args."""
    model: ModelConfig
    parallel: ParallelConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    lr_schedule: LRScheduleConfig
    data: DataConfig
    tokenizer: TokenizerConfig
    precision: PrecisionConfig = PrecisionConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    kernels: KernelConfig = KernelConfig()
    deepspeed_config_path: str | None = None
    notices: tuple[str, ...] = ()  # accepted flags with no effect, for the log

    def __post_init__(self):
        tp = self.parallel.tensor_model_parallel_size
        if self.model.num_attention_heads % tp:
            raise ConfigError(f"--num-attention-heads {self.model.num_attention_heads} is not "
                              f"divisible by --tensor-model-parallel-size {tp}")
        if self.model.ffn_hidden_size % tp:
            raise ConfigError(f"--ffn-hidden-size {self.model.ffn_hidden_size} is not divisible "
                              f"by --tensor-model-parallel-size {tp}")
        if self.parallel.sequence_parallel and self.model.seq_length % tp:
            raise ConfigError(f"--sequence-parallel: --seq-length {self.model.seq_length} is not "
                              f"divisible by --tensor-model-parallel-size {tp}")
        dp = self.parallel.data_parallel_size
        training = self.training
        if training.micro_batch_size * training.num_microbatches * dp \
                != training.global_batch_size:
            raise ConfigError(
                f"--global-batch-size {training.global_batch_size} != --micro-batch-size "
                f"{training.micro_batch_size} x {training.num_microbatches} micro-batches x "
                f"data-parallel size {dp}")
        if self.data.seq_length != self.model.seq_length:
            raise ConfigError(f"data seq_length {self.data.seq_length} != model seq_length "
                              f"{self.model.seq_length}")
        validate_pretrain_config(self)  # the pipeline layout, before any process group

    @classmethod
    def from_args(cls, args: argparse.Namespace, world_size: int) -> "PretrainConfig":
        ds = read_deepspeed_config(args.deepspeed_config) if args.deepspeed_config else None
        refuse_unsupported(args, ds)
        model = ModelConfig.from_args(args)
        parallel = ParallelConfig.from_args(args, world_size, ds)
        training = TrainingConfig.from_args(args, parallel.data_parallel_size)
        if ds is not None:
            _check_deepspeed_config(args.deepspeed_config, ds,
                                    micro_batch_size=training.micro_batch_size,
                                    global_batch_size=training.global_batch_size,
                                    num_microbatches=training.num_microbatches,
                                    clip_grad=training.clip_grad, zero_stage=args.zero_stage)
        optimizer = OptimizerConfig.from_args(args)
        lr_schedule = LRScheduleConfig.from_args(args, training.global_batch_size)
        if args.tokenizer_type is None:
            raise ConfigError("--tokenizer-type is required")
        tokenizer = TokenizerConfig.from_args(args)
        data = DataConfig.from_args(args)
        check_data_files(data)
        notices = tuple(f"{flag}: accepted; {note}"
                        for flag, test, note in ACCEPTED_WITHOUT_EFFECT if test(args))
        precision = PrecisionConfig.from_args(args, ds, args.deepspeed_config)
        return cls(model=model, parallel=parallel, training=training, optimizer=optimizer,
                   lr_schedule=lr_schedule, data=data, tokenizer=tokenizer, precision=precision,
                   checkpoint=CheckpointConfig.from_args(args),
                   kernels=KernelConfig.from_args(args), deepspeed_config_path=args.deepspeed_config, notices=notices)
