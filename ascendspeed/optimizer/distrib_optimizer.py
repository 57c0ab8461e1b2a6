"""ZeRO-1 (Megatron's distributed optimizer): each data-parallel rank keeps fp32 master weights
and AdamW state only for its shard of every gradient bucket.

Bucket by bucket (overlapped with backward as in plain DP), gradients are reduce-scattered so
each rank holds the DP mean of its shard; it unscales, checks and clips that shard (the norm sums
over DP too), steps it, and all-gathers the updated shards into the model's parameters, which
live in a flat buffer laid out as the gradients (grad_buffer.py). AdamW is elementwise, so the
sharded step equals the unsharded one, weight-decay groups included: each shard keeps the group
(and options) of the parameter it was cut from.

Per rank: master shard (fp32; for an fp32 model a view of the parameter itself) + exp_avg +
exp_avg_sq = about 1/DP of the unsharded optimizer's bytes. `optimizer.state_dict()` is this
rank's shard (a checkpoint saves one per DP rank).
"""
from __future__ import annotations

import torch

from ascendspeed.core.distributed import DataParallelGrads
from ascendspeed.optimizer.clip_grads import counts_toward_norm
from ascendspeed.optimizer.mixed_precision import (LossScaler, MakeOptimizer, MegatronOptimizer,
                                                   _groups_like)


class _Shard:
    """One parameter's slice [lo, hi) (flattened) owned by this DP rank, and its master."""

    def __init__(self, param: torch.nn.Parameter, lo: int, hi: int):
        self.param, self.lo, self.hi = param, lo, hi
        model_view = param.detach().view(-1)[lo:hi]
        # fp32 model: step the parameter's own elements; half precision: an fp32 copy.
        self.master = model_view if param.dtype == torch.float32 else model_view.float()
        self.counted = counts_toward_norm(param)

    @property
    def grad(self) -> torch.Tensor:
        return self.param.main_grad.view(-1)[self.lo:self.hi]

    @property
    def model_view(self) -> torch.Tensor:
        return self.param.detach().view(-1)[self.lo:self.hi]


class DistributedOptimizer(MegatronOptimizer):
    sharded = True

    def __init__(self, grads: DataParallelGrads, param_groups: list[dict],
                 make_optimizer: MakeOptimizer, scaler: LossScaler, clip_grad: float = 0.0,
                 check_for_overflow: bool = False):
        if not grads.distributed_optimizer:
            raise ValueError("DistributedOptimizer needs gradient buffers built with "
                             "distributed_optimizer=True (padded, sharded buckets)")
        super().__init__(grads, scaler, clip_grad, check_for_overflow)
        self.shards: dict[torch.nn.Parameter, _Shard] = {}
        for param in grads.params:
            bucket = grads.bucket_of[param]
            local = grads.buffer_of[param].local_range(param, bucket)
            if local is not None:
                self.shards[param] = _Shard(param, *local)
        # Every group is kept, even if this rank's shard of it is empty, so that param_groups
        # (what the LR scheduler and the log read) look the same on every rank.
        self.optimizer = make_optimizer(_groups_like(
            param_groups, lambda p: self.shards[p].master if p in self.shards else None))

    def _main_grads(self):
        grads, counted = [], []
        for shard in self.shards.values():
            grad = shard.master.grad = shard.grad  # fp32 buffer slice: a view, no copy
            grads.append(grad)
            if shard.counted:
                counted.append(grad)
        return grads, counted

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        for shard in self.shards.values():
            if shard.master.data_ptr() != shard.model_view.data_ptr():
                shard.model_view.copy_(shard.master)
        self.grads.all_gather_params()
