"""Cross-entropy over vocab-parallel logits: each TP rank holds V / TP columns and nothing is
gathered; three all-reduces (max, target logit, sum of exponentials) give the exact loss.

Two implementations of the same loss:
- `vocab_parallel_cross_entropy` (the fused one): reads the logits in their own dtype, in row
  chunks, with fp32 arithmetic; keeps only the logits (which exist anyway) and a per-row
  log-sum-exp for backward, and writes the gradient once, in the logits' dtype. No fp32 copy of
  [tokens, V/TP] is ever made (a chunk's is, ~CHUNK_ELEMENTS).
  Exception: fp32 logits at TP = 1 go to ATen's fused F.cross_entropy, which measures faster
  there (benchmarks: `cross entropy fp32`) and makes no extra copy of fp32 logits either.
- `reference_vocab_parallel_cross_entropy`: the plain path (fp32 logits; the softmax saved;
  F.cross_entropy at TP = 1), kept as the reference the fused one is tested against.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ascendspeed.core import parallel_state as ps


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        group = ps.get_tensor_model_parallel_group()
        parallel = ps.get_tensor_model_parallel_world_size() > 1
        logits_max = logits.max(dim=-1)[0]
        if parallel:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)

        local_vocab = logits.size(-1)
        start = ps.get_tensor_model_parallel_rank() * local_vocab
        outside = (target < start) | (target >= start + local_vocab)
        local_target = (target - start).masked_fill(outside, 0)
        flat = logits.view(-1, local_vocab)
        rows = torch.arange(flat.size(0), device=flat.device)
        predicted = flat[rows, local_target.view(-1)].view_as(target).masked_fill(outside, 0.0)
        if parallel:
            dist.all_reduce(predicted, group=group)

        exp_logits = logits.exp()
        sum_exp = exp_logits.sum(dim=-1)
        if parallel:
            dist.all_reduce(sum_exp, group=group)
        loss = torch.log(sum_exp) - predicted

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax.clone()
        flat = grad.view(-1, grad.size(-1))
        rows = torch.arange(flat.size(0), device=flat.device)
        flat[rows, local_target.view(-1)] -= (~outside).view(-1).to(grad.dtype)
        grad.mul_(grad_output.unsqueeze(-1))
        return grad, None


def reference_vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor,
                                           target: torch.Tensor) -> torch.Tensor:
    """Per-token loss [..] for logits [.., V/TP] (computed in fp32) and global target ids."""
    vocab_parallel_logits = vocab_parallel_logits.float()
    if ps.get_tensor_model_parallel_world_size() == 1:  # the whole vocab is here
        flat = vocab_parallel_logits.reshape(-1, vocab_parallel_logits.size(-1))
        return F.cross_entropy(flat, target.reshape(-1), reduction="none").view_as(target)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target)


CHUNK_ELEMENTS = 1 << 22  # fp32 scratch per chunk: 16 MiB, whatever the vocabulary


def _row_chunks(rows: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        group = ps.get_tensor_model_parallel_group()
        parallel = ps.get_tensor_model_parallel_world_size() > 1
        width = logits.size(-1)
        flat, flat_target = logits.reshape(-1, width), target.reshape(-1)
        start = ps.get_tensor_model_parallel_rank() * width
        outside = (flat_target < start) | (flat_target >= start + width)
        local_target = (flat_target - start).masked_fill(outside, 0)
        rows = torch.arange(flat.size(0), device=flat.device)
        # The max is exact in any dtype; the target logit is this rank's (0 elsewhere).
        logits_max = flat.max(dim=-1)[0].float()
        predicted = flat[rows, local_target].float().masked_fill(outside, 0.0)
        if parallel:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(predicted, group=group)
        sum_exp = torch.empty_like(logits_max)
        for lo, hi in _row_chunks(flat.size(0), width):
            shifted = flat[lo:hi].to(torch.float32, copy=True).sub_(logits_max[lo:hi, None])
            sum_exp[lo:hi] = shifted.exp_().sum(dim=-1)
        if parallel:
            dist.all_reduce(sum_exp, group=group)
        log_sum_exp = sum_exp.log_().add_(logits_max)
        ctx.save_for_backward(logits, log_sum_exp, local_target, outside)
        return (log_sum_exp - predicted).view(target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        logits, log_sum_exp, local_target, outside = ctx.saved_tensors
        width = logits.size(-1)
        flat = logits.reshape(-1, width)
        grad = torch.empty_like(flat)
        grad_rows = grad_output.reshape(-1).float()
        hit = (~outside).float()
        for lo, hi in _row_chunks(flat.size(0), width):
            softmax = flat[lo:hi].to(torch.float32, copy=True).sub_(log_sum_exp[lo:hi, None]).exp_()
            rows = torch.arange(hi - lo, device=flat.device)
            softmax[rows, local_target[lo:hi]] -= hit[lo:hi]
            grad[lo:hi] = softmax.mul_(grad_rows[lo:hi, None])
        return grad.view(logits.shape), None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor,
                                 target: torch.Tensor) -> torch.Tensor:
    """Per-token loss [..] (fp32) for logits [.., V/TP] in any float dtype and global target ids;
    the gradient comes back in the logits' dtype."""
    if (ps.get_tensor_model_parallel_world_size() == 1
            and vocab_parallel_logits.dtype == torch.float32):
        return reference_vocab_parallel_cross_entropy(vocab_parallel_logits, target)
    return _ChunkedVocabParallelCrossEntropy.apply(vocab_parallel_logits, target)
