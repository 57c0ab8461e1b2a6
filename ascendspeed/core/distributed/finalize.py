"""After the data-parallel reduction: the gradient sums that cross model-parallel ranks.

Under sequence parallelism each TP rank's LayerNorm / row-parallel-bias gradient covers only its
tokens, so those gradients (parameters marked `sequence_parallel`) are summed over TP. With
pipeline parallelism the first stage's word embeddings and the last stage's head copy of them
(`shared_embedding`) get their gradients summed over the embedding group, so they stay equal.
Under ZeRO-1 only this DP rank's shard of a gradient is valid after the reduce-scatter; summing
whole tensors is still right because the shards line up on the ranks being summed over (same
shapes across TP; the embedding sits alone in its bucket on both stages).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ascendspeed.core import parallel_state as ps


def _all_reduce_coalesced(grads: list[torch.Tensor], group) -> None:
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def finalize_model_grads(params: list[torch.nn.Parameter]) -> None:
    if ps.get_tensor_model_parallel_world_size() > 1:
        grads = [p.main_grad for p in params if getattr(p, "sequence_parallel", False)]
        if grads:
            _all_reduce_coalesced(grads, ps.get_tensor_model_parallel_group())
    if ps.is_rank_in_embedding_group():
        grads = [p.main_grad for p in params if getattr(p, "shared_embedding", False)]
        if grads:
            _all_reduce_coalesced(grads, ps.get_embedding_group())
