"""Write a synthetic Megatron-DeepSpeed BLOOM pipeline checkpoint (the layout that
ascendspeed/checkpoint/megatron_deepspeed.py reads) from a Hugging Face BloomForCausalLM, TP-split
as ascendspeed/checkpoint/tensors.py says: what the BigScience BLOOM checkpoints look like,
down to the mp_rank files' pickled argparse.Namespace, numpy RNG state and Megatron enum."""
from __future__ import annotations

import argparse
import contextlib
import enum
import os
import random
import sys
import types

import numpy as np
import torch

from ascendspeed.checkpoint.megatron_deepspeed import concat_dim


class PositionEmbeddingType(enum.Enum):
    """Megatron-DeepSpeed's megatron.enums.PositionEmbeddingType (args.position_embedding_type)."""
    rotary = 1
    absolute = 2
    alibi = 3


@contextlib.contextmanager
def _megatron_enums_importable():
    """Pickle PositionEmbeddingType by reference as megatron.enums.PositionEmbeddingType, as a
    real Megatron-DeepSpeed run does (megatron itself is not installed here)."""
    saved = {name: sys.modules.get(name) for name in ("megatron", "megatron.enums")}
    package, module = types.ModuleType("megatron"), types.ModuleType("megatron.enums")
    package.enums, module.PositionEmbeddingType = module, PositionEmbeddingType
    original_module = PositionEmbeddingType.__module__
    PositionEmbeddingType.__module__ = "megatron.enums"
    sys.modules.update({"megatron": package, "megatron.enums": module})
    try:
        yield
    finally:
        PositionEmbeddingType.__module__ = original_module
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def _shard(name: str, tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    dim = concat_dim(name)
    part = tensor if dim is None else tensor.chunk(tp, dim=dim)[rank]
    return part.clone().contiguous()


def layer_states(hf_model, tp: int, dtype: torch.dtype) -> dict[int, list[dict[str, torch.Tensor]]]:
    """{layer file index: [state dict of TP rank r]} with §3a's local keys."""
    state = {k.removeprefix("transformer."): v.detach().to(dtype)
             for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    num_layers = hf_model.config.n_layer
    layers: dict[int, dict[str, str]] = {  # layer index -> {Meg-DS key: HF name}
        1: {"word_embeddings.weight": "word_embeddings.weight",
            "word_embeddings.norm.weight": "word_embeddings_layernorm.weight",
            "word_embeddings.norm.bias": "word_embeddings_layernorm.bias"},
        num_layers + 4: {"weight": "ln_f.weight", "bias": "ln_f.bias"}}
    for i in range(num_layers):
        prefix = f"h.{i}."
        layers[i + 3] = {k[len(prefix):]: k for k in state if k.startswith(prefix)}
    return {layer: [{key: _shard(hf, state[hf], tp, r) for key, hf in keys.items()}
                    for r in range(tp)]
            for layer, keys in sorted(layers.items())}


def megatron_args(hf_model, tp: int, pp: int, dtype: torch.dtype, **overrides) -> argparse.Namespace:
    config = hf_model.config
    args = dict(num_layers=config.n_layer, hidden_size=config.hidden_size,
                ffn_hidden_size=4 * config.hidden_size, num_attention_heads=config.n_head,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                padded_vocab_size=config.vocab_size, make_vocab_size_divisible_by=128,
                pad_vocab_size_to=config.vocab_size, layernorm_epsilon=config.layer_norm_epsilon,
                seq_length=64, max_position_embeddings=64, micro_batch_size=1,
                global_batch_size=4, hidden_dropout=0.1, attention_dropout=0.1, embed_layernorm=True,
                position_embedding_type=PositionEmbeddingType.alibi, bf16=dtype == torch.bfloat16,
                fp16=dtype == torch.float16, params_dtype=dtype, tokenizer_type="PretrainedFromHF",
                consumed_train_samples=0, consumed_valid_samples=0, deepspeed=True)
    args.update(overrides)
    return argparse.Namespace(**args)


def mp_rank_state(args: argparse.Namespace, iteration: int, original_vocab_size: int,
                  tp: int, pp: int) -> dict:
    """An mp_rank file's content: DeepSpeed engine keys plus Megatron's client state (§3a)."""
    samples = iteration * args.global_batch_size
    return {"module": None, "buffer_names": [], "optimizer": None,
            "lr_scheduler": {"num_steps": samples, "max_lr": 6e-5}, "data_sampler": None,
            "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
            "global_steps": iteration, "global_samples": samples, "dp_world_size": 1,
            "mp_world_size": tp * pp, "ds_config": {"train_batch_size": args.global_batch_size},
            "ds_version": "0.6.0+synthetic", "args": args, "checkpoint_version": 3.0,
            "iteration": iteration, "tokens": samples * args.seq_length,
            "checkpoint_info": {"padded_vocab_size": args.padded_vocab_size,
                                "original_vocab_size": original_vocab_size},
            "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}


def write_megatron_deepspeed_checkpoint(hf_model, directory, tp: int, iteration: int = 1000,
                                        dtype: torch.dtype = torch.float32, pp: int = 1,
                                        original_vocab_size: int | None = None,
                                        mp_rank_files: bool = True, **arg_overrides) -> str:
    """Write `directory`/latest and `directory`/global_step{iteration}/ (layer files per TP rank,
    mp_rank_MM files for the tp*pp model-parallel ranks); returns the step directory."""
    step_dir = os.path.join(str(directory), f"global_step{iteration}")
    os.makedirs(step_dir, exist_ok=True)
    for layer, shards in layer_states(hf_model, tp, dtype).items():
        for rank, shard in enumerate(shards):
            torch.save(shard, os.path.join(step_dir, f"layer_{layer:02d}-model_{rank:02d}-model_states.pt"))
    if mp_rank_files:
        args = megatron_args(hf_model, tp, pp, dtype, **arg_overrides)
        state = mp_rank_state(args, iteration, original_vocab_size or hf_model.config.vocab_size,
                              tp, pp)
        with _megatron_enums_importable():
            for mp_rank in range(tp * pp):
                torch.save(state, os.path.join(step_dir, f"mp_rank_{mp_rank:02d}_model_states.pt"))
    with open(os.path.join(str(directory), "latest"), "w", encoding="utf-8") as f:
        f.write(f"global_step{iteration}")
    return step_dir
