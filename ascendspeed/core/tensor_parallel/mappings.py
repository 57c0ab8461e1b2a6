"""Megatron's "f" and "g" operators: autograd functions that move tensors in and out of a
tensor-parallel region (a no-op when TP = 1); and, for sequence parallelism, the operators that
split activations [b, s, h] along the sequence (dim 1) over the TP ranks and join them again."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ascendspeed.core import parallel_state as ps


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum over the TP group, in a new tensor (an autograd input or a gradient that other
    nodes may share is never reduced in place); x itself at TP=1."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
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


def _seq_split(x: torch.Tensor) -> torch.Tensor:
    world = ps.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    if x.shape[1] % world:
        raise ValueError(f"sequence parallelism: sequence length {x.shape[1]} is not divisible by "
                         f"the tensor-parallel size {world}")
    return x.chunk(world, dim=1)[ps.get_tensor_model_parallel_rank()].contiguous()


def _seq_gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather along the sequence: [b, s/t, h] -> [b, s, h] (collectives work on dim 0)."""
    world = ps.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    local = x.transpose(0, 1).contiguous()
    out = torch.empty((local.shape[0] * world,) + local.shape[1:], dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, local, group=ps.get_tensor_model_parallel_group())
    return out.transpose(0, 1)


def _seq_reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP ranks and keep this rank's sequence slice: [b, s, h] -> [b, s/t, h]."""
    world = ps.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    if x.shape[1] % world:
        raise ValueError(f"sequence parallelism: sequence length {x.shape[1]} is not divisible by "
                         f"the tensor-parallel size {world}")
    full = x.transpose(0, 1).contiguous()
    out = torch.empty((full.shape[0] // world,) + full.shape[1:], dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, full, group=ps.get_tensor_model_parallel_group())
    return out.transpose(0, 1)


class _CopyToRegion(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient (every rank used the same input)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce (sum of partial results) forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


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


def gather_from_tensor_model_parallel_region(x):
    return _GatherFromRegion.apply(x)


class _GatherFromSequenceRegion(torch.autograd.Function):
    """All-gather the sequence in forward. In backward the gradient is a partial sum when the
    gathered tensor fed a TP-split matmul (reduce-scatter it), else a full one (slice it)."""

    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad: bool):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _seq_gather(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return _seq_reduce_scatter(grad), None
        return _seq_split(grad), None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    """Sum partial results and keep this rank's sequence slice; all-gather the gradient."""

    @staticmethod
    def forward(ctx, x):
        return _seq_reduce_scatter(x)

    @staticmethod
    def backward(ctx, grad):
        return _seq_gather(grad)


def gather_from_sequence_parallel_region(x, tensor_parallel_output_grad: bool = True):
    return _GatherFromSequenceRegion.apply(x, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x):
    return _ReduceScatterToSequenceRegion.apply(x)
