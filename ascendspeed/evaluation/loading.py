"""A checkpoint, ready to score: the generation loader's `prepare` (flags checked against the
checkpoint before any process group exists) and `load_stage`, plus the process groups between
them. World size = TP x PP (the checkpoint's; tools/convert_tp.py reshards)."""
from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from ascendspeed import device
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import model_parallel_seed
from ascendspeed.generation.loading import GenerationSetup, load_stage, prepare  # noqa: F401


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def start_processes(setup: GenerationSetup, backend: str | None, seed: int) -> None:
    """Process groups for the launched TP x PP processes (none for one process); the seeded RNG
    streams the attention forks even in eval. (Scoring runs under no_grad itself: nothing global
    is switched off, so in-process callers such as tests keep autograd.)"""
    if world_size() > 1 and not dist.is_initialized():
        device.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend or device.default_backend())
    if dist.is_initialized() and not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(setup.tensor_model_parallel_size,
                                     setup.pipeline_model_parallel_size)
    model_parallel_seed(seed)


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
    start_processes(setup, args.distributed_backend, args.seed)
    return setup, load_stage(setup, log)
