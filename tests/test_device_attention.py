"""The accelerator attention paths' arguments and the selector, on the CPU.

No GPU or NPU runs here (the accelerator tier, tests/test_accelerator.py, runs the kernels
themselves). What the CPU can check: that the selector sends each call where it belongs, with
the reason logged when it cannot, and that the arguments we build for each kernel, fed through
that kernel's documented formula, give BLOOM's attention:
- npu_fusion_attention: softmax(scale * (q k^T + pse), masked where atten_mask is True) v;
- flash-attn: bias -slope * |i + s_k - s_q - j| with the causal mask aligned to the last keys.
Both are computed in float64 here and compared with the reference path (SDPA with BLOOM's
additive bias) in float64, so the tolerance is float64 rounding over a softmax of s_k terms.
"""
from __future__ import annotations

import math

import pytest
import torch

from ascendspeed.model import device_attention, fused
from ascendspeed.model.bloom import alibi_slopes

# float64 end to end: a few ulps of 1e-16 per op over a softmax of at most 40 keys.
REL = 1e-12


def _qkv(b, heads, s_q, s_k, hd, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, s_q, hd, generator=g, dtype=torch.float64)
    k = torch.randn(b, heads, s_k, hd, generator=g, dtype=torch.float64)
    v = torch.randn(b, heads, s_k, hd, generator=g, dtype=torch.float64)
    return q, k, v


