"""Cross-entropy over vocab-parallel logits: each TP rank holds V / TP columns and nothing is
gathered; three all-reduces (max, target logit, sum of exponentials) give the exact loss."""
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


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor,
                                 target: torch.Tensor) -> torch.Tensor:
    """Per-token loss [..] for logits [.., V/TP] (fp32 recommended) and global target ids."""
    if ps.get_tensor_model_parallel_world_size() == 1:  # the whole vocab is here: the fused kernel
        flat = vocab_parallel_logits.reshape(-1, vocab_parallel_logits.size(-1))
        return F.cross_entropy(flat, target.reshape(-1), reduction="none").view_as(target)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target)
