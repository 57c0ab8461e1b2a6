"""The fused bias + GeLU against its reference (the written-out BLOOM formula, ascendspeed's and
Hugging Face's): values and gradients of the input and the bias, fp32 and bf16."""
import pytest
import torch
from transformers.models.bloom.modeling_bloom import bloom_gelu_back, bloom_gelu_forward

from ascendspeed.model.bias_gelu import bias_gelu
from ascendspeed.model.bloom import bloom_gelu


def _run(function, y, bias, grad):
    y, bias = y.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    out = function(y, bias)
    out.backward(grad)
    return out.detach(), y.grad, bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_bias_gelu_equals_the_written_out_formula(dtype):
    generator = torch.Generator().manual_seed(0)
    y = (3 * torch.randn(4, 7, 96, generator=generator)).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype)
    grad = torch.randn(4, 7, 96, generator=generator).to(dtype)
    fused = _run(bias_gelu, y, bias, grad)
    reference = _run(lambda a, b: bloom_gelu(a + b), y, bias, grad)
    # HF's BLOOM GeLU and its hand-written derivative, in float64: the exact values.
    z = (y + bias).double()
    exact_out = bloom_gelu_forward(z)
    exact_grad = bloom_gelu_back(grad.double(), (z,))  # HF unpacks its saved tuple
    exact = (exact_out, exact_grad, exact_grad.sum(dim=(0, 1)))
    # The same function in another evaluation order: fp32 agrees with float64 to a few ulps of
    # each tensor's scale (the bias gradient sums 28 rows: a few more); bf16 to its rounding
    # (2^-8 relative), doubled for the bias gradient's bf16 sum.
    relative = 1e-6 if dtype == torch.float32 else 2 ** -7
    for name, ours, ref, truth in zip(("out", "grad y", "grad bias"), fused, reference, exact):
        assert ours.dtype == dtype
        scale = truth.abs().max().item()
        assert (ours.double() - truth).abs().max().item() <= relative * scale * 4, name
        assert (ref.double() - truth).abs().max().item() <= relative * scale * 4, name


def test_without_bias():
    y = torch.randn(5, 8)
    assert torch.allclose(bias_gelu(y, None), bloom_gelu(y), rtol=1e-6, atol=1e-7)
