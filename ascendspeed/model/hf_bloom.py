"""Hugging Face BloomForCausalLM <-> our BloomModel: names, and the TP slice of each tensor.

Column-parallel weights (query_key_value, dense_h_to_4h) and their biases are split on dim 0, the
row-parallel weights (dense, dense_4h_to_h) on dim 1, the word embeddings by vocabulary rows;
LayerNorms and row-parallel biases are replicated. The [heads, 3, head_dim] QKV layout is shared
with HF, so contiguous chunks keep whole heads.
"""
from __future__ import annotations

import torch

from ascendspeed.model.bloom import BloomConfig

_BLOCK = {  # ours -> (HF suffix, split dim or None for replicated)
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "input_layernorm.bias": ("input_layernorm.bias", None),
    "self_attention.query_key_value.weight": ("self_attention.query_key_value.weight", 0),
    "self_attention.query_key_value.bias": ("self_attention.query_key_value.bias", 0),
    "self_attention.dense.weight": ("self_attention.dense.weight", 1),
    "self_attention.dense.bias": ("self_attention.dense.bias", None),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", None),
    "post_attention_layernorm.bias": ("post_attention_layernorm.bias", None),
    "mlp.dense_h_to_4h.weight": ("mlp.dense_h_to_4h.weight", 0),
    "mlp.dense_h_to_4h.bias": ("mlp.dense_h_to_4h.bias", 0),
    "mlp.dense_4h_to_h.weight": ("mlp.dense_4h_to_h.weight", 1),
    "mlp.dense_4h_to_h.bias": ("mlp.dense_4h_to_h.bias", None),
}


def name_map(config: BloomConfig) -> dict[str, tuple[str, int | None]]:
    """Our parameter name -> (HF name, TP split dim or None)."""
    names = {"word_embeddings.weight": ("transformer.word_embeddings.weight", 0),
             "final_layernorm.weight": ("transformer.ln_f.weight", None),
             "final_layernorm.bias": ("transformer.ln_f.bias", None)}
    if config.embed_layernorm:
        names["embedding_layernorm.weight"] = ("transformer.word_embeddings_layernorm.weight", None)
        names["embedding_layernorm.bias"] = ("transformer.word_embeddings_layernorm.bias", None)
    for i in range(config.num_layers):
        for ours, (hf, dim) in _BLOCK.items():
            names[f"layers.{i}.{ours}"] = (f"transformer.h.{i}.{hf}", dim)
    return names


def shard_from_hf(hf_state_dict: dict[str, torch.Tensor], config: BloomConfig, tp_rank: int,
                  tp_size: int) -> dict[str, torch.Tensor]:
    """Our TP rank's state dict from a full HF state dict (the vocab padded with zero rows)."""
    out = {}
    for ours, (hf, dim) in name_map(config).items():
        if hf not in hf_state_dict:
            raise KeyError(f"Hugging Face checkpoint has no {hf} (needed for {ours})")
        tensor = hf_state_dict[hf]
        if ours == "word_embeddings.weight" and tensor.shape[0] < config.vocab_size:
            padding = tensor.new_zeros(config.vocab_size - tensor.shape[0], tensor.shape[1])
            tensor = torch.cat([tensor, padding])
        if dim is not None:
            tensor = tensor.chunk(tp_size, dim=dim)[tp_rank]
        out[ours] = tensor.clone().contiguous()
    return out
