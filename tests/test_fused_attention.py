"""The fused causal ALiBi attention kernel (ascendspeed.model.fused.alibi_attention) against the
reference (SDPA with the additive fp32 ALiBi + mask bias, as BloomModel builds it): forward and
dq/dk/dv, fp32 and bf16, odd lengths, head dims 64/80/128, strided qkv views, left padding,
KV-cache decode, non-power-of-two head counts, and the causal edge.

Tolerances:
- fp32: the kernel sums in a different order (blocked online softmax) and uses a 2-ulp-class
  vectorised exp, so it can only be expected to agree with the reference to about the reference's
  own fp32 error. We measure that error on the spot (reference in fp32 vs the same reference in
  fp64) and allow max(8 x that spread, 1e-5) relative to max |fp64 reference| of each tensor.
- bf16: inputs are rounded to bf16 for both paths; the kernel then rounds P and dS to bf16 for the
  block products (fp32 accumulation), and its outputs are rounded to bf16 (relative 2^-8 = 3.9e-3
  per element). The comparison is against the fp32 reference on the same bf16-rounded inputs, with
  3e-2 relative to max |reference|: a few bf16 roundings of the scale, far below what a wrong mask,
  slope or transpose produces (O(1) of the scale).
"""
import math

import pytest
import torch

from ascendspeed.model import fused
from ascendspeed.model.bloom import alibi_slopes



def test_the_kernel_is_built():
    """The install compiles it (setup.py): its absence is a broken install, not a skip."""
    assert fused.fused_attention_available(), fused.kernel_info()


def qkv_views(b, heads, s, hd, dtype, seed):
    """q, k, v as the model makes them: [b, heads, s, hd] strided views of one [b, s, heads, 3, hd]."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, s, heads, 3, hd, generator=generator).to(dtype)
    return [t.transpose(1, 2) for t in qkv.unbind(3)]


def kv_views(b, heads, s, hd, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(b, s, heads, 2, hd, generator=generator).to(dtype)
    return [t.transpose(1, 2) for t in kv.unbind(3)]


def run(fn, q, k, v, grad, slopes, dtype=None, **kwargs):
    """Output and (dq, dk, dv) of fn, computed on copies of q, k, v cast to dtype."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, slopes.to(torch.float64 if dtype == torch.float64 else torch.float32), **kwargs)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return [out.detach(), *grads]


def rel_err(got, want):
    """max |got - want| / max |want|, with max |want| floored at 1e-2: a tensor that is zero in exact
    arithmetic (dq with a single key) is compared on the scale of the O(1) inputs instead."""
    if want.numel() == 0:
        return 0.0
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-2)).item()


NAMES = ("out", "dq", "dk", "dv")


def upstream_grad(q, key_offset, seed, **_):
    """A random gradient of the [b, s_q, heads, hd] context, zero on rows inside the left padding.
    Those rows see no key: both paths output the uniform average of the values (as HF does) and
    that is compared; but their derivative is not defined (the reference's comes from scores that
    rounding made equal, the kernel's from the average), and nothing trains through them."""
    grad = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3],
                       generator=torch.Generator().manual_seed(seed))
    if key_offset is not None:
        grad[torch.arange(q.shape[2])[None] < key_offset[:, None]] = 0
    return grad


def compare(name, a, r, q, key_offset, query_start=0):
    return rel_err(a, r)


def check_fp32(q, k, v, slopes, key_offset=None, **kwargs):
    grad = upstream_grad(q, key_offset, 99)
    kwargs["key_offset"] = key_offset
    ours = run(fused.alibi_attention, q, k, v, grad, slopes, **kwargs)
    ref32 = run(fused.reference_alibi_attention, q, k, v, grad, slopes, **kwargs)
    ref64 = run(fused.reference_alibi_attention, q, k, v, grad, slopes, dtype=torch.float64, **kwargs)
    for name, a, r32, r64 in zip(NAMES, ours, ref32, ref64):
        assert a.dtype == torch.float32
        spread = compare(name, r32, r64, q, key_offset)
        err = compare(name, a, r64, q, key_offset)
        assert err <= max(8 * spread, 1e-5), (name, err, spread)


def check_bf16(q, k, v, slopes, key_offset=None, **kwargs):
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    grad = upstream_grad(q, key_offset, 98).to(torch.bfloat16)
    kwargs["key_offset"] = key_offset
    ours = run(fused.alibi_attention, q, k, v, grad, slopes, **kwargs)
    ref = run(fused.reference_alibi_attention, q, k, v, grad.float(), slopes, dtype=torch.float32, **kwargs)
    for name, a, r in zip(NAMES, ours, ref):
        assert a.dtype == torch.bfloat16
        err = compare(name, a, r, q, key_offset)
        assert err <= 3e-2, (name, err)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("b,heads,s,hd", [(2, 3, 1, 64), (2, 4, 7, 80), (1, 2, 33, 128), (2, 6, 129, 64),
                                          (1, 5, 71, 80), (2, 2, 200, 64)])
