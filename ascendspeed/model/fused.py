"""Fused kernels, and the one place that chooses between them and the reference torch code.

`alibi_attention(q, k, v, slopes, key_offset=..., query_start=..., scale=...)`: causal ALiBi
attention through the C++ kernel (csrc/alibi_attention.cpp: flash-style forward and backward on
CPU, fp32 and bf16, no [s, s] tensor), returning the context as [b, s_q, heads, hd] (the layout
the output projection wants: `context.reshape(b, s, heads * hd)` is a view).
`reference_alibi_attention(...)`: the same computation the way BloomModel does it today
(F.scaled_dot_product_attention with an additive fp32 bias), same signature and output layout.

`select_attention_kernel(...)` is the selector: the C++ kernel on the CPU, flash-attn on CUDA and
npu_fusion_attention on Ascend NPUs (model/device_attention.py), each where it takes the call's
dtype, head dim, dropout and mask; otherwise None and the reason, and the caller takes the
reference path. `attention(..., fused=True)` applies it to one call; `fused=False`
(BloomConfig.fused_attention, i.e. `--no-fused-kernels`) always takes the reference.

Semantics shared by both: q [b, heads, s_q, hd], k and v [b, heads, s_k, hd] (any strides with the
last one 1); query row i sits at global position query_start + i and sees keys
key_offset[b] <= j <= query_start + i; score = scale * q.k + slope_h * key position. A row that
sees no key at all (a query inside the left padding) is, in both, the uniform average of every
value (what HF's additive mask gives: all scores equal), though nothing ever reads it.
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F

from ascendspeed.model import device_attention

__all__ = ["alibi_attention", "reference_alibi_attention", "attention", "fused_attention_available",
           "alibi_bias", "select_attention_kernel"]

CPU_KERNEL, FLASH_ATTN, NPU_FUSION_ATTENTION = "cpu", "flash_attn", "npu_fusion_attention"

# Query/key block sizes of the kernel (rows x keys per block product); tuned on a 2-core AVX-512
# machine (benchmarks/bench_attention.py). Both must be even.
BLOCK_Q = 64
BLOCK_K = 64

_module = None  # the compiled kernel, imported once
_module_error: str | None = None


def _load():
    """The compiled kernel for this CPU: AVX-512, AVX2 or baseline build, as torch's own CPU
    capability allows (it honours ATEN_CPU_CAPABILITY)."""
    global _module, _module_error
    if _module is None and _module_error is None:
        capability = torch.backends.cpu.get_cpu_capability().lower()
        names = {"avx512": ["avx512", "avx2", "default"], "avx2": ["avx2", "default"]}.get(
            capability, ["default"])
        for name in names:
            try:
                _module = importlib.import_module(f"ascendspeed._attn_{name}")
                break
            except ImportError as error:  # a partial build: try the next one down
                _module_error = f"ascendspeed._attn_{name}: {error}"
        if _module is not None:
            _module_error = None
    return _module


def fused_attention_available(q: torch.Tensor | None = None, dropout: float = 0.0) -> bool:
    """Whether alibi_attention can run (for these tensors, if given): the compiled module is there,
    the tensors are CPU float32/bfloat16 with a stride-1 head dimension, and dropout is 0."""
    if dropout > 0.0 or _load() is None:
        return False
    if q is not None:
        return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
                and q.dim() == 4 and q.stride(-1) == 1)
    return True


def select_attention_kernel(device_type: str, dtype: torch.dtype, head_dim: int, heads: int, *,
                            dropout: float, mask: str, query_start: int, s_q: int,
                            s_k: int) -> tuple[str | None, str | None]:
    """(kernel, None) for the kernel that runs this attention call on `device_type`, or (None,
    why not). `mask`: "causal" (no padding), "left" (left padding: key_offset) or "other" (any
    other attention mask: only the reference's additive bias expresses it)."""
    if mask == "other":
        return None, "an attention mask that is not left padding"
    if device_type == "cpu":
        if dropout > 0.0:
            return None, "attention dropout > 0"
        if dtype not in (torch.float32, torch.bfloat16):
            return None, f"the CPU kernel takes fp32/bf16, not {dtype}"
        if _load() is None:
            return None, f"the CPU kernel is not built: {_module_error}"
        return CPU_KERNEL, None
    why = device_attention.unsupported_reason(device_type, dtype, head_dim, heads, dropout, mask == "left",
                                              query_start, s_q, s_k)
    if why is not None:
        return None, why
    return (FLASH_ATTN if device_type == "cuda" else NPU_FUSION_ATTENTION), None


def kernel_info() -> str:
    module = _load()
    if module is None:
        return f"unavailable ({_module_error})"
    return f"{module.__name__} (at::vec {module.cpu_capability}, bf16 VNNI brgemm: {module.bf16_vnni_available()})"


class _AlibiAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, key_offset, query_start, scale):
        module = _load()
        out, lse = module.forward(q, k, v, slopes, key_offset, query_start, scale, BLOCK_Q, BLOCK_K)
        ctx.save_for_backward(q, k, v, out, lse, slopes, key_offset)
        ctx.query_start, ctx.scale = query_start, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, slopes, key_offset = ctx.saved_tensors
        dq, dk, dv = _load().backward(grad_out.contiguous(), q, k, v, out, lse, slopes, key_offset,
                                      ctx.query_start, ctx.scale, BLOCK_Q, BLOCK_K)
        return dq, dk, dv, None, None, None, None


