"""A checkpoint of pretrain_bloom.py, ready to generate from: flags checked against the
checkpoint before any process group exists (`prepare`), then this rank's pipeline stage built and
its weights loaded (`load_stage`).

The model's shape must be the checkpoint's: with --use-checkpoint-args it is taken from it
(with --seq-length and the position embedding), otherwise differing flags are refused, naming
both values (BLOOM-7B1's published generate script passes --layernorm-epsilon 1e-6 while the
model trained with 1e-5). The padded vocabulary is the checkpoint's; the tokenizer's real size
bounds what may be sampled. TP and PP must be the checkpoint's (tools/convert_tp.py reshards).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from ascendspeed import device
from ascendspeed.arguments import ModelConfig, TokenizerConfig
from ascendspeed.checkpoint.io import read_checkpoint_file, read_tracker
from ascendspeed.checkpoint.layout import TRACKER_FILENAME
from ascendspeed.checkpoint.save_load import (apply_checkpoint_args, check_args,
                                              checkpoint_args, load_model_state_dict,
                                              locate_checkpoint)
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.pipeline_parallel.partition import stage_layout
from ascendspeed.data.tokenizer import build_tokenizer
from ascendspeed.errors import CheckpointError, ConfigError
from ascendspeed.job.collectives import any_rank
from ascendspeed.model.bloom import BloomConfig, BloomModel

_SHAPE = (("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
          ("num_attention_heads", "--num-attention-heads"),
          ("ffn_hidden_size", "--ffn-hidden-size"), ("layernorm_epsilon", "--layernorm-epsilon"),
          ("embed_layernorm", "--embed-layernorm"))


@dataclass(frozen=True)
class GenerationSetup:
    load: str
    model: ModelConfig
    tokenizer: object
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    padded_vocab_size: int
    params_dtype: str
    saved_args: dict
    fused_kernels: bool = True  # --no-fused-kernels: every op's reference path

    @property
    def context_length(self) -> int:
        return self.model.seq_length


def _check_world(args: argparse.Namespace, saved: dict, world_size: int) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size != tp * pp:
        raise ConfigError(f"generation runs on exactly --tensor-model-parallel-size {tp} x "
                          f"--pipeline-model-parallel-size {pp} = {tp * pp} processes, launched "
                          f"with {world_size}")
    saved_layout = (saved.get("tensor_model_parallel_size", tp),
                    saved.get("pipeline_model_parallel_size", pp))
    if saved_layout != (tp, pp):
        raise CheckpointError(f"--load {args.load}: saved with TP={saved_layout[0]}, "
                              f"PP={saved_layout[1]}; this run has TP={tp}, PP={pp} (reshard with "
                              f"tools/convert_tp.py, or launch with the checkpoint's sizes)")
    if saved.get("virtual_pipeline_chunks", 1) != 1:
        raise CheckpointError(f"--load {args.load}: saved with a virtual pipeline; reshard it with "
                              f"tools/convert_tp.py (one chunk per stage) to generate")


def prepare(args: argparse.Namespace, world_size: int, log=print) -> GenerationSetup:
    """Validate the flags against the checkpoint (no process group needed); ConfigError or
    CheckpointError naming the flag or file otherwise."""
    if not args.load:
        raise ConfigError("--load DIR is required: the checkpoint to generate from")
    if not os.path.isdir(args.load):
        raise CheckpointError(f"--load {args.load}: no such directory")
    if read_tracker(args.load) is None:
        raise CheckpointError(f"--load {args.load}: no checkpoint there (no {TRACKER_FILENAME})")
    saved = checkpoint_args(args.load)
    if args.use_checkpoint_args:
        changes = apply_checkpoint_args(args)
        for name in ("seq_length", "position_embedding_type"):
            if name in saved and getattr(args, name) != saved[name]:
                changes.append(f"--{name.replace('_', '-')}: {getattr(args, name)} -> {saved[name]}")
                setattr(args, name, saved[name])
        if changes:
            log(f" > from the checkpoint: {'; '.join(changes)}")
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(args, name) is None:
            raise ConfigError(f"--{name.replace('_', '-')} is required (or pass "
                              f"--use-checkpoint-args to take the model's shape from --load)")
    model = ModelConfig.from_args(args)
    mismatches = [f"{flag}: checkpoint {saved[key]}, flags {getattr(model, key)}"
                  for key, flag in _SHAPE if key in saved and saved[key] != getattr(model, key)]
    if mismatches:
        raise ConfigError(f"the model flags differ from the checkpoint in {args.load} ("
                          + "; ".join(mismatches) + "): fix them or pass --use-checkpoint-args")
    _check_world(args, saved, world_size)
    if world_size > 1:  # the process group's backend, refused here rather than at its creation
        device.distributed_backend(getattr(args, "distributed_backend", None))
    if model.num_attention_heads % args.tensor_model_parallel_size:
        raise ConfigError(f"--num-attention-heads {model.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    if args.tokenizer_type is None:
        raise ConfigError("--tokenizer-type is required")
    tokenizer = build_tokenizer(TokenizerConfig.from_args(args))
    padded = saved.get("padded_vocab_size")
    if padded is None:
        raise CheckpointError(f"--load {args.load}: the checkpoint's args have no padded_vocab_size")
    if tokenizer.vocab_size > padded:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                          f"checkpoint's vocabulary ({padded}): not the tokenizer it trained with")
    dtype = ("float16" if args.fp16 else "bfloat16" if args.bf16
             else saved.get("params_dtype", "float32"))
    return GenerationSetup(load=args.load, model=model, tokenizer=tokenizer,
                           tensor_model_parallel_size=args.tensor_model_parallel_size,
                           pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                           padded_vocab_size=padded, params_dtype=dtype, saved_args=saved,
                           fused_kernels=args.fused_kernels)


def build_stage(setup: GenerationSetup) -> BloomModel:
    """This rank's pipeline stage of the model, its parameters allocated on the device and not
    filled (built on "meta", then to_empty): load_stage fills them from the checkpoint."""
    m = setup.model
    config = BloomConfig(vocab_size=setup.padded_vocab_size, hidden_size=m.hidden_size,
                         num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                         ffn_hidden_size=m.ffn_hidden_size, layernorm_epsilon=m.layernorm_epsilon,
                         embed_layernorm=m.embed_layernorm,
                         params_dtype=getattr(torch, setup.params_dtype),
                         fused_attention=setup.fused_kernels, fused_bias_gelu=setup.fused_kernels,
                         fused_cross_entropy=setup.fused_kernels)
    layout = stage_layout(m.num_layers, setup.pipeline_model_parallel_size,
                          ps.get_pipeline_model_parallel_rank(),
                          partition_method=setup.saved_args.get("pp_partition_method"),
                          half_precision=setup.saved_args.get("params_dtype", "float32") != "float32")
    return BloomModel(config, pre_process=layout.pre_process, post_process=layout.post_process,
                      layer_numbers=layout.chunks[0], device="meta"
                      ).to_empty(device=device.current_device()).eval()


def load_stage(setup: GenerationSetup, log=print) -> BloomModel:
    """build_stage with the checkpoint's weights; every rank agrees on success before returning."""
    model = build_stage(setup)
    failure = None
    try:
        iteration, path = locate_checkpoint(setup.load)
        state = read_checkpoint_file(path)
        ours = {key: value for key, value in setup.saved_args.items()}
        ours.update(num_layers=setup.model.num_layers, hidden_size=setup.model.hidden_size,
                    num_attention_heads=setup.model.num_attention_heads,
                    ffn_hidden_size=setup.model.ffn_hidden_size,
                    embed_layernorm=setup.model.embed_layernorm)
        check_args(state.get("args", {}), ours, path)
        if "model" not in state:
            raise CheckpointError(f"{path}: no 'model' entry (saved with several model chunks)")
        load_model_state_dict(model, state["model"], path)
    except CheckpointError as error:
        failure = error
    if any_rank(failure is not None):
        raise failure or CheckpointError(f"{setup.load}: another rank could not load its part of "
                                         f"the checkpoint (its message is above)")
    log(f" > loaded {path} (iteration {iteration}) for generation")
    return model
