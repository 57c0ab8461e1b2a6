"""Causal ALiBi attention on accelerators: the CUDA and NPU kernels behind fused.attention's selector.

Both take and return the layouts of fused.alibi_attention: q [b, heads, s_q, hd], k and v
[b, heads, s_k, hd] (strided views of the fused QKV projection), context [b, s_q, heads, hd];
query row i sits at position query_start + i and sees keys j <= query_start + i.

- CUDA: `flash_attn.flash_attn_func(..., causal=True, alibi_slopes=slopes)` (flash-attn >= 2.4,
  an optional install). Its bias is -slope * |i + s_k - s_q - j|, and with the causal mask aligned
  to the bottom right (row i sees j <= i + s_k - s_q) that is slope * (j - qpos): BLOOM's slope * j
  less a per-row constant, which softmax ignores. So it serves exactly the calls whose queries are
  the last s_q of the s_k positions (query_start = s_k - s_q: training, prefill, decode with a
  cache) and that have no key padding; fp16/bf16 only, head dim <= 256.
- NPU: `torch_npu.npu_fusion_attention` in the BSND layout with the ALiBi term as `pse` and a bool
  causal (+ padding) `atten_mask` (True = masked), sparse_mode 0 (the mask given in full). The
  kernel computes scale * (q k^T + pse), so pse carries the bias divided by the scale (the
  "square" form slope * (j - qpos) that Ascend's own BLOOM-style models fed it, pre-multiplied by
  sqrt(hd)); fp16/bf16 only, head dim a multiple of 16 up to 512, at most 256 heads.

`unsupported_reason(...)` says why a call cannot take the device kernel (None when it can); the
caller then takes the reference path (SDPA with the additive bias) and logs the reason once.
The imports of flash_attn and torch_npu happen here and only here, on first use.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["unsupported_reason", "flash_alibi_attention", "npu_alibi_arguments", "npu_alibi_attention"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLASH_ATTN_MIN_VERSION = (2, 4)  # the first release with alibi_slopes


@functools.lru_cache(maxsize=1)
def _flash_attn():
    """(flash_attn_func, None) or (None, why not)."""
    try:
        import flash_attn
    except Exception as error:  # absent, or built for another torch/CUDA
        return None, f"flash-attn is not importable ({type(error).__name__}: {error})"
    version = tuple(int(part) for part in flash_attn.__version__.split(".")[:2] if part.isdigit())
    if version < FLASH_ATTN_MIN_VERSION:
        return None, f"flash-attn {flash_attn.__version__} has no ALiBi (needs >= 2.4)"
    return flash_attn.flash_attn_func, None


@functools.lru_cache(maxsize=1)
def _npu_fusion_attention():
    try:
        import torch_npu
    except Exception as error:
        return None, f"torch_npu is not importable ({type(error).__name__}: {error})"
    op = getattr(torch_npu, "npu_fusion_attention", None)
    if op is None:
        return None, "this torch_npu has no npu_fusion_attention"
    return op, None


def unsupported_reason(device_type: str, dtype: torch.dtype, head_dim: int, heads: int,
                       dropout: float, left_padding: bool, query_start: int, s_q: int,
                       s_k: int) -> str | None:
    """Why the device's ALiBi kernel cannot run this call, or None when it can."""
    if dropout > 0.0:
        return "attention dropout > 0"
    if device_type == "cuda":
        if dtype not in HALF_DTYPES:
            return f"flash-attn takes fp16/bf16, not {dtype}"
        if head_dim > 256 or head_dim % 8:
            return f"flash-attn takes head dims that are multiples of 8 up to 256, not {head_dim}"
        if left_padding:
            return "flash-attn's dense kernel has no key padding (left-padded batch)"
        if query_start != s_k - s_q:
            return "flash-attn aligns the causal mask to the last keys"
        return _flash_attn()[1]
    if device_type == "npu":
        if dtype not in HALF_DTYPES:
            return f"npu_fusion_attention takes fp16/bf16, not {dtype}"
        if head_dim % 16 or head_dim > 512:
            return f"npu_fusion_attention takes head dims that are multiples of 16 up to 512, not {head_dim}"
        if heads > 256:
            return f"npu_fusion_attention takes at most 256 heads per device, not {heads}"
        return _npu_fusion_attention()[1]
    return f"no device attention kernel for {device_type}"


def flash_alibi_attention(q, k, v, slopes: torch.Tensor, scale: float) -> torch.Tensor:
    """flash-attn's causal ALiBi attention: context [b, s_q, heads, hd]."""
    flash_attn_func, why = _flash_attn()
    if flash_attn_func is None:
        raise RuntimeError(why)
    # [b, heads, s, hd] -> [b, s, heads, hd]: the layout flash-attn wants (views, stride-1 head dim).
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=True,
                           alibi_slopes=slopes.to(device=q.device, dtype=torch.float32).contiguous())


def npu_alibi_arguments(slopes: torch.Tensor, s_q: int, s_k: int, query_start: int,
                        key_offset: torch.Tensor | None, scale: float, dtype: torch.dtype,
                        device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pse, atten_mask) for npu_fusion_attention, built once per forward and shared by the layers:
    pse [1, heads, s_q, s_k] = slope * (j - qpos) / scale in `dtype` (the kernel scales after
    adding it), atten_mask bool, True where a key is in the future or padding: [s_q, s_k], or
    [b, 1, s_q, s_k] with left padding `key_offset` [b]."""
    qpos = query_start + torch.arange(s_q, device=device)
    keys = torch.arange(s_k, device=device)
    distance = (keys[None] - qpos[:, None]).to(torch.float32)  # [s_q, s_k], <= 0 where allowed
    slopes = slopes.to(device=device, dtype=torch.float32)
    pse = (slopes[:, None, None] * distance[None] / scale).to(dtype)[None]
    masked = keys[None] > qpos[:, None]
    if key_offset is not None:
        padding = keys[None] < key_offset.to(device)[:, None]  # [b, s_k]
        masked = masked[None, None] | padding[:, None, None, :]
    return pse, masked


def npu_alibi_attention(q, k, v, pse: torch.Tensor, atten_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """npu_fusion_attention with the ALiBi pse: context [b, s_q, heads, hd]."""
    op, why = _npu_fusion_attention()
    if op is None:
        raise RuntimeError(why)
    heads = q.shape[1]
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # BSND
    outputs = op(q, k, v, heads, "BSND", pse=pse, atten_mask=atten_mask, scale=scale, keep_prob=1.0,
                 sparse_mode=0)
    return outputs[0]
