"""BLOOM, split by tensor parallelism.

    ids -> word embeddings -> embedding LayerNorm -> dropout
        -> L x [ x + drop(attn(LN(x))) ;  x + drop(mlp(LN(x))) ]
        -> final LayerNorm -> logits = x @ word_embeddings^T (tied head, no bias)

Attention is causal with ALiBi: score(q, k) = q.k / sqrt(hd) + slope_h * pos_k (softmax ignores
the per-row constant that the textbook slope * (k - q) would add). The fused QKV output is ordered
[heads, 3, head_dim]. The numerics are Hugging Face's BloomForCausalLM's (tests/test_bloom_model.py
holds the logits to it). The parallel machinery lives in ascendspeed.core: this file only says which
layers are split by columns, by rows or by vocabulary.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import (ColumnParallelLinear, NormalInit,
                                              RowParallelLinear, VocabParallelEmbedding,
                                              copy_to_tensor_model_parallel_region, divide,
                                              gather_from_sequence_parallel_region,
                                              get_rng_tracker, vocab_parallel_cross_entropy)
from ascendspeed.core.tensor_parallel.layers import inference_linear
from ascendspeed.core.tensor_parallel.cross_entropy import reference_vocab_parallel_cross_entropy
from ascendspeed.core.tensor_parallel.random import checkpoint
from ascendspeed.model import device_attention, fused
from ascendspeed.model.bias_gelu import bias_gelu

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BloomConfig:
    vocab_size: int  # padded: divisible by the tensor-parallel size
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int | None = None  # 4 * hidden_size
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    embed_layernorm: bool = True
    init_seed: int = 1234
    params_dtype: torch.dtype = torch.float32
    # "full": keep only each block's input and recompute the block in backward. "selective"
    # (Megatron's): recompute only the attention core (scores, softmax, dropout, context) and
    # keep q, k, v; it saves what the attention kernel stores for backward: the s x s
    # probabilities on the math path (attention dropout > 0, or a device without a fused
    # kernel), only the output and its log-sum-exp on a flash kernel.
    recompute_granularity: str | None = None
    # Sequence parallelism: outside the TP regions (LayerNorms, dropouts, residuals) each TP rank
    # holds s/tp tokens of the activations [b, s/tp, h]. Ignored at TP=1.
    sequence_parallel: bool = False
    # Fused kernels (each op's plain PyTorch path stays as its reference; --no-fused-kernels).
    fused_cross_entropy: bool = True
    fused_bias_gelu: bool = True
    fused_attention: bool = True  # the C++ causal ALiBi kernel where it applies (model/fused.py)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by "
                             f"--num-attention-heads {self.num_attention_heads}")

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class InferenceCache:
    """Keys and values of the tokens already processed, for generation: per layer number,
    [b, this TP rank's heads, past, head_dim]. A forward given the cache attends over past + new
    tokens, appends the new keys/values and advances `length`. One cache per pipeline stage.

    The keys/values live in buffers preallocated for `capacity` tokens (the prompt plus the tokens
    to generate, when the caller knows it; otherwise, or when a forward runs past it, a buffer grows
    by doubling): each forward writes its new tokens in place and attends over a view of the
    first past + new. `keys[layer]` / `values[layer]` are those views."""
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    length: int = 0  # tokens cached so far (the same for every layer after a forward)
    capacity: int = 0  # tokens to preallocate for (0: as many as the first forward brings)
    _buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """The layer's keys and values over past + new tokens (and remember them)."""
        past = self.keys[layer].shape[2] if layer in self.keys else 0
        end = past + k.shape[2]
        buffers = self._buffers.get(layer)
        if buffers is None or buffers[0].shape[2] < end:
            size = max(end, self.capacity, 2 * buffers[0].shape[2] if buffers is not None else 0)
            grown = tuple(t.new_empty(t.shape[0], t.shape[1], size, t.shape[3]) for t in (k, v))
            if past:
                grown[0][:, :, :past].copy_(self.keys[layer])
                grown[1][:, :, :past].copy_(self.values[layer])
            buffers = self._buffers[layer] = grown
        key_buffer, value_buffer = buffers
        key_buffer[:, :, past:end].copy_(k)
        value_buffer[:, :, past:end].copy_(v)
        self.keys[layer], self.values[layer] = key_buffer[:, :, :end], value_buffer[:, :, :end]
        return self.keys[layer], self.values[layer]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Slopes for all heads, computed as Hugging Face does (float32 powers) for bit-parity."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:  # the odd powers of the 2*closest series fill the remaining heads
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh GELU with the truncated constant 0.79788456 (what BLOOM trained with)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


@dataclass
class AttentionMask:
    """What every layer's attention needs, built once per forward: the additive fp32 bias for
    the reference path (SDPA), or, for a fused kernel (bias None), which one (fused.py's
    selector), this rank's slopes, the left padding of each row, the global position of the
    first query (cached tokens) and, for the NPU kernel, its pse and bool mask."""
    slopes: torch.Tensor
    bias: torch.Tensor | None = None
    key_offset: torch.Tensor | None = None
    query_start: int = 0
    kernel: str = fused.CPU_KERNEL
    npu_arguments: tuple[torch.Tensor, torch.Tensor] | None = None


class BloomAttention(nn.Module):
    """(Parameters unfilled: BloomBlock.reset_parameters fills them.)"""

    def __init__(self, config: BloomConfig, device=None):
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        self.heads = divide(config.num_attention_heads, tp, "--num-attention-heads")
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.recompute_core = config.recompute_granularity == "selective"
        h, dtype = config.hidden_size, config.params_dtype
        sp = _sequence_parallel(config)
        self.query_key_value = ColumnParallelLinear(h, 3 * h, None, params_dtype=dtype,
                                                    device=device, sequence_parallel=sp)
        self.dense = RowParallelLinear(h, h, None, skip_bias_add=True, params_dtype=dtype,
                                       device=device, sequence_parallel=sp)

    def forward(self, x: torch.Tensor, mask: AttentionMask, cache: InferenceCache | None = None,
                layer_number: int = 0):
        inference = cache is not None
        # under sequence parallelism: the full sequence, gathered
        qkv = self.query_key_value.forward_inference(x) if inference else self.query_key_value(x)
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.heads, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # [b, heads, s, hd]
        if cache is not None:  # generation: keys/values over past + new tokens
            k, v = cache.extend(layer_number, k, v)
        if self.training and self.recompute_core:
            context = checkpoint(self._core, q, k, v, mask)
        else:
            context = self._core(q, k, v, mask)
        context = context.reshape(b, s, self.heads * self.head_dim)  # from [b, s, heads, hd]
        return self.dense.forward_inference(context) if inference else self.dense(context)

    def _core(self, q, k, v, mask: AttentionMask):
        """softmax(q k^T / sqrt(hd) + ALiBi + mask) v with attention dropout, per head, as
        [b, s, heads, hd]: the fused kernel when the mask says so, else SDPA with the bias."""
        scale = 1.0 / math.sqrt(self.head_dim)
        if mask.bias is None:
            return fused.alibi_attention(q, k, v, mask.slopes, key_offset=mask.key_offset,
                                         query_start=mask.query_start, scale=scale, kernel=mask.kernel,
                                         npu_arguments=mask.npu_arguments)
        dropout = self.dropout if self.training else 0.0
        with get_rng_tracker().fork():  # each TP rank drops out its own heads independently
            # The bias stays fp32 with bf16/fp16 q, k, v: ALiBi in bf16 loses up to 0.5 per score.
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bias,
                                                     dropout_p=dropout, scale=scale)
        return context.transpose(1, 2)


