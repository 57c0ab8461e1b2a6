"""bias + BLOOM's tanh GeLU, fused as Megatron's bias_gelu: forward gelu(y + b) with ATen's tanh
GeLU kernel, saving only the inputs y and b; backward recomputes y + b and applies ATen's fused
gelu_backward (one pass) instead of autograd walking the eight saved elementwise ops of the
written-out formula.

BLOOM's constant 0.79788456 and sqrt(2/pi) are the same float32 number, so in fp32/bf16 (fp32
arithmetic) this is BLOOM's GeLU; the results differ from the written-out formula only in the
rounding of the evaluation order (~1 ulp). tests/test_bias_gelu.py compares both with HF.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _BiasGeLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, bias)
        return F.gelu(y + bias, approximate="tanh")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, bias = ctx.saved_tensors
        grad_input = torch.ops.aten.gelu_backward(grad, y + bias, approximate="tanh")
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad_input.reshape(-1, grad_input.shape[-1]).sum(dim=0)
        return grad_input, grad_bias


def bias_gelu(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu(y + bias) along the last dim (bias may be None)."""
    if bias is None:
        return F.gelu(y, approximate="tanh")
    return _BiasGeLU.apply(y, bias)
