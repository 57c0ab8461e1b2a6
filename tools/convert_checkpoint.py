"""Convert BLOOM checkpoints between Hugging Face, Megatron-DeepSpeed and our (Megatron) layout.

    python tools/convert_checkpoint.py --source-format hf --target-format megatron \
        --input HF_DIR --output DIR --target-tp N --target-pp M \
        [--make-vocab-size-divisible-by 128] [--pad-vocab-size-to V] [--params-dtype fp32|bf16|fp16]
    python tools/convert_checkpoint.py --source-format megatron-deepspeed --target-format megatron \
        --input DS_DIR --output DIR --target-tp N --target-pp M [...]
    python tools/convert_checkpoint.py --source-format megatron --target-format hf \
        --input DIR --output HF_DIR [--iteration K] [--vocab-rows hf|tokenizer|padded] \
        [--tokenizer-vocab-size N] [--dtype fp32|bf16|fp16]

To ours: DIR/release/mp_rank_*/model_optim_rng.pt and a tracker saying "release";
`pretrain_bloom.py --load DIR --use-checkpoint-args` starts from these weights at iteration 0
with a fresh optimizer. To HF: a BloomForCausalLM directory (safetensors, one shard per pipeline
stage). The output is written under OUTPUT.tmp and renamed when complete; a non-empty OUTPUT is
refused unless --force. Progress (tensors or files done, rate, time left) goes to stderr. Bad
input: exit status 2, one line naming the file, tensor or number. See ascendspeed/checkpoint/hf.py.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as `python tools/convert_checkpoint.py`: the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.checkpoint.hf import DTYPES, hf_to_megatron, megatron_to_hf  # noqa: E402
from ascendspeed.checkpoint.hf_source import HFDirectorySource  # noqa: E402
from ascendspeed.checkpoint.megatron_deepspeed import MegatronDeepSpeedSource  # noqa: E402
from ascendspeed.errors import AscendSpeedError, ConvertError, error_line  # noqa: E402
from ascendspeed.progress import NoProgress, Progress  # noqa: E402

PROG = "convert_checkpoint.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-format", required=True,
                        choices=("hf", "megatron", "megatron-deepspeed"))
    parser.add_argument("--target-format", required=True, choices=("hf", "megatron"))
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    to_ours = parser.add_argument_group("to megatron")
    to_ours.add_argument("--target-tp", type=int, default=1)
    to_ours.add_argument("--target-pp", type=int, default=1)
    to_ours.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_ours.add_argument("--pad-vocab-size-to", type=int, default=None)
    to_ours.add_argument("--params-dtype", choices=sorted(DTYPES), default=None,
                         help="default: the source's dtype")
    to_hf = parser.add_argument_group("to hf")
    to_hf.add_argument("--iteration", default=None,
                       help="the iteration to convert (default: the one the tracker names)")
    to_hf.add_argument("--vocab-rows", choices=("hf", "tokenizer", "padded"), default="hf",
                       help="hf: the recorded HF row count (else the padded size); tokenizer: "
                            "--tokenizer-vocab-size or the checkpoint's original vocab size; "
                            "padded: keep our padding")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="default: the checkpoint's params dtype")
    parser.add_argument("--tokenizer-vocab-size", type=int, default=None,
                        help="to megatron: the original_vocab_size to record (default: the HF "
                             "row count); to hf: the rows --vocab-rows tokenizer keeps")
    args = parser.parse_args(argv)
    pair = (args.source_format, args.target_format)
    if pair not in (("hf", "megatron"), ("megatron-deepspeed", "megatron"), ("megatron", "hf")):
        parser.error(f"--source-format {pair[0]} --target-format {pair[1]} is not supported "
                     f"(hf -> megatron, megatron-deepspeed -> megatron, megatron -> hf)")
    if args.iteration not in (None, "release"):
        try:
            args.iteration = int(args.iteration)
        except ValueError:
            parser.error(f"--iteration: expected a number or 'release', got {args.iteration!r}")
    return args


def _megatron_deepspeed_to_ours(args, log, progress) -> str:
    try:
        return _to_ours(MegatronDeepSpeedSource(args.input), args, log, progress)
    except OSError as error:  # the reader's I/O errors name the file
        raise ConvertError(str(error)) from None


def _to_ours(source, args, log, progress) -> str:
    return hf_to_megatron(source, args.output, args.target_tp, args.target_pp,
                          args.make_vocab_size_divisible_by, args.pad_vocab_size_to,
                          args.params_dtype, args.tokenizer_vocab_size, args.force,
                          where=args.input, log=log, progress=progress)


def convert(args, log=print, progress=NoProgress) -> str:
    if os.path.normpath(args.input) == os.path.normpath(args.output):
        raise ConvertError(f"--output must differ from --input ({args.input})")
    if args.target_format == "hf":
        return megatron_to_hf(args.input, args.output, args.iteration, args.vocab_rows,
                              args.tokenizer_vocab_size, args.dtype, args.force, log, progress)
    if args.source_format == "megatron-deepspeed":
        return _megatron_deepspeed_to_ours(args, log, progress)
    return _to_ours(HFDirectorySource(args.input), args, log, progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        convert(args, log=lambda message: print(message, flush=True), progress=Progress)
    except AscendSpeedError as error:
        print(f"{PROG}: {error_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