class BloomMLP(nn.Module):
    """(Parameters unfilled: BloomBlock.reset_parameters fills them.)"""

    def __init__(self, config: BloomConfig, device=None):
        super().__init__()
        h, ffn, dtype = config.hidden_size, config.ffn_size, config.params_dtype
        sp = _sequence_parallel(config)
        self.fused_bias_gelu = config.fused_bias_gelu
        self.dense_h_to_4h = ColumnParallelLinear(h, ffn, None, params_dtype=dtype, device=device,
                                                  sequence_parallel=sp,
                                                  skip_bias_add=config.fused_bias_gelu)
        self.dense_4h_to_h = RowParallelLinear(ffn, h, None, skip_bias_add=True,
                                               params_dtype=dtype, device=device,
                                               sequence_parallel=sp)

    def forward(self, x: torch.Tensor, inference: bool = False):
        """`inference`: generation (the layers' forward_inference)."""
        up = self.dense_h_to_4h.forward_inference(x) if inference else self.dense_h_to_4h(x)
        activation = bias_gelu(*up) if self.fused_bias_gelu else bloom_gelu(up)
        if inference:
            return self.dense_4h_to_h.forward_inference(activation)
        return self.dense_4h_to_h(activation)


class BloomBlock(nn.Module):
    """(Parameters unfilled: reset_parameters fills them.)"""

    def __init__(self, config: BloomConfig, layer_number: int, device=None):
        super().__init__()
        self.config = config
        h, eps, dtype = config.hidden_size, config.layernorm_epsilon, config.params_dtype
        sp = _sequence_parallel(config)
        self.input_layernorm = _layernorm(h, eps, dtype, sp, device)
        self.self_attention = BloomAttention(config, device)
        self.post_attention_layernorm = _layernorm(h, eps, dtype, sp, device)
        self.mlp = BloomMLP(config, device)
        self.hidden_dropout = config.hidden_dropout
        self.sequence_parallel = sp
        self.layer_number = layer_number

    def reset_parameters(self) -> None:
        """The seeded init: one stream per block (_layer_seed), drawn in this order. N(0, std)
        for the input projections, N(0, std / sqrt(2 L)) for the output ones (Megatron's scaled
        init), zero biases, LayerNorms at weight 1 and bias 0."""
        config = self.config
        generator = torch.Generator().manual_seed(_layer_seed(config.init_seed, self.layer_number))
        std = config.init_method_std
        output_std = std / math.sqrt(2.0 * config.num_layers)
        self.self_attention.query_key_value.reset_parameters(NormalInit(std, generator))
        self.self_attention.dense.reset_parameters(NormalInit(output_std, generator))
        self.mlp.dense_h_to_4h.reset_parameters(NormalInit(std, generator))
        self.mlp.dense_4h_to_h.reset_parameters(NormalInit(output_std, generator))
        self.input_layernorm.reset_parameters()
        self.post_attention_layernorm.reset_parameters()

    def forward(self, x: torch.Tensor, mask: AttentionMask,
                cache: InferenceCache | None = None) -> torch.Tensor:
        out, bias = self.self_attention(self.input_layernorm(x), mask, cache, self.layer_number)
        x = x + _hidden_dropout(out + bias, self.hidden_dropout, self.training, self.sequence_parallel)
        out, bias = self.mlp(self.post_attention_layernorm(x), cache is not None)
        return x + _hidden_dropout(out + bias, self.hidden_dropout, self.training,
                                   self.sequence_parallel)


