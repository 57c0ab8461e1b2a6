"""Reshard a checkpoint to another tensor-parallel (and pipeline-parallel) size.

    python tools/convert_tp.py --input-folder SRC --output-folder DST --target-tp N \
        [--target-pp M] [--iteration K] [--make-vocab-size-divisible-by 128] \
        [--pad-vocab-size-to V]

Reads the checkpoint SRC's tracker names (or iteration K), merges its TP shards and pipeline
stages, and writes DST/iter_K/mp_rank_*/model_optim_rng.pt for TP=N, PP=M (default 1), model and
optimizer state, then DST's tracker; `pretrain_bloom.py --load DST` at TP=N, PP=M resumes
training. The padded vocabulary is recomputed for TP=N with the vocab flags given here (pass the
training run's --make-vocab-size-divisible-by / --pad-vocab-size-to). A virtual pipeline is not
kept (1 chunk per stage); RNG states are dropped. See ascendspeed/checkpoint/reshard.py.
Progress (rank files read and written, rate, time left) goes to stderr.
Exit status 2 with a message naming the file or number when the checkpoint cannot be resharded.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as `python tools/convert_tp.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.checkpoint.reshard import reshard  # noqa: E402
from ascendspeed.errors import AscendSpeedError, error_line  # noqa: E402
from ascendspeed.progress import Progress  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-folder", required=True, help="the source checkpoint (--save dir)")
    parser.add_argument("--output-folder", required=True, help="where to write the resharded one")
    parser.add_argument("--target-tp", type=int, required=True)
    parser.add_argument("--target-pp", type=int, default=1)
    parser.add_argument("--iteration", default=None,
                        help="the iteration to convert (default: the one the tracker names)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--pad-vocab-size-to", type=int, default=None)
    args = parser.parse_args(argv)
    if args.iteration is not None and args.iteration != "release":
        try:
            args.iteration = int(args.iteration)
        except ValueError:
            parser.error(f"--iteration: expected a number or 'release', got {args.iteration!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        reshard(args.input_folder, args.output_folder, args.target_tp, args.target_pp,
                iteration=args.iteration,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                pad_vocab_size_to=args.pad_vocab_size_to, log=lambda m: print(m, flush=True),
                progress=Progress)
    except AscendSpeedError as error:
        print(f"convert_tp.py: {error_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
