"""Global L2 gradient norm over TP x PP (x DP under ZeRO-1) and clipping to it.

Each distinct parameter counts once: a TP-replicated parameter (not `tensor_model_parallel`)
only on TP rank 0, the shared word embeddings only on the first pipeline stage. Under ZeRO-1 each
DP rank holds a different shard of every gradient, so the sum of squares is also summed over DP;
otherwise the DP replicas hold the same gradients and one copy is counted.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ascendspeed import device
from ascendspeed.core import parallel_state as ps


def counts_toward_norm(param: torch.nn.Parameter) -> bool:
    if not getattr(param, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_rank() != 0:
        return False
    return not getattr(param, "shared_embedding", False) or ps.is_pipeline_first_stage()


def global_grad_norm(grads: list[torch.Tensor], *, sharded: bool) -> float:
    """L2 norm of the counted gradients `grads` (fp32) of all ranks."""
    # on the device its peers use, even where this rank counts no gradient (ZeRO-1 x TP)
    on = grads[0].device if grads else device.current_device()
    squares = torch.zeros((), dtype=torch.float32, device=on)
    if grads:
        squares += torch.stack(torch._foreach_norm(grads)).pow(2).sum()
    groups = [(ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()),
              (ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_group())]
    if sharded:
        groups.append((ps.get_data_parallel_world_size(), ps.get_data_parallel_group()))
    for size, group in groups:
        if size > 1:
            dist.all_reduce(squares, group=group)
    return math.sqrt(squares.item())


def clip_grads(grads: list[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale every gradient by max_norm / total_norm when the norm is above max_norm (Megatron's
    coefficient, with its 1e-6)."""
    if max_norm <= 0 or not grads:
        return
    coefficient = max_norm / (total_norm + 1e-6)
    if coefficient < 1.0:
        torch._foreach_mul_(grads, coefficient)