def _sequence_parallel(config: BloomConfig) -> bool:
    return config.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1


def _layernorm(h: int, eps: float, dtype, sequence_parallel: bool, device=None) -> nn.LayerNorm:
    """A LayerNorm; under sequence parallelism each TP rank normalises different tokens, so its
    gradients are partial sums that the optimizer adds up over TP (`sequence_parallel`)."""
    norm = nn.LayerNorm(h, eps=eps, dtype=dtype, device=device)
    for param in norm.parameters():
        param.sequence_parallel = sequence_parallel
    return norm


def _hidden_dropout(x: torch.Tensor, p: float, training: bool, sequence_parallel: bool):
    """Hidden dropout draws one mask for the replicated activations from the default stream
    (identical on every TP rank); under sequence parallelism each rank holds different tokens, so
    it draws from its own TP-rank stream."""
    if not training or p == 0.0:
        return x
    if sequence_parallel:
        with get_rng_tracker().fork():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)


@functools.cache
def _note_reference_attention(reason: str) -> None:
    logger.warning("attention: %s; the reference path (SDPA with an ALiBi bias) runs instead of "
                   "the fused kernel", reason)


def _left_padding(attention_mask: torch.Tensor, total: int) -> torch.Tensor | None:
    """Each row's count of leading padding when the mask [b, total] is left padding only (zeros
    then ones), else None."""
    if attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {total}")
    real = attention_mask.bool()
    offset = (real.long().cumsum(-1) == 0).sum(-1)
    positions = torch.arange(total, device=real.device)
    return offset if bool((real == (positions[None] >= offset[:, None])).all()) else None


def _layer_seed(seed: int, layer_number: int) -> int:
    """Each component draws its initial weights from its own stream, so a layer starts the same
    whatever the parallel layout (layer 0 = the embedding)."""
    return (seed * 1_000_003 + layer_number) % (2 ** 63)