def _check(q, k, v, slopes, key_offset):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [b, heads, s, hd]")
    if slopes.shape != (q.shape[1],):
        raise ValueError(f"slopes must be [heads] = [{q.shape[1]}], got {tuple(slopes.shape)}")
    if key_offset is not None and key_offset.shape != (q.shape[0],):
        raise ValueError(f"key_offset must be [b] = [{q.shape[0]}], got {tuple(key_offset.shape)}")


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *,
                    key_offset: torch.Tensor | None = None, query_start: int = 0,
                    scale: float | None = None, kernel: str = CPU_KERNEL,
                    npu_arguments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal ALiBi attention through a fused kernel (`kernel`, as select_attention_kernel
    chose it): context [b, s_q, heads, hd].

    q [b, heads, s_q, hd]; k, v [b, heads, s_k, hd] (strided views are fine, the head dimension
    must have stride 1); slopes fp32 [heads] (this rank's heads); key_offset int64 [b]: keys
    before it are padding; query_start: global position of query row 0 (cached tokens).
    `npu_arguments`: device_attention.npu_alibi_arguments' (pse, atten_mask), when the caller
    shares them across layers (built here otherwise)."""
    _check(q, k, v, slopes, key_offset)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    if key_offset is not None:
        key_offset = key_offset.to(device=q.device, dtype=torch.int64).contiguous()
    if kernel == FLASH_ATTN:
        context = device_attention.flash_alibi_attention(q, k, v, slopes, scale)
    elif kernel == NPU_FUSION_ATTENTION:
        if npu_arguments is None:
            npu_arguments = device_attention.npu_alibi_arguments(slopes, q.shape[2], k.shape[2], int(query_start),
                                                                 key_offset, scale, q.dtype, q.device)
        context = device_attention.npu_alibi_attention(q, k, v, *npu_arguments, scale)
    else:
        if not fused_attention_available(q):
            raise RuntimeError(f"the fused attention kernel is not available here: {kernel_info()}, "
                               f"q {q.dtype} on {q.device}")
        context = _AlibiAttention.apply(q, k, v, slopes, key_offset, int(query_start), scale)
    if key_offset is not None:  # queries inside the left padding: the kernels leave them undefined
        rows = int(query_start) + torch.arange(q.shape[2], device=q.device)
        padding = rows[None] < key_offset[:, None]  # [b, s_q]
        if bool(padding.any()):
            uniform = v.mean(dim=2)[:, None]  # [b, 1, heads, hd]
            context = torch.where(padding[:, :, None, None], uniform, context)
    return context


def alibi_bias(batch: int, slopes: torch.Tensor, s_q: int, s_k: int, key_offset: torch.Tensor | None = None,
               query_start: int = 0, device=None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The additive fp32 bias of the reference path (BloomModel.attention_bias is this):
    [1 or b, heads, s_q, s_k], ALiBi by key position (counted from each row's first real token)
    and the fp32 minimum where a key is in the future or padding. Padding: `key_offset` [b]
    (left padding) or any 0/1 `attention_mask` [b, s_k]."""
    device = slopes.device if device is None else device
    if key_offset is not None:
        attention_mask = torch.arange(s_k, device=device)[None] >= key_offset.to(device)[:, None]
    if attention_mask is None:
        positions = torch.arange(s_k, device=device, dtype=torch.float32)[None]
        key_ok = torch.ones(1, s_k, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.to(device=device, dtype=torch.long)
        positions = ((mask.cumsum(-1) - 1) * mask).to(torch.float32)
        key_ok = mask.bool()
    alibi = slopes.to(device=device, dtype=torch.float32)[None, :, None, None] * positions[:, None, None, :]
    causal = torch.ones(s_q, s_k, dtype=torch.bool, device=device).tril(diagonal=query_start)
    allowed = causal[None, None] & key_ok[:, None, None, :]
    return alibi.masked_fill(~allowed, torch.finfo(torch.float32).min)


def reference_alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *,
                              key_offset: torch.Tensor | None = None, query_start: int = 0,
                              scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """The reference: SDPA with the additive fp32 ALiBi + mask bias (as BloomModel does), context
    [b, s_q, heads, hd]. Also the path for attention dropout."""
    _check(q, k, v, slopes, key_offset)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bias = alibi_bias(q.shape[0], slopes, q.shape[2], k.shape[2], key_offset, query_start, q.device)
    if q.dtype == torch.float64:  # (tests' high-precision reference) SDPA wants a float64 mask then
        bias = bias.double()
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return context.transpose(1, 2)


def attention(q, k, v, slopes, *, key_offset=None, query_start=0, scale=None, dropout_p=0.0,
              fused: bool = True) -> torch.Tensor:
    """One call through the selector: the device's fused kernel when asked for and it takes these
    tensors and this dropout, otherwise the reference. Context [b, s_q, heads, hd]."""
    kernel, _ = select_attention_kernel(q.device.type, q.dtype, q.shape[-1], q.shape[1], dropout=dropout_p,
                                        mask="causal" if key_offset is None else "left",
                                        query_start=query_start, s_q=q.shape[2], s_k=k.shape[2])
    if fused and kernel is not None:
        return alibi_attention(q, k, v, slopes, key_offset=key_offset, query_start=query_start, scale=scale,
                               kernel=kernel)
    return reference_alibi_attention(q, k, v, slopes, key_offset=key_offset, query_start=query_start,
                                     scale=scale, dropout_p=dropout_p)