def _npu_formula(q, k, v, pse, atten_mask, scale):
    """npu_fusion_attention as documented (pse added before the scale), context [b, s_q, heads, hd]."""
    scores = scale * (q @ k.transpose(-1, -2) + pse)
    mask = atten_mask if atten_mask.dim() == 4 else atten_mask[None, None]
    scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _flash_formula(q, k, v, slopes, scale):
    """flash_attn_func(causal=True, alibi_slopes=slopes) as documented, context [b, s_q, heads, hd]."""
    s_q, s_k = q.shape[2], k.shape[2]
    i = torch.arange(s_q)[:, None]
    j = torch.arange(s_k)[None]
    bias = -slopes.double()[:, None, None] * (i + s_k - s_q - j).abs()
    scores = scale * (q @ k.transpose(-1, -2)) + bias
    scores = scores.masked_fill(j > i + s_k - s_q, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("s_q,s_k,query_start", [(24, 24, 0), (5, 29, 24), (1, 40, 39)])
def test_npu_arguments_give_bloom_attention(s_q, s_k, query_start):
    heads, hd = 4, 16
    q, k, v = _qkv(2, heads, s_q, s_k, hd)
    slopes = alibi_slopes(heads)
    scale = 1 / math.sqrt(hd)
    pse, mask = device_attention.npu_alibi_arguments(slopes, s_q, s_k, query_start, None, scale,
                                                     torch.float64, "cpu")
    assert pse.shape == (1, heads, s_q, s_k) and mask.shape == (s_q, s_k) and mask.dtype == torch.bool
    expected = fused.reference_alibi_attention(q, k, v, slopes, query_start=query_start, scale=scale)
    assert _rel(_npu_formula(q, k, v, pse, mask, scale), expected) < REL


def test_npu_arguments_with_left_padding():
    heads, hd, s = 2, 16, 12
    q, k, v = _qkv(3, heads, s, s, hd, seed=1)
    slopes = alibi_slopes(heads)
    key_offset = torch.tensor([0, 3, 7])
    scale = 1 / math.sqrt(hd)
    pse, mask = device_attention.npu_alibi_arguments(slopes, s, s, 0, key_offset, scale, torch.float64, "cpu")
    assert mask.shape == (3, 1, s, s)
    got = _npu_formula(q, k, v, pse, mask, scale)
    expected = fused.reference_alibi_attention(q, k, v, slopes, key_offset=key_offset, scale=scale)
    for b, offset in enumerate(key_offset.tolist()):  # rows inside the padding see no key: not compared
        assert _rel(got[b, offset:], expected[b, offset:]) < REL


def test_npu_pse_carries_the_bias_over_the_scale():
    """The kernel multiplies pse by the scale: pse = slope * (j - qpos) * sqrt(hd) at scale 1/sqrt(hd)."""
    slopes = alibi_slopes(2)
    pse, _ = device_attention.npu_alibi_arguments(slopes, 3, 3, 0, None, 0.125, torch.float32, "cpu")
    assert pse[0, 1, 2, 0].item() == pytest.approx(slopes[1].item() * (0 - 2) * 8)
    assert pse[0, 0, 2, 2].item() == 0.0


@pytest.mark.parametrize("s_q,s_k", [(16, 16), (3, 20), (1, 33)])
def test_flash_alibi_formula_is_bloom_attention_when_queries_are_the_last_keys(s_q, s_k):
    heads, hd = 4, 8
    q, k, v = _qkv(2, heads, s_q, s_k, hd, seed=2)
    slopes = alibi_slopes(heads)
    scale = 1 / math.sqrt(hd)
    expected = fused.reference_alibi_attention(q, k, v, slopes, query_start=s_k - s_q, scale=scale)
    assert _rel(_flash_formula(q, k, v, slopes, scale), expected) < REL


def test_flash_alignment_is_why_the_selector_needs_queries_at_the_end():
    """Queries that are not the last s_q positions would get flash-attn's bottom-right mask: wrong,
    so the selector refuses them."""
    heads, hd, s_q, s_k = 2, 8, 4, 10
    q, k, v = _qkv(1, heads, s_q, s_k, hd, seed=3)
    slopes = alibi_slopes(heads)
    expected = fused.reference_alibi_attention(q, k, v, slopes, query_start=2, scale=1 / math.sqrt(hd))
    assert _rel(_flash_formula(q, k, v, slopes, 1 / math.sqrt(hd)), expected) > 1e-3
    reason = device_attention.unsupported_reason("cuda", torch.bfloat16, 64, 8, 0.0, False, 2, s_q, s_k)
    assert reason == "flash-attn aligns the causal mask to the last keys"


def _select(device_type, dtype=torch.bfloat16, head_dim=64, heads=8, dropout=0.0, mask="causal",
            query_start=0, s_q=32, s_k=32):
    return fused.select_attention_kernel(device_type, dtype, head_dim, heads, dropout=dropout, mask=mask,
                                         query_start=query_start, s_q=s_q, s_k=s_k)


def test_selector_on_cpu():
    assert _select("cpu", torch.float32) == ("cpu", None)
    assert _select("cpu", torch.bfloat16, mask="left") == ("cpu", None)
    assert _select("cpu", torch.float16) == (None, "the CPU kernel takes fp32/bf16, not torch.float16")
    assert _select("cpu", dropout=0.1) == (None, "attention dropout > 0")
    assert _select("cpu", mask="other") == (None, "an attention mask that is not left padding")


def test_selector_restrictions_on_accelerators():
    assert _select("cuda", torch.float32)[1] == "flash-attn takes fp16/bf16, not torch.float32"
    assert "multiples of 8 up to 256" in _select("cuda", head_dim=320)[1]
    assert _select("cuda", mask="left")[1] == "flash-attn's dense kernel has no key padding (left-padded batch)"
    assert _select("cuda", dropout=0.1)[1] == "attention dropout > 0"
    assert "multiples of 16 up to 512" in _select("npu", head_dim=72)[1]
    assert "at most 256 heads" in _select("npu", heads=512)[1]
    assert _select("npu", torch.float32)[1] == "npu_fusion_attention takes fp16/bf16, not torch.float32"
    assert _select("xpu")[1] == "no device attention kernel for xpu"


def test_selector_names_a_missing_library():
    """Where the optional library is absent (as on this CPU machine) the call goes to the reference
    with the import failure as the reason; where it is present the kernel is chosen."""
    try:
        import flash_attn  # noqa: F401
    except Exception:
        kernel, why = _select("cuda")
        assert kernel is None and why.startswith("flash-attn is not importable")
    else:
        assert _select("cuda")[0] in ("flash_attn", None)
    try:
        import torch_npu  # noqa: F401
    except Exception:
        kernel, why = _select("npu")
        assert kernel is None and why.startswith("torch_npu is not importable")
