"""Megatron's "f" and "g" operators: autograd functions that move tensors in and out of a
tensor-parallel region (a no-op when TP = 1)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ascendspeed.core import parallel_state as ps


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_world_size() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
    return x


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = ps.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    return x.chunk(world, dim=-1)[ps.get_tensor_model_parallel_rank()].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = ps.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


class _CopyToRegion(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient (every rank used the same input)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone())


class _ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce (sum of partial results) forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    """Keep this rank's slice of the last dimension; gather the gradient."""

    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


class _GatherFromRegion(torch.autograd.Function):
    """Concatenate every rank's slice of the last dimension; split the gradient."""

    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


def copy_to_tensor_model_parallel_region(x):
    return _CopyToRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x):
    return _ReduceFromRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x):
    return _ScatterToRegion.apply(x)


def gather_from_tensor_model_parallel_region(x):
    return _GatherFromRegion.apply(x)
