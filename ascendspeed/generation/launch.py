"""Starting the processes of a generation job (examples/bloom/generate_bloom.py,
tools/run_text_generation_server.py): the launched TP x PP processes' groups and the seeded RNG
streams, between loading.prepare (no process group yet) and loading.load_stage."""
from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from ascendspeed import device
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import model_parallel_seed
from ascendspeed.generation.loading import GenerationSetup


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def start_processes(setup: GenerationSetup, backend: str | None, seed: int,
                    timeout: timedelta | None = None) -> None:
    """Process groups for the launched processes (none for one process), then the seeded RNG
    streams (the attention forks the TP-rank stream, as in training). `timeout` bounds every
    collective: a server's followers wait in one for as long as no request comes."""
    if world_size() > 1 and not dist.is_initialized():
        device.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend=backend or device.default_backend(), **kwargs)
    if dist.is_initialized() and not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(setup.tensor_model_parallel_size,
                                     setup.pipeline_model_parallel_size)
    model_parallel_seed(seed)
