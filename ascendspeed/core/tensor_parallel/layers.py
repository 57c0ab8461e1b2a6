"""Tensor-parallel layers: a vocab-split embedding, and linear layers split by output columns or
by input rows.

Weights are initialised as Megatron does with --use-cpu-initialization: each rank keeps its slice
of the full ("master") matrix that `init_method` draws on the CPU, so a model starts with the same
numbers whatever its TP size, which is what makes TP=1 and TP=2 runs comparable. With a NormalInit
the master is never held whole: its stream is drawn in row chunks (`_row_chunks`) and each chunk's
part of this rank's slice is copied into the parameter, on its device and in its dtype; any other
init_method draws the whole master (`_master_slice`).

Each layer allocates its parameters on `device` (which may be "meta") and fills them in
`reset_parameters(init_method)`; the constructor calls it when given an init_method. Without one
the parameters are left unfilled, for the owner's reset_parameters or a checkpoint to fill.
"""
from __future__ import annotations

import math
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
    master = torch.empty(shape, dtype=torch.float32, device="cpu")
    init_method(master)
    world, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return master.chunk(world, dim=partition_dim)[rank].to(dtype).contiguous()


class NormalInit:
    """N(0, std) from `generator` (Megatron's init_method_normal): an init_method whose stream
    `_fill_slice_` may draw in chunks. Torch's CPU normal_ draws a contiguous fp32 tensor of
    n >= 16 elements as n uniforms (one 32-bit draw each), turns each aligned group of 16 into
    normals (Box-Muller on elements j and j + 8) and, when n % 16 != 0, draws 16 more uniforms
    for its last 16 elements. So draws of multiple-of-16 sizes one after another give the
    numbers of one draw of their total, and so does a last draw of any size >= 16 (the same
    tail). A draw under 16 elements (a serial double-precision path) or in bf16/fp16 (a partial
    group's uniforms are never drawn) would not: chunks are fp32 and at least 16 elements."""

    def __init__(self, std: float, generator: torch.Generator):
        self.std, self.generator = std, generator

    def __call__(self, tensor: torch.Tensor) -> None:
        tensor.normal_(0.0, self.std, generator=self.generator)


_CHUNK_ELEMENTS = 1 << 22  # of a master matrix drawn at once: 16 MiB of fp32 on the host