class BloomModel(nn.Module):
    """One pipeline stage (or chunk) of BLOOM: the embedding when `pre_process`, the blocks
    `layer_numbers` (1-based, global), and the final LayerNorm + tied head when `post_process`.
    The default is the whole model.

    With pipeline parallelism the last stage holds its own copy of the word embeddings for the
    head. Both copies start from the same seed, and their gradients are summed over the embedding
    group, so they stay identical (the parameter carries `shared_embedding = True`).

    The parameters are allocated on `device` and filled by `reset_parameters` (the seeded init).
    On "meta" (the argument or torch.device("meta") around the constructor) nothing is allocated
    or filled: `to_empty(device=...)` then allocates them on their device, for reset_parameters
    or a checkpoint to fill, and no full matrix is ever built on the host.
    """

    def __init__(self, config: BloomConfig, pre_process: bool = True, post_process: bool = True,
                 layer_numbers: Sequence[int] | None = None, device=None):
        super().__init__()
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_numbers = list(range(1, config.num_layers + 1) if layer_numbers is None
                                  else layer_numbers)
        h, eps, dtype = config.hidden_size, config.layernorm_epsilon, config.params_dtype
        self.word_embeddings = None
        if pre_process or post_process:
            self.word_embeddings = VocabParallelEmbedding(
                config.vocab_size, h, None, params_dtype=dtype, device=device,
                sequence_parallel=pre_process and _sequence_parallel(config))
            self.word_embeddings.weight.shared_embedding = not (pre_process and post_process)
        sp = self.sequence_parallel = _sequence_parallel(config)
        # The embedding LayerNorm's eps is fixed at 1e-5 in Megatron-DeepSpeed and HF alike.
        self.embedding_layernorm = (_layernorm(h, 1e-5, dtype, sp, device)
                                    if pre_process and config.embed_layernorm else None)
        self.layers = nn.ModuleList(BloomBlock(config, n, device) for n in self.layer_numbers)
        self.final_layernorm = _layernorm(h, eps, dtype, sp, device) if post_process else None
        slopes = self._rank_alibi_slopes()
        self.register_buffer("alibi_slopes", slopes if device is None else slopes.to(device),
                             persistent=False)
        if not any(param.is_meta for param in self.parameters()):
            self.reset_parameters()

    def _rank_alibi_slopes(self) -> torch.Tensor:
        """Slopes of all heads, then this rank's contiguous block (matching the QKV column split)."""
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        heads = divide(self.config.num_attention_heads, tp, "--num-attention-heads")
        return alibi_slopes(self.config.num_attention_heads)[rank * heads:(rank + 1) * heads].clone()

    def reset_parameters(self) -> None:
        """The seeded init of every parameter: each component from its own stream (_layer_seed;
        the embedding is layer 0), so any TP size or pipeline layout starts from the same
        numbers; N(0, std) embeddings, LayerNorms at weight 1 and bias 0."""
        if self.word_embeddings is not None:
            generator = torch.Generator().manual_seed(_layer_seed(self.config.init_seed, 0))
            self.word_embeddings.reset_parameters(NormalInit(self.config.init_method_std, generator))
        for norm in (self.embedding_layernorm, self.final_layernorm):
            if norm is not None:
                norm.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()

    def to_empty(self, *, device, recurse: bool = True) -> BloomModel:
        """nn.Module.to_empty: the parameters allocated on `device`, unfilled (reset_parameters or
        a checkpoint fills them). It keeps what torch's would lose: the parameters' attributes
        (tensor_model_parallel, sequence_parallel, ...; leaving "meta" makes new Parameter
        objects) and the ALiBi slopes (a computed buffer, not loaded from checkpoints)."""
        attributes = {name: dict(vars(param)) for name, param in self.named_parameters()}
        super().to_empty(device=device, recurse=recurse)
        for name, param in self.named_parameters():
            vars(param).update(attributes[name])
        self.alibi_slopes = self._rank_alibi_slopes().to(device)
        return self

    def attention_mask(self, batch: int, seq: int, attention_mask: torch.Tensor | None,
                       x: torch.Tensor, past: int = 0) -> AttentionMask:
        """The fused kernel's arguments when the selector (fused.select_attention_kernel) finds
        one for this forward's device, dtype, dropout and mask, else the reference bias."""
        slopes = self.alibi_slopes.to(x.device)
        dropout = self.config.attention_dropout if self.training else 0.0
        if self.config.fused_attention:
            key_offset = None if attention_mask is None else _left_padding(attention_mask, past + seq)
            kind = "causal" if attention_mask is None else ("left" if key_offset is not None else "other")
            kernel, why = fused.select_attention_kernel(
                x.device.type, x.dtype, self.config.head_dim, len(slopes), dropout=dropout, mask=kind,
                query_start=past, s_q=seq, s_k=past + seq)
            if kernel is not None:
                npu_arguments = (device_attention.npu_alibi_arguments(
                    slopes, seq, past + seq, past, key_offset, 1.0 / math.sqrt(self.config.head_dim), x.dtype,
                    x.device) if kernel == fused.NPU_FUSION_ATTENTION else None)
                return AttentionMask(slopes, key_offset=key_offset, query_start=past, kernel=kernel,
                                     npu_arguments=npu_arguments)
            _note_reference_attention(why)
        return AttentionMask(slopes, bias=self.attention_bias(batch, seq, attention_mask, x.device,
                                                              past))

    def attention_bias(self, batch: int, seq: int, attention_mask: torch.Tensor | None,
                       device, past: int = 0) -> torch.Tensor:
        """Additive fp32 bias [b or 1, heads, s, past + s]: ALiBi by key position, and the dtype
        minimum where a key is in the future or padding (a fully masked row becomes uniform, as in
        HF). With `past` cached tokens the queries are the last s of past + s positions and the
        mask covers all past + s (as HF's with a KV cache)."""
        total = past + seq
        if attention_mask is not None and attention_mask.shape[-1] != total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected "
                             f"{total} ({past} cached + {seq} new)")
        return fused.alibi_bias(batch, self.alibi_slopes, seq, total, query_start=past,
                                device=device, attention_mask=attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None,
                cache: InferenceCache | None = None, last_only: bool = False) -> torch.Tensor:
        """The whole model: vocab-parallel logits [b, s, V/tp]; or, given labels, the per-token
        loss [b, s] (fp32). A stage without the embedding takes the previous stage's output as
        `hidden_states` (input_ids still give the shape); one without the head returns its
        hidden states ([b, s/tp, h] under sequence parallelism).

        Generation passes a `cache` (this stage's InferenceCache): input_ids are then only the new
        tokens, attention_mask (if any) covers the cached and the new ones, and the cache grows.
        `last_only` (generation, without labels): the logits of the last position only,
        [b, 1, V/tp] (the final LayerNorm and head run for that position alone)."""
        b, s = input_ids.shape
        tp = ps.get_tensor_model_parallel_world_size()
        if cache is not None and (self.sequence_parallel or self.training):
            raise ValueError("the inference cache needs eval() and no sequence parallelism")
        if self.sequence_parallel and s % tp:
            raise ValueError(f"sequence parallelism: sequence length {s} is not divisible by the "
                             f"tensor-parallel size {tp}")
        if self.pre_process:
            x = self.word_embeddings(input_ids)
            if self.embedding_layernorm is not None:
                x = self.embedding_layernorm(x)
            x = _hidden_dropout(x, self.config.hidden_dropout, self.training, self.sequence_parallel)
        else:
            if hidden_states is None:
                raise ValueError("a pipeline stage without the embedding needs hidden_states")
            x = hidden_states
        past = 0 if cache is None else cache.length
        mask = self.attention_mask(b, s, attention_mask, x, past)
        recompute = self.training and self.config.recompute_granularity == "full"
        for layer in self.layers:
            if cache is not None:
                x = layer(x, mask, cache)
            else:
                x = checkpoint(layer, x, mask) if recompute else layer(x, mask)
        if cache is not None:
            cache.length += s
        if not self.post_process:
            return x
        if last_only and labels is not None:
            raise ValueError("last_only gives logits, not a loss: pass no labels")
        if last_only and not self.sequence_parallel:
            x = x[:, -1:]  # the LayerNorm and head work per token: skip the other positions
        x = self.final_layernorm(x)
        x = (gather_from_sequence_parallel_region(x) if self.sequence_parallel
             else copy_to_tensor_model_parallel_region(x))
        if last_only and self.sequence_parallel:
            x = x[:, -1:]
        logits = (inference_linear(x, self.word_embeddings.weight, contiguous=False)
                  if labels is None and (last_only or cache is not None)
                  else F.linear(x, self.word_embeddings.weight))
        if labels is None:
            return logits
        if self.config.fused_cross_entropy:
            return vocab_parallel_cross_entropy(logits, labels)
        return reference_vocab_parallel_cross_entropy(logits, labels)
