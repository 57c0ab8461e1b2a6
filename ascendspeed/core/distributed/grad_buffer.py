"""Contiguous gradient buffers and their buckets.

Every trainable parameter gets `param.main_grad`, an fp32 view into one flat buffer per parameter
dtype, so micro-batch gradients accumulate in fp32 whatever the model's precision. Parameters are
laid out in reverse registration order (the order backward produces their gradients) and grouped
into buckets of about `bucket_size` elements; a bucket is the unit of data-parallel reduction.

For the distributed optimizer (ZeRO-1) every bucket is padded to a multiple of the DP size and
split into DP equal shards: rank r owns shard r of each bucket (its gradients are reduce-scattered
there, it steps those elements, then all-gathers them). The parameters then also live in a flat
buffer of the model dtype with the same layout, so the all-gather writes straight into them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# torch 2.13 names the flat-tensor collectives *_single; older torch builds only have the *_tensor names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def bucket_layout(numels: list[int], alone: list[bool], bucket_size: int,
                  pad_to: int = 1) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(param ranges, bucket ranges) in elements. A bucket closes once it holds >= bucket_size
    elements; a parameter marked `alone` gets a bucket of its own (the shared embedding: its DP
    shard ranges must be the same on the first and the last pipeline stage). Every bucket's
    length is padded up to a multiple of `pad_to` (the DP size under ZeRO-1)."""
    params, buckets = [], []
    start = offset = 0

    def close():
        nonlocal start, offset
        if offset > start:
            offset = start + -(-(offset - start) // pad_to) * pad_to
            buckets.append((start, offset))
            start = offset

    for numel, single in zip(numels, alone):
        if single:
            close()
        params.append((offset, offset + numel))
        offset += numel
        if single or offset - start >= bucket_size:
            close()
    close()
    return params, buckets


@dataclass(eq=False)
class Bucket:
    """Parameters whose gradients are reduced together, and the in-flight reduction."""
    index: int
    params: list[torch.nn.Parameter]
    grad_data: torch.Tensor  # fp32 view of the buffer, padded
    param_data: torch.Tensor | None  # model-dtype view (ZeRO-1 only)
    dp_group: object
    dp_size: int
    dp_rank: int
    shard_grads: bool  # ZeRO-1: reduce-scatter instead of all-reduce
    pending: int = 0  # parameters still expecting a micro-batch gradient this step
    launched: bool = False
    work: object = field(default=None, repr=False)

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This DP rank's shard of a bucket-shaped tensor."""
        size = tensor.numel() // self.dp_size
        return tensor[self.dp_rank * size:(self.dp_rank + 1) * size]

    def start_grad_sync(self) -> None:
        """Average over DP, asynchronously: scale first (as Megatron's gradient_scaling_factor)
        so that the sum the collective makes is already the mean."""
        self.launched = True
        if self.dp_size == 1:
            return
        self.grad_data.div_(self.dp_size)
        if self.shard_grads:
            self.work = _reduce_scatter(self.shard(self.grad_data), self.grad_data,
                                        group=self.dp_group, async_op=True)
        else:
            self.work = dist.all_reduce(self.grad_data, group=self.dp_group, async_op=True)

    def finish_grad_sync(self) -> None:
        if not self.launched:
            self.start_grad_sync()
        if self.work is not None:
            self.work.wait()
            self.work = None

    def all_gather_params(self) -> dist.Work | None:
        """Start gathering every rank's updated shard into param_data (ZeRO-1)."""
        if self.dp_size == 1:
            return None
        return _all_gather(self.param_data, self.shard(self.param_data), group=self.dp_group,
                           async_op=True)

    def gather_shards(self, shard: torch.Tensor) -> torch.Tensor:
        """Every DP rank's `shard` (this rank's part of a bucket-shaped tensor), concatenated
        in rank order into a new bucket-sized tensor on every rank (synchronous collective)."""
        if self.dp_size == 1:
            return shard.clone()
        full = torch.empty(shard.numel() * self.dp_size, dtype=shard.dtype, device=shard.device)
        _all_gather(full, shard.contiguous(), group=self.dp_group)
        return full

    def reset(self) -> None:
        if self.work is not None:  # never zero a buffer a collective is still reading
            self.work.wait()
        self.work, self.launched, self.pending = None, False, len(self.params)


class GradBuffer:
    """One flat fp32 gradient buffer (and, for ZeRO-1, one flat model-dtype parameter buffer)
    for parameters of one dtype, given in the order their gradients appear."""

    def __init__(self, params: list[torch.nn.Parameter], *, bucket_size: int, dp_group,
                 dp_size: int, dp_rank: int, distributed_optimizer: bool, first_index: int = 0):
        self.params = params
        self.dtype = params[0].dtype
        alone = [bool(getattr(p, "shared_embedding", False)) for p in params]
        ranges, bucket_ranges = bucket_layout([p.numel() for p in params], alone, bucket_size,
                                              dp_size if distributed_optimizer else 1)
        total = bucket_ranges[-1][1]
        device = params[0].device
        self.grad_data = torch.zeros(total, dtype=torch.float32, device=device)
        self.param_data = None
        if distributed_optimizer:  # the parameters move into a buffer laid out as the grads
            self.param_data = torch.zeros(total, dtype=self.dtype, device=device)
        self.ranges: dict[torch.nn.Parameter, tuple[int, int]] = {}
        for param, (start, end) in zip(params, ranges):
            self.ranges[param] = (start, end)
            param.main_grad = self.grad_data[start:end].view(param.shape)
            if self.param_data is not None:
                view = self.param_data[start:end].view(param.shape)
                view.copy_(param.data)
                param.data = view
        self.buckets: list[Bucket] = []
        for start, end in bucket_ranges:
            members = [p for p in params if start <= self.ranges[p][0] < end]
            self.buckets.append(Bucket(
                index=first_index + len(self.buckets), params=members,
                grad_data=self.grad_data[start:end],
                param_data=None if self.param_data is None else self.param_data[start:end],
                dp_group=dp_group, dp_size=dp_size, dp_rank=dp_rank,
                shard_grads=distributed_optimizer, pending=len(members)))
        self.bucket_start = {b.index: s for b, (s, _) in zip(self.buckets, bucket_ranges)}

    def shard_start(self, bucket: Bucket) -> int:
        """Offset in this buffer of this DP rank's shard of `bucket` (ZeRO-1)."""
        return (self.bucket_start[bucket.index]
                + bucket.dp_rank * (bucket.grad_data.numel() // bucket.dp_size))

    def local_range(self, param: torch.nn.Parameter, bucket: Bucket) -> tuple[int, int] | None:
        """The part [lo, hi) of the flattened `param` inside this DP rank's shard of its bucket
        (ZeRO-1), or None when the shard holds none of it."""
        start, end = self.ranges[param]
        bucket_start = self.bucket_start[bucket.index]
        shard_size = bucket.grad_data.numel() // bucket.dp_size
        shard_start = bucket_start + bucket.dp_rank * shard_size
        lo, hi = max(start, shard_start), min(end, shard_start + shard_size)
        return (lo - start, hi - start) if lo < hi else None
