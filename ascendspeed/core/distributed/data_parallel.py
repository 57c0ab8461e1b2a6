"""Gradient accumulation into fp32 buffers, with each bucket's data-parallel reduction started as
soon as backward has produced its last gradient of the step (Megatron's overlapped local DDP).

The training loop does not say which micro-batch is the last one; it says how many backward
passes the step makes (`zero_grad(num_microbatches)`), and a per-parameter count in the
post-accumulate hook finds the last gradient. Buckets are launched strictly in index order (a
ready bucket waits for its predecessors), so every rank issues the same collectives in the same
order whatever the timing of its backward.
"""
from __future__ import annotations

import torch

from ascendspeed.core import parallel_state as ps
from ascendspeed.core.distributed.grad_buffer import Bucket, GradBuffer


def trainable_parameters(model_chunks: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """Registration order over the chunks, each parameter once (as get_param_groups)."""
    params, seen = [], set()
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


class DataParallelGrads:
    def __init__(self, model_chunks: list[torch.nn.Module], *, bucket_size: int,
                 overlap_grad_reduce: bool = True, distributed_optimizer: bool = False):
        self.params = trainable_parameters(model_chunks)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.overlap_grad_reduce = overlap_grad_reduce
        self.distributed_optimizer = distributed_optimizer
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for param in reversed(self.params):  # the order backward produces gradients
            by_dtype.setdefault(param.dtype, []).append(param)
        self.buffers: list[GradBuffer] = []
        self.buckets: list[Bucket] = []
        for params in by_dtype.values():
            buffer = GradBuffer(params, bucket_size=bucket_size,
                                dp_group=self.dp_group, dp_size=self.dp_size,
                                dp_rank=self.dp_rank,
                                distributed_optimizer=distributed_optimizer,
                                first_index=len(self.buckets))
            self.buffers.append(buffer)
            self.buckets.extend(buffer.buckets)
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        self.buffer_of = {p: buf for buf in self.buffers for p in buf.params}
        self._counts = {p: 0 for p in self.params}
        self._expected = 1
        self._next_bucket = 0
        self.launched_during_backward = 0  # buckets the hooks launched this step (overlap)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def zero_grad(self, num_microbatches: int = 1) -> None:
        """Start a step that will run `num_microbatches` backward passes."""
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        for bucket in self.buckets:
            bucket.reset()
        for buffer in self.buffers:
            buffer.grad_data.zero_()
        for param in self.params:
            param.grad = None
            self._counts[param] = 0
        self._expected = num_microbatches
        self._next_bucket = 0
        self.launched_during_backward = 0

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        """Post-accumulate hook: move the gradient into the fp32 buffer (freeing param.grad);
        after its last micro-batch, maybe launch its bucket's reduction."""
        param.main_grad.add_(param.grad)
        param.grad = None
        count = self._counts[param] = self._counts[param] + 1
        if count > self._expected:
            raise RuntimeError(f"parameter {tuple(param.shape)} got {count} gradients in a step "
                               f"announced with {self._expected} micro-batches: call "
                               f"optimizer.zero_grad(num_microbatches) before each step")
        if count == self._expected and self.overlap_grad_reduce:
            bucket = self.bucket_of[param]
            bucket.pending -= 1
            while (self._next_bucket < len(self.buckets)
                   and self.buckets[self._next_bucket].pending == 0):
                self.buckets[self._next_bucket].start_grad_sync()
                self._next_bucket += 1
                self.launched_during_backward += 1

    def finish_grad_sync(self) -> None:
        """Launch what backward did not (no overlap, or parameters without a gradient) in index
        order, then wait for every bucket."""
        for bucket in self.buckets:
            bucket.finish_grad_sync()
        self._next_bucket = len(self.buckets)

    def all_gather_params(self) -> None:
        """ZeRO-1: every rank's updated shards into everyone's parameters."""
        works = [bucket.all_gather_params() for bucket in self.buckets]
        for work in works:
            if work is not None:
                work.wait()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
