"""Tensor-parallel layers: a vocab-split embedding, and linear layers split by output columns or
by input rows.

Weights are initialised as Megatron does with --use-cpu-initialization: the full ("master") matrix
is drawn on the CPU by `init_method`, then each rank keeps its slice. A model therefore starts with
the same numbers whatever its TP size, which is what makes TP=1 and TP=2 runs comparable.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region)

InitMethod = Callable[[torch.Tensor], None]


def divide(numerator: int, denominator: int, what: str = "") -> int:
    if numerator % denominator:
        raise ValueError(f"{what or numerator} ({numerator}) is not divisible by the tensor-parallel "
                         f"size {denominator}")
    return numerator // denominator


def _master_slice(shape, partition_dim: int, init_method: InitMethod, dtype) -> torch.Tensor:
    """Draw the full matrix in fp32 on the CPU and return this rank's contiguous slice."""
    master = torch.empty(shape, dtype=torch.float32)
    init_method(master)
    world, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return master.chunk(world, dim=partition_dim)[rank].to(dtype).contiguous()


def _mark(param: nn.Parameter, parallel: bool, partition_dim: int = -1) -> nn.Parameter:
    """Megatron's attributes: a TP-split parameter, or one every TP rank holds in full."""
    param.tensor_model_parallel = parallel
    param.partition_dim = partition_dim
    return param


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r*V/t, (r+1)*V/t); partial lookups are summed over the TP group (with
    sequence parallelism: reduce-scattered, each rank keeping its slice of the sequence)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: InitMethod,
                 params_dtype=torch.float32, device=None, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        world = ps.get_tensor_model_parallel_world_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = divide(num_embeddings, world, "the padded vocab size")
        self.vocab_start_index = ps.get_tensor_model_parallel_rank() * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        weight = _master_slice((num_embeddings, embedding_dim), 0, init_method, params_dtype)
        self.weight = _mark(nn.Parameter(weight.to(device)), True, 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside_vocab = (input_ids < 0) | (input_ids >= self.num_embeddings)
        if outside_vocab.any():  # one host sync per forward
            raise IndexError(f"token id {int(input_ids[outside_vocab][0])} outside the padded "
                             f"vocabulary [0, {self.num_embeddings})")
        if ps.get_tensor_model_parallel_world_size() == 1:  # (no sequence parallelism at TP=1)
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial)
        return reduce_from_tensor_model_parallel_region(partial)


def inference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     contiguous: bool = True) -> torch.Tensor:
    """F.linear(x, weight, bias) for generation. A decode step has a handful of rows (one token
    per sequence); on CPU in fp32, MKL's x @ W^T at that shape is 1.3-3x slower than the transposed
    product W @ x^T (one pass over the weight rows), so that is computed instead. The same sums;
    only the rounding of the last bits differs. Elsewhere: F.linear. `contiguous=False` may
    return a transposed view (e.g. logits that the caller copies anyway)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.dtype != torch.float32 or not 1 < rows <= 8:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1]).t()
    y = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)
    y = y.t().contiguous() if contiguous else y.t()
    return y.view(*x.shape[:-1], weight.shape[0])


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output features; the output stays split unless gather_output.
    With sequence parallelism the input arrives split along the sequence and is all-gathered.
    With skip_bias_add the bias is returned for the caller to fuse (bias + GeLU)."""

    def __init__(self, input_size: int, output_size: int, init_method: InitMethod, bias: bool = True,
                 gather_output: bool = False, params_dtype=torch.float32, device=None,
                 sequence_parallel: bool = False, skip_bias_add: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.skip_bias_add = skip_bias_add
        world = ps.get_tensor_model_parallel_world_size()
        self.output_size_per_partition = divide(output_size, world, "the output size")
        self.gather_output = gather_output
        weight = _master_slice((output_size, input_size), 0, init_method, params_dtype)
        self.weight = _mark(nn.Parameter(weight.to(device)), True, 0)
        self.bias = None
        if bias:
            zeros = torch.zeros(self.output_size_per_partition, dtype=params_dtype, device=device)
            self.bias = _mark(nn.Parameter(zeros), True, 0)

    def forward(self, x: torch.Tensor):
        x = (gather_from_sequence_parallel_region(x) if self.sequence_parallel
             else copy_to_tensor_model_parallel_region(x))
        y = F.linear(x, self.weight, None if self.skip_bias_add else self.bias)
        y = gather_from_tensor_model_parallel_region(y) if self.gather_output else y
        return (y, self.bias) if self.skip_bias_add else y

    def forward_inference(self, x: torch.Tensor):
        """forward() for generation (no autograd, no sequence parallelism): inference_linear."""
        y = inference_linear(copy_to_tensor_model_parallel_region(x), self.weight,
                             None if self.skip_bias_add else self.bias)
        y = gather_from_tensor_model_parallel_region(y) if self.gather_output else y
        return (y, self.bias) if self.skip_bias_add else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input features: partial products are summed over the TP
    group, then the (replicated) bias is added once. With skip_bias_add the bias is returned for
    the caller to add before its dropout and residual (Megatron's bias-dropout-add). With sequence parallelism the partial products are
    reduce-scattered along the sequence, and the bias (added to a slice of the tokens) is marked
    `sequence_parallel`: its gradient must be summed over the TP ranks."""

    def __init__(self, input_size: int, output_size: int, init_method: InitMethod, bias: bool = True,
                 skip_bias_add: bool = False,
                 params_dtype=torch.float32, device=None, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        world = ps.get_tensor_model_parallel_world_size()
        self.input_size_per_partition = divide(input_size, world, "the input size")
        self.skip_bias_add = skip_bias_add
        weight = _master_slice((output_size, input_size), 1, init_method, params_dtype)
        self.weight = _mark(nn.Parameter(weight.to(device)), True, 1)
        self.bias = None
        if bias:
            zeros = torch.zeros(output_size, dtype=params_dtype, device=device)
            self.bias = _mark(nn.Parameter(zeros), False)
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor):
        """x: this rank's slice of the input features (a column-parallel layer's output)."""
        partial = F.linear(x, self.weight)
        y = (reduce_scatter_to_sequence_parallel_region(partial) if self.sequence_parallel
             else reduce_from_tensor_model_parallel_region(partial))
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias if self.bias is not None else y

    def forward_inference(self, x: torch.Tensor):
        """forward() for generation (no autograd, no sequence parallelism): inference_linear."""
        y = reduce_from_tensor_model_parallel_region(inference_linear(x, self.weight))
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias if self.bias is not None else y