def _row_chunks(rows: int, cols: int, target: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of a rows x cols matrix, about `target` elements each, whose
    normal_ draws one after another are one draw of the whole (see NormalInit): every range but
    the last holds a multiple of 16 elements, the last at least 16 (or the whole matrix)."""
    step = 16 // math.gcd(cols, 16)  # the fewest rows holding a multiple of 16 elements
    per = max(step, target // cols // step * step)
    bounds = list(range(0, rows, per)) + [rows]
    if len(bounds) > 2 and (rows - bounds[-2]) * cols < 16:
        del bounds[-2]  # a last range under 16 elements joins the one before
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def _fill_slice_(weight: torch.Tensor, master_shape: tuple[int, int], partition_dim: int,
                 init_method: InitMethod) -> None:
    """weight <- this rank's slice of the master matrix `init_method` draws: the numbers of
    _master_slice, holding one chunk of the master at a time (a NormalInit on a CPU generator)
    or the whole master (any other init_method). A meta weight has nothing to fill."""
    if weight.is_meta:
        return
    if not (isinstance(init_method, NormalInit) and init_method.generator.device.type == "cpu"):
        weight.copy_(_master_slice(master_shape, partition_dim, init_method, weight.dtype))
        return
    rows, cols = master_shape
    lo = ps.get_tensor_model_parallel_rank() * weight.shape[partition_dim]
    hi = lo + weight.shape[partition_dim]  # this rank's master rows (dim 0) or columns (dim 1)
    for start, stop in _row_chunks(rows, cols, _CHUNK_ELEMENTS):
        chunk = torch.empty(stop - start, cols, dtype=torch.float32, device="cpu")
        init_method(chunk)  # drawn even where this rank keeps none of it: the stream goes on
        if partition_dim == 1:
            weight[start:stop].copy_(chunk[:, lo:hi])
        elif start < hi and lo < stop:
            first, last = max(start, lo), min(stop, hi)
            weight[first - lo:last - lo].copy_(chunk[first - start:last - start])


def _mark(param: nn.Parameter, parallel: bool, partition_dim: int = -1) -> nn.Parameter:
    """Megatron's attributes: a TP-split parameter, or one every TP rank holds in full."""
    param.tensor_model_parallel = parallel
    param.partition_dim = partition_dim
    return param


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r*V/t, (r+1)*V/t); partial lookups are summed over the TP group (with
    sequence parallelism: reduce-scattered, each rank keeping its slice of the sequence)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: InitMethod | None,
                 params_dtype=torch.float32, device=None, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        world = ps.get_tensor_model_parallel_world_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = divide(num_embeddings, world, "the padded vocab size")
        self.vocab_start_index = ps.get_tensor_model_parallel_rank() * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        weight = torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype,
                             device=device)
        self.weight = _mark(nn.Parameter(weight), True, 0)
        if init_method is not None:
            self.reset_parameters(init_method)

    def reset_parameters(self, init_method: InitMethod) -> None:
        """weight <- this rank's rows of the master matrix `init_method` draws."""
        _fill_slice_(self.weight, (self.num_embeddings, self.weight.shape[1]), 0, init_method)

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

    def __init__(self, input_size: int, output_size: int, init_method: InitMethod | None,
                 bias: bool = True, gather_output: bool = False, params_dtype=torch.float32,
                 device=None, sequence_parallel: bool = False, skip_bias_add: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.skip_bias_add = skip_bias_add
        world = ps.get_tensor_model_parallel_world_size()
        self.output_size_per_partition = divide(output_size, world, "the output size")
        self.input_size, self.output_size = input_size, output_size
        self.gather_output = gather_output
        weight = torch.empty(self.output_size_per_partition, input_size, dtype=params_dtype,
                             device=device)
        self.weight = _mark(nn.Parameter(weight), True, 0)
        self.bias = None
        if bias:
            empty = torch.empty(self.output_size_per_partition, dtype=params_dtype, device=device)
            self.bias = _mark(nn.Parameter(empty), True, 0)
        if init_method is not None:
            self.reset_parameters(init_method)

    @torch.no_grad()
    def reset_parameters(self, init_method: InitMethod) -> None:
        """weight <- this rank's rows of the master matrix `init_method` draws; bias <- 0."""
        _fill_slice_(self.weight, (self.output_size, self.input_size), 0, init_method)
        if self.bias is not None:
            self.bias.zero_()

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

    def __init__(self, input_size: int, output_size: int, init_method: InitMethod | None,
                 bias: bool = True, skip_bias_add: bool = False,
                 params_dtype=torch.float32, device=None, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        world = ps.get_tensor_model_parallel_world_size()
        self.input_size_per_partition = divide(input_size, world, "the input size")
        self.input_size, self.output_size = input_size, output_size
        self.skip_bias_add = skip_bias_add
        weight = torch.empty(output_size, self.input_size_per_partition, dtype=params_dtype,
                             device=device)
        self.weight = _mark(nn.Parameter(weight), True, 1)
        self.bias = None
        if bias:
            empty = torch.empty(output_size, dtype=params_dtype, device=device)
            self.bias = _mark(nn.Parameter(empty), False)
            self.bias.sequence_parallel = sequence_parallel
        if init_method is not None:
            self.reset_parameters(init_method)

    @torch.no_grad()
    def reset_parameters(self, init_method: InitMethod) -> None:
        """weight <- this rank's columns of the master matrix `init_method` draws; bias <- 0."""
        _fill_slice_(self.weight, (self.output_size, self.input_size), 1, init_method)
        if self.bias is not None:
            self.bias.zero_()

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
