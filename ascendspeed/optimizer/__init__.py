"""Optimizer pieces: weight-decay parameter groups, the learning-rate schedule, and the
mixed-precision / ZeRO-1 optimizers over data-parallel gradient buffers."""
from __future__ import annotations

from typing import Callable

import torch

from ascendspeed.core.distributed import DataParallelGrads
from ascendspeed.optimizer.distrib_optimizer import DistributedOptimizer
from ascendspeed.optimizer.lr_scheduler import AnnealingLR, OptimizerParamScheduler
from ascendspeed.optimizer.mixed_precision import ConstantLossScaler, Float16Optimizer, FP32Optimizer
from ascendspeed.optimizer.param_groups import get_param_groups

__all__ = ["AnnealingLR", "OptimizerParamScheduler", "build_optimizer", "get_param_groups"]


def build_optimizer(model_chunks: list[torch.nn.Module], param_groups: list[dict],
                    make_optimizer: Callable[[list[dict]], torch.optim.Optimizer], *,
                    params_dtype: torch.dtype = torch.float32, scaler=None, clip_grad: float = 0.0,
                    bucket_size: int = 40_000_000, overlap_grad_reduce: bool = True,
                    use_distributed_optimizer: bool = False, fused_unscale: bool = True,
                    stop_on_non_finite_norm: bool = False):
    """Gradient buffers over `model_chunks` (hooks registered now) and the optimizer that steps
    `param_groups` of their parameters: FP32Optimizer for an fp32 model, Float16Optimizer
    (`scaler`, default a constant 1) otherwise, DistributedOptimizer for ZeRO-1.
    `fused_unscale`: one fused unscale + inf check (False: the plain per-gradient reference).
    `stop_on_non_finite_norm`: a non-finite gradient norm skips the step (the caller stops)."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    grads = DataParallelGrads(chunks, bucket_size=bucket_size,
                              overlap_grad_reduce=overlap_grad_reduce,
                              distributed_optimizer=use_distributed_optimizer)
    grouped = {id(p) for group in param_groups for p in group["params"]}
    if grouped != {id(p) for p in grads.params}:
        raise ValueError("the parameter groups must hold exactly the model's trainable parameters")
    half = params_dtype != torch.float32
    scaler = scaler or ConstantLossScaler(1.0)
    if use_distributed_optimizer:
        optimizer = DistributedOptimizer(grads, param_groups, make_optimizer, scaler, clip_grad,
                                         check_for_overflow=half)
    elif not half:
        optimizer = FP32Optimizer(grads, param_groups, make_optimizer, clip_grad)
    else:
        optimizer = Float16Optimizer(grads, param_groups, make_optimizer, scaler, clip_grad)
    optimizer.fused_unscale = fused_unscale
    optimizer.stop_on_non_finite_norm = stop_on_non_finite_norm
    return optimizer
