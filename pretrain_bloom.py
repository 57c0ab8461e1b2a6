"""Pretrain BLOOM with tensor, pipeline and data parallelism.

    torchrun --nproc_per_node 2 pretrain_bloom.py --tensor-model-parallel-size 2 \
        --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 \
        --micro-batch-size 4 --global-batch-size 8 --train-iters 100 --lr 1e-3 \
        --position-embedding-type alibi --embed-layernorm \
        --data-path data/shakespeare/shakespeare_text_document \
        --tokenizer-type PretrainedFromHF --tokenizer-name-or-path data/shakespeare/tokenizer

Flags are Megatron-LM / Megatron-DeepSpeed's (see ascendspeed/arguments.py); flags of features
not built yet are refused with a clear message rather than ignored. `--save DIR --load DIR`
resumes from the latest complete checkpoint in DIR (or starts from scratch when there is none).
"""
import logging
import os
import sys

from ascendspeed.arguments import PretrainConfig, parse_args
from ascendspeed.checkpoint.save_load import apply_checkpoint_args
from ascendspeed.errors import AscendSpeedError, ConfigError, error_line


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    args = parse_args(argv)
    try:
        if args.use_checkpoint_args:
            if not args.load:
                raise ConfigError("--use-checkpoint-args needs --load DIR")
            for change in apply_checkpoint_args(args):
                logging.info(f" > from the checkpoint: {change}")
        config = PretrainConfig.from_args(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except AscendSpeedError as error:  # before any process group: nothing can hang
        print(error_line(error), file=sys.stderr)
        return 2
    from ascendspeed.training import pretrain, wait_for_every_rank

    try:
        pretrain(config, log=lambda line: print(line, flush=True))
        wait_for_every_rank(config)  # nobody tears gloo down while a peer is still in a collective
    except AscendSpeedError as error:
        print(error_line(error), file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
