"""Starting the processes of a generation job (examples/bloom/generate_bloom.py,
tools/run_text_generation_server.py, tools/evaluate.py): the launched TP x PP processes' groups
and the seeded RNG streams, between loading.prepare (no process group yet) and
loading.load_stage. Under torchrun each process also stops when its launcher is gone
(job/launcher.py), so a killed launcher leaves no worker holding a device or a port."""
from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from ascendspeed import device
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import model_parallel_seed
from ascendspeed.generation.loading import GenerationSetup
from ascendspeed.job import rendezvous
from ascendspeed.job.launcher import watch_launcher


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def start_processes(setup: GenerationSetup, backend: str | None, seed: int,
                    timeout: timedelta | None = None, idle_timeout: timedelta | None = None) -> None:
    """Process groups for the launched processes (none for one process), then the seeded RNG
    streams (the attention forks the TP-rank stream, as in training). `timeout` bounds every
    collective and group creation (None: torch's default); `idle_timeout` replaces it on the
    default group: a server's followers wait there, in a broadcast, while no request comes."""
    watch_launcher()
    if world_size() > 1 and not dist.is_initialized():
        device.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        rendezvous.init_process_group(device.distributed_backend(backend),
                                      idle_timeout or timeout or default_pg_timeout)
    if dist.is_initialized() and not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(setup.tensor_model_parallel_size,
                                     setup.pipeline_model_parallel_size, timeout=timeout)
    model_parallel_seed(seed)
