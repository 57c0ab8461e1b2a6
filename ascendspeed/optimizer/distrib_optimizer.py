"""ZeRO-1 (Megatron's distributed optimizer): each data-parallel rank keeps fp32 master weights
and AdamW state only for its shard of every gradient bucket.

Bucket by bucket (overlapped with backward as in plain DP), gradients are reduce-scattered so
each rank holds the DP mean of its shard; it unscales, checks and clips that shard (the norm sums
over DP too), steps it, and all-gathers the updated shards into the model's parameters, which
live in a flat buffer laid out as the gradients (grad_buffer.py). AdamW is elementwise, so the
sharded step equals the unsharded one, weight-decay groups included: each shard keeps the group
(and options) of the parameter it was cut from.

Per rank: master shard (fp32; for an fp32 model a view of the parameter itself) + exp_avg +
exp_avg_sq = about 1/DP of the unsharded optimizer's bytes.

Checkpoints: `state_dict(param_names)` gathers the shards over DP, bucket by bucket and state key
by key (one bucket-sized fp32 tensor at a time on the device), into full tensors by parameter
name on DP rank 0 (the same format as the unsharded optimizers, see mixed_precision.py), so a
state loads into any DP size, bucket layout or ZeRO setting; `load_state_dict` (every DP rank
passes the same full state) keeps this rank's slices. The inner torch optimizer's own
`state_dict()` is only this rank's shard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

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
        self.group_params = [list(g["params"]) for g in param_groups]

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

    # -- layout-independent state (checkpoints)
    def _local_entries(self):
        return [(p, s.master, (s.lo, s.hi), self._keeps_master(p)) for p, s in self.shards.items()]

    def _keeps_master(self, param):
        return param.dtype != torch.float32  # fp32: the master is a view of the parameter

    @torch.no_grad()
    def state_dict(self, param_names: dict[torch.nn.Parameter, str]) -> dict | None:
        """A collective over the DP group (every DP rank calls it): the full state on DP rank 0,
        None elsewhere."""
        names = self._names(param_names)
        grads = self.grads
        device = grads.buffers[0].grad_data.device
        index = {p: i for i, p in enumerate(grads.params)}
        # Each parameter's step (all its shards step together), -1 while it has no state, and
        # the per-element state keys, agreed over DP: DP rank 0 may hold none of a parameter.
        local_steps = [-1.0] * len(grads.params)
        keys: set[str] = set()
        for param, shard in self.shards.items():
            inner = self.optimizer.state.get(shard.master)
            if inner:
                local_steps[index[param]] = float(inner["step"])
                keys.update(k for k, v in inner.items() if torch.is_tensor(v) and v.dim() > 0)
        steps = torch.tensor(local_steps, dtype=torch.float32, device=device)
        if grads.dp_size > 1:
            dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=grads.dp_group)
            gathered = [None] * grads.dp_size
            dist.all_gather_object(gathered, sorted(keys), group=grads.dp_group)
            keys = {k for ks in gathered for k in ks}
        steps = steps.cpu().tolist()
        first = grads.dp_rank == 0
        state = {names[p]: {"step": steps[i]} for p, i in index.items() if steps[i] >= 0} \
            if first else {}
        for buffer in grads.buffers:
            gather = sorted(keys) + (["master"] if buffer.dtype != torch.float32 else [])
            for bucket in buffer.buckets:
                stateful = [p for p in bucket.params if steps[index[p]] >= 0]
                if not stateful:  # the same on every rank: the steps were agreed
                    continue
                shard_start = buffer.shard_start(bucket)
                bucket_start = buffer.bucket_start[bucket.index]
                shard_size = bucket.grad_data.numel() // bucket.dp_size
                for key in gather:
                    local = torch.zeros(shard_size, dtype=torch.float32, device=device)
                    for param in bucket.params:
                        shard = self.shards.get(param)
                        if shard is None:
                            continue
                        source = shard.master if key == "master" else \
                            self.optimizer.state.get(shard.master, {}).get(key)
                        if source is not None:
                            offset = buffer.ranges[param][0] + shard.lo - shard_start
                            local[offset:offset + shard.hi - shard.lo] = source
                    full = bucket.gather_shards(local)
                    del local
                    if first:
                        for param in stateful:
                            start, end = buffer.ranges[param]
                            state[names[param]][key] = full[start - bucket_start:
                                                            end - bucket_start].view(
                                param.shape).to("cpu", copy=True)
                    del full
        return self._pack(names, state) if first else None

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Master shards <- model weights (after loading weights without an optimizer state)."""
        for shard in self.shards.values():
            if shard.master.data_ptr() != shard.model_view.data_ptr():
                shard.master.copy_(shard.model_view)