def test_matches_reference(dtype, b, heads, s, hd):
    q, k, v = qkv_views(b, heads, s, hd, torch.float32, seed=s + hd)
    assert not q.is_contiguous()
    slopes = alibi_slopes(heads)  # 3, 5, 6 heads: the non-power-of-two slope series
    (check_fp32 if dtype == "fp32" else check_bf16)(q, k, v, slopes)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_contiguous_inputs_and_layout(dtype):
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    q, k, v = (t.contiguous().to(dt) for t in qkv_views(2, 4, 65, 64, torch.float32, seed=1))
    out = fused.alibi_attention(q, k, v, alibi_slopes(4))
    assert out.shape == (2, 65, 4, 64) and out.is_contiguous()  # [b, s, heads, hd]
    ref = fused.reference_alibi_attention(q.float(), k.float(), v.float(), alibi_slopes(4))
    assert rel_err(out, ref) <= (1e-5 if dtype == "fp32" else 3e-2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_left_padding(dtype):
    b, heads, s, hd = 3, 4, 70, 64
    q, k, v = qkv_views(b, heads, s, hd, torch.float32, seed=5)
    key_offset = torch.tensor([0, 5, 66])  # 66: a whole 64-key block of padding is skipped
    (check_fp32 if dtype == "fp32" else check_bf16)(q, k, v, alibi_slopes(heads), key_offset=key_offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s_q", [1, 3, 20])
def test_decode_equals_last_rows_of_full(dtype, s_q):
    """query_start = cached tokens: new rows equal the last rows of one full computation."""
    b, heads, total, hd = 2, 6, 150, 64
    q, k, v = (t.to(dtype) for t in qkv_views(b, heads, total, hd, torch.float32, seed=11))
    slopes = alibi_slopes(heads)
    full = fused.alibi_attention(q, k, v, slopes)
    past = total - s_q
    new = fused.alibi_attention(q[:, :, past:], k, v, slopes, query_start=past)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(new, full[:, past:]) <= tol
    ref = fused.reference_alibi_attention(q[:, :, past:].float(), k.float(), v.float(), slopes, query_start=past)
    assert rel_err(new, ref) <= (1e-5 if dtype == torch.float32 else 3e-2)


def test_decode_with_left_padding():
    b, heads, total, hd = 3, 4, 90, 80
    q, k, v = qkv_views(b, heads, total, hd, torch.float32, seed=12)
    key_offset = torch.tensor([0, 7, 30])
    slopes = alibi_slopes(heads)
    new = fused.alibi_attention(q[:, :, -1:], k, v, slopes, key_offset=key_offset, query_start=total - 1)
    ref = fused.reference_alibi_attention(q[:, :, -1:], k, v, slopes, key_offset=key_offset, query_start=total - 1)
    assert rel_err(new, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [7, 64, 65, 130])
def test_future_keys_do_not_matter(dtype, s):
    """Perturbing key/value j changes only rows i >= j (and their gradients): the causal edge."""
    b, heads, hd = 2, 3, 64
    q, k, v = (t.to(dtype) for t in qkv_views(b, heads, s, hd, torch.float32, seed=s))
    slopes = alibi_slopes(heads)
    base = fused.alibi_attention(q, k, v, slopes)
    for j in sorted({0, s // 2, s - 1}):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 3.0
        v2[:, :, j] -= 5.0
        out = fused.alibi_attention(q, k2, v2, slopes)
        assert torch.equal(out[:, :j], base[:, :j]), j
        assert not torch.equal(out[:, j:], base[:, j:]), j
    # Gradients: dk, dv of a key only come from rows at or after it.
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fused.alibi_attention(*leaves, slopes)
    grad = torch.zeros_like(out)
    grad[:, : s // 2] = 1.0
    dq, dk, dv = torch.autograd.grad(out, leaves, grad)
    assert torch.all(dk[:, :, s // 2:] == 0) and torch.all(dv[:, :, s // 2:] == 0)
    assert torch.all(dq[:, :, s // 2:] == 0)


def test_scale_argument():
    q, k, v = qkv_views(1, 2, 40, 64, torch.float32, seed=2)
    out = fused.alibi_attention(q, k, v, alibi_slopes(2), scale=0.3)
    ref = fused.reference_alibi_attention(q, k, v, alibi_slopes(2), scale=0.3)
    assert rel_err(out, ref) <= 1e-5
    default = fused.alibi_attention(q, k, v, alibi_slopes(2))
    assert rel_err(default, fused.alibi_attention(q, k, v, alibi_slopes(2), scale=1 / math.sqrt(64))) == 0


def test_selector_and_switch():
    q, k, v = qkv_views(1, 2, 20, 64, torch.float32, seed=3)
    slopes = alibi_slopes(2)
    assert fused.fused_attention_available(q)
    assert not fused.fused_attention_available(q, dropout=0.1)
    assert not fused.fused_attention_available(q.half())
    fused_out = fused.attention(q, k, v, slopes)
    ref_out = fused.attention(q, k, v, slopes, fused=False)
    assert rel_err(fused_out, ref_out) <= 1e-5
    assert torch.equal(ref_out, fused.reference_alibi_attention(q, k, v, slopes))
    # Dropout goes to the reference path (and is random there).
    torch.manual_seed(0)
    dropped = fused.attention(q, k, v, slopes, dropout_p=0.5)
    assert dropped.shape == fused_out.shape


def test_bias_matches_bloom_attention_bias():
    from ascendspeed.model.bloom import BloomConfig, BloomModel

    config = BloomConfig(vocab_size=64, hidden_size=48, num_layers=1, num_attention_heads=6)
    model = BloomModel(config)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = model.attention_bias(2, 2, mask, "cpu", past=4)
    got = fused.alibi_bias(2, alibi_slopes(6), 2, 6, key_offset=torch.tensor([2, 0]), query_start=4)
    assert torch.equal(got, want)
    assert torch.equal(fused.alibi_bias(1, alibi_slopes(6), 5, 5), model.attention_bias(1, 5, None, "cpu"))


def test_rejects_bad_inputs():
    q, k, v = qkv_views(1, 2, 10, 64, torch.float32, seed=4)
    with pytest.raises(ValueError):
        fused.alibi_attention(q, k, v, alibi_slopes(3))
    with pytest.raises(RuntimeError):
        fused.alibi_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, alibi_slopes(2))
