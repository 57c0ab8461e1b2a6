"""A checkpoint, ready to score: the generation loader's `prepare` (flags checked against the
checkpoint before any process group exists) and `load_stage`, plus the process groups between
them. World size = TP x PP (the checkpoint's; tools/convert_tp.py reshards)."""
from __future__ import annotations

import argparse
import datetime

import torch.distributed as dist

from ascendspeed.core import parallel_state as ps
from ascendspeed.generation.launch import rank, start_processes, world_size  # noqa: F401
from ascendspeed.generation.loading import GenerationSetup, load_stage, prepare  # noqa: F401


def stop_processes() -> None:
    """The end of a run: wait for every rank (nobody tears gloo down while a peer is still in a
    collective), then drop the groups. A no-op for one process."""
    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def load(args: argparse.Namespace, log=print):
    """(setup, this rank's loaded stage) from parsed pretrain_bloom.py-style flags."""
    setup = prepare(args, world_size(), log)
    start_processes(setup, args.distributed_backend, args.seed,
                    timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))
    return setup, load_stage(setup, log)
