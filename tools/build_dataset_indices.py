"""Build (or check) the GPT dataset index caches for a --data-path before a long job starts.

    python tools/build_dataset_indices.py --data-path PREFIX --split 969,30,1 --seq-length 2048 \
        --train-samples 220000000 --valid-samples 1000 [--cutoff-last-epoch 0.95]

Under `torchrun` every process takes part and one process per node builds while the others wait,
exactly as the trainer does. Prints one line per split. Each index that is built shows its
progress on stderr (entries built and written, rate, time left).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.arguments import (DataConfig, TokenizerConfig, add_data_args,  # noqa: E402
                                   add_tokenizer_args, resolve_weighted_split_paths)
from ascendspeed.data.builders import build_datasets  # noqa: E402
from ascendspeed.data.gpt_dataset import SPLIT_NAMES  # noqa: E402
from ascendspeed.errors import AscendSpeedError, error_line  # noqa: E402
from ascendspeed.progress import Progress  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    group = parser.add_argument_group("samples")
    group.add_argument("--train-samples", type=int, default=0)
    group.add_argument("--valid-samples", type=int, default=0)
    group.add_argument("--test-samples", type=int, default=0)
    group.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                       help="under torchrun: how long a process waits for the others (the "
                            "builders included) before failing")
    group.add_argument("--print-samples", type=int, default=0,
                       help="decode and print the first N training samples (needs the tokenizer flags)")
    add_tokenizer_args(parser)
    args = parser.parse_args(argv)
    if not args.distributed_timeout_minutes > 0:
        parser.error(f"--distributed-timeout-minutes must be positive, got "
                     f"{args.distributed_timeout_minutes}")
    if args.print_samples and not args.tokenizer_type:
        parser.error("--print-samples needs --tokenizer-type and its files")
    if not args.data_path and not args.train_weighted_split_paths \
            and not args.train_weighted_split_paths_path:
        parser.error("give --data-path (or --train-weighted-split-paths)")
    return resolve_weighted_split_paths(args)


def build(args: argparse.Namespace):
    return build_datasets(DataConfig.from_args(args),
                          [args.train_samples, args.valid_samples, args.test_samples],
                          progress=Progress)


def describe(name: str, dataset) -> str:
    if dataset is None:
        return f"{name}: no samples (no documents in this split, or none long enough)"
    if isinstance(dataset, list):
        return "; ".join(describe(name, d) for d in dataset)
    if hasattr(dataset, "datasets"):
        return (f"{name}: blend of {len(dataset.datasets)} datasets, {len(dataset)} samples "
                f"(shares {', '.join(f'{w:.4f}' for w in dataset.weights)})")
    return f"{name}: {len(dataset)} samples of {dataset.seq_length + 1} tokens"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from datetime import timedelta

        from ascendspeed import device
        from ascendspeed.job import rendezvous
        # host only: the ranks exchange pickled host names and errors, never a device tensor;
        # joined as the trainer joins (bounded, and safe after a torchrun restart)
        rendezvous.init_process_group(device.distributed_backend("cpu:gloo", kind="cpu"),
                                      timedelta(minutes=args.distributed_timeout_minutes))
    start = time.time()
    try:
        datasets = build(args)
    except AscendSpeedError as error:
        print(error_line(error), file=sys.stderr)
        return 2
    finally:
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()
    for name, dataset in zip(SPLIT_NAMES, datasets):
        print(describe(name, dataset))
    print(f"index mappings ready in {time.time() - start:.2f} s")
    if args.print_samples and datasets[0] is not None:
        print_samples(args, datasets[0])
    return 0


def print_samples(args: argparse.Namespace, train) -> None:
    from ascendspeed.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(TokenizerConfig.from_args(args))
    for k in range(min(args.print_samples, len(train))):
        text = tokenizer.detokenize(train[k]["text"].tolist())
        print(f"--- train sample {k} ({len(train[k]['text'])} tokens):\n{text[:400]}")


if __name__ == "__main__":
    sys.exit(main())
