"""Save, load and resume: our checkpoints (layout.py's Megatron-LM layout), written so that a
crash never costs the previous one.

One file per model-parallel rank, written by its data-parallel rank 0. Contents, all plain data
(tensors, numbers, strings, lists, dicts), so loading uses `torch.load(weights_only=True)` and
never runs pickled code:

- `model` (`model0`, `model1`, ... with virtual pipeline chunks) in Megatron's nesting
  (tensors.py's megatron column), blocks numbered within the chunk;
- `optimizer`: the layout-independent state of ascendspeed.optimizer (per parameter name: full
  fp32 masters and AdamW moments, ZeRO-1 shards gathered), `opt_param_scheduler`;
- `iteration`, `consumed_train_samples`, `consumed_valid_samples`, `checkpoint_version` 3.0,
  `checkpoint_info` (padded / original vocab size), `args` (the run's model and parallel sizes);
- RNG states: python, numpy, torch, device, and the tensor-parallel tracker's.

Crash safety: every rank writes into `iter_N.tmp/`; once all ranks are done, rank 0 renames it to
`iter_N/` and only then rewrites the tracker (through a temporary file and a rename). A kill at any
moment leaves the tracker naming a complete checkpoint. A write that fails on any rank (a full
disk, a quota) fails the save on every rank with a CheckpointError naming the file; the staging
directory is removed and the tracker still names the previous checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ascendspeed import device
from ascendspeed.checkpoint.io import (fresh_staging, publish, read_checkpoint_file, read_tracker,
                                       save_atomically, write_tracker)
from ascendspeed.checkpoint.layout import (CHECKPOINT_VERSION, RANK_FILENAME, TRACKER_FILENAME,
                                           iteration_dir_name, model_key, rank_dirs, rank_file)
from ascendspeed.checkpoint.tensors import megatron_path, nest_model
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import get_rng_tracker
from ascendspeed.errors import CheckpointError
from ascendspeed.job.collectives import any_rank, every_rank

# The run's sizes that must match the checkpoint's (name in `args`, flag that sets it).
MATCHED_ARGS = (("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
                ("num_attention_heads", "--num-attention-heads"),
                ("ffn_hidden_size", "--ffn-hidden-size"),
                ("padded_vocab_size", "padded vocabulary size"),
                ("tensor_model_parallel_size", "--tensor-model-parallel-size"),
                ("pipeline_model_parallel_size", "--pipeline-model-parallel-size"),
                ("virtual_pipeline_chunks", "--num-layers-per-virtual-pipeline-stage"),
                ("embed_layernorm", "--embed-layernorm"))


@dataclass
class LoadedState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    # checkpoint_info entries about where the weights came from (a converted Hugging Face model's
    # vocabulary rows and config), written again by every later save.
    provenance: dict = field(default_factory=dict)


PROVENANCE_KEYS = ("hf_vocab_size", "hf_config")


def _this_rank_file(iteration_dir: str) -> str:
    return rank_file(iteration_dir, ps.get_tensor_model_parallel_rank(),
                     ps.get_pipeline_model_parallel_rank(),
                     ps.get_pipeline_model_parallel_world_size())


# ------------------------------------------------------------------------------- model state
def model_state_dict(chunk) -> dict:
    """`chunk`'s parameters in Megatron's nesting (tensors.py's megatron column)."""
    # under ZeRO-1 each parameter is a view of one flat buffer: a clone saves just it
    return nest_model([(name, tensor.detach().clone()) for name, tensor in
                       chunk.state_dict().items()], chunk.pre_process)


def load_model_state_dict(chunk, nested: dict, where: str) -> None:
    """Copy a Megatron-nested state into `chunk` in place (parameter storage is kept: the
    optimizer's buffers may be views of it); every tensor must be present with its shape."""
    own = chunk.state_dict()
    values = {}
    for name, tensor in own.items():
        node = nested
        path = megatron_path(name, chunk.pre_process)
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise CheckpointError(f"{where}: no {'.'.join(path)} in the model state "
                                      f"(needed for {name})")
            node = node[key]
        if tuple(node.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: {'.'.join(path)} has shape {tuple(node.shape)}, this "
                                  f"run's model needs {tuple(tensor.shape)}")
        values[name] = node
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(values[name])


def parameter_names(model_chunks) -> dict:
    """Unique names for the optimizer state: chunk index + the chunk's own parameter name."""
    return {param: f"chunk{i}.{name}" for i, chunk in enumerate(model_chunks)
            for name, param in chunk.named_parameters()}


# ---------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    key, state, pos, has_gauss, cached = np.random.get_state()
    return {"random_rng_state": random.getstate(),
            "np_rng_state": {"key": key, "state": torch.from_numpy(state.astype(np.int64)),
                             "pos": int(pos), "has_gauss": int(has_gauss),
                             "cached_gaussian": float(cached)},
            "torch_rng_state": torch.get_rng_state(),
            "device_rng_state": device.get_rng_state(),
            "rng_tracker_states": get_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    python = state["random_rng_state"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    saved = state["np_rng_state"]
    np.random.set_state((saved["key"], saved["state"].numpy().astype(np.uint32), saved["pos"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch_rng_state"])
    device.set_rng_state(state["device_rng_state"])
    get_rng_tracker().set_states(state["rng_tracker_states"])


# -------------------------------------------------------------------------------------- save
def run_args(config, padded_vocab_size: int) -> dict:
    """The sizes a checkpoint is tied to, as plain data (also what --use-checkpoint-args reads)."""
    m, p = config.model, config.parallel
    chunks = 1
    if p.num_layers_per_virtual_pipeline_stage:
        chunks = m.num_layers // (p.pipeline_model_parallel_size
                                  * p.num_layers_per_virtual_pipeline_stage)
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "num_attention_heads": m.num_attention_heads, "ffn_hidden_size": m.ffn_hidden_size,
            "seq_length": m.seq_length, "max_position_embeddings": m.max_position_embeddings,
            "layernorm_epsilon": m.layernorm_epsilon, "embed_layernorm": m.embed_layernorm,
            "position_embedding_type": "alibi", "padded_vocab_size": padded_vocab_size,
            "tensor_model_parallel_size": p.tensor_model_parallel_size,
            "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
            "virtual_pipeline_chunks": chunks,
            "pp_partition_method": p.pp_partition_method,
            "params_dtype": config.precision.params_dtype}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, scheduler, config,
                    padded_vocab_size: int, original_vocab_size: int,
                    consumed_train_samples: int, consumed_valid_samples: int,
                    provenance: dict | None = None) -> str:
    """Write iteration `iteration` under `root` (every rank calls this); the final directory.
    `provenance` (LoadedState.provenance) goes into checkpoint_info unchanged."""
    final = os.path.join(root, iteration_dir_name(iteration))
    staging = final + ".tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    failure = None
    if rank == 0:
        fresh_staging(final)  # (removing a crashed attempt at this iteration)
    _barrier()
    names = parameter_names(model_chunks)
    optimizer_state = None
    if not config.checkpoint.no_save_optim:  # a collective under ZeRO-1: every DP rank
        optimizer_state = optimizer.state_dict(names)
    if ps.get_data_parallel_rank() == 0:
        state = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                 "consumed_train_samples": consumed_train_samples,
                 "consumed_valid_samples": consumed_valid_samples,
                 "tokens": consumed_train_samples * config.model.seq_length,
                 "args": run_args(config, padded_vocab_size),
                 "checkpoint_info": {"padded_vocab_size": padded_vocab_size,
                                     "original_vocab_size": original_vocab_size,
                                     **(provenance or {})}}
        for i, chunk in enumerate(model_chunks):
            state[model_key(i, len(model_chunks))] = model_state_dict(chunk)
        if optimizer_state is not None:
            state["optimizer"] = optimizer_state
            state["opt_param_scheduler"] = scheduler.state_dict()
        if not config.checkpoint.no_save_rng:
            state.update(rng_state())
        path = _this_rank_file(staging)
        try:
            save_atomically(state, path)
        except (OSError, RuntimeError) as error:  # (torch.save reports a failed write as RuntimeError)
            failure = f"rank {rank} could not write {path}: {_first_line(error)}"
    _stop_on_failure(failure, root, iteration, staging)  # (the barrier: every rank has written)
    if rank == 0:
        try:
            publish(staging, final)  # saving the same iteration again replaces it
            write_tracker(root, iteration)
        except OSError as error:
            failure = f"rank 0 could not publish {final}: {_first_line(error)}"
    _stop_on_failure(failure, root, iteration, staging)
    return final


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _stop_on_failure(failure: str | None, root: str, iteration: int, staging: str) -> None:
    """A collective: if any rank failed to write, every rank raises CheckpointError naming the
    failed file(s), after rank 0 removed the staging directory (the tracker is untouched)."""
    if not any_rank(failure is not None):
        return
    failures = every_rank(failure)
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    previous = read_tracker(root)
    raise CheckpointError(f"saving iteration {iteration} failed: {'; '.join(f for f in failures if f)}. "
                          f"Removed {staging}; the latest checkpoint is still "
                          f"{'iteration ' + str(previous) if previous is not None else 'none'}")


# -------------------------------------------------------------------------------------- load
def _saved_layout(directory: str) -> str:
    return ", ".join(rank_dirs(directory)) or "no mp_rank_* directories"


def locate_checkpoint(root: str) -> tuple[int | str, str] | None:
    """(iteration, this rank's file) of the checkpoint the tracker names; None if there is none."""
    iteration = read_tracker(root)
    if iteration is None:
        return None
    iteration_dir = os.path.join(root, iteration_dir_name(iteration))
    path = _this_rank_file(iteration_dir)
    if not os.path.isdir(iteration_dir):
        raise CheckpointError(f"{os.path.join(root, TRACKER_FILENAME)} names iteration "
                              f"{iteration}, but {iteration_dir} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path} is missing: this run (TP={ps.get_tensor_model_parallel_world_size()}, "
            f"PP={ps.get_pipeline_model_parallel_world_size()}) needs it; {iteration_dir} holds "
            f"{_saved_layout(iteration_dir)}. To change TP/PP, reshard with tools/convert_tp.py")
    return iteration, path


def check_args(saved: dict, ours: dict, path: str) -> None:
    mismatches = [f"{flag}: checkpoint {saved[key]}, this run {ours[key]}"
                  for key, flag in MATCHED_ARGS if key in saved and saved[key] != ours[key]]
    if mismatches:
        raise CheckpointError(f"{path} does not fit this run:\n  " + "\n  ".join(mismatches)
                              + "\n(reshard a checkpoint to another TP/PP with tools/convert_tp.py)")


def load_checkpoint(root: str, model_chunks, optimizer, scheduler, config,
                    padded_vocab_size: int, log=print, required: bool = False) -> LoadedState:
    """Load the tracker's checkpoint into the model (and, unless --no-load-optim/--finetune,
    optimizer, LR schedule, loss scale and data position; unless --no-load-rng/--finetune, RNG
    states). Without a tracker (or without the directory), start from scratch with a warning:
    the first run of a job that saves to and loads from the same directory; unless `required`
    (the model was built uninitialised because a tracker was there): then a CheckpointError."""
    located, state, failure = None, None, None
    try:  # every rank checks its own file; then all agree, so that none waits for a failed peer
        located = locate_checkpoint(root)
        if located is not None:
            state = read_checkpoint_file(located[1])
            check_args(state.get("args", {}), run_args(config, padded_vocab_size), located[1])
            for i, chunk in enumerate(model_chunks):
                key = model_key(i, len(model_chunks))
                if key not in state:
                    raise CheckpointError(f"{located[1]}: no {key!r} entry (saved with "
                                          f"{state.get('args', {}).get('virtual_pipeline_chunks', 1)}"
                                          f" model chunks)")
                load_model_state_dict(chunk, state[key], located[1])
    except CheckpointError as error:
        failure = error
    if any_rank(failure is not None):
        raise failure or CheckpointError(f"{root}: another rank could not load its part of the "
                                         f"checkpoint (its message is above)")
    if located is None and required:
        raise CheckpointError(f"{os.path.join(root, TRACKER_FILENAME)} disappeared while the "
                              f"run started (it was there when the model was built, so the "
                              f"model holds no initial weights); relaunch")
    if located is None:  # as Megatron: the first run of a job that saves to and loads from DIR
        log(f" > WARNING: no checkpoint to load ({os.path.join(root, TRACKER_FILENAME)} does not "
            f"exist): starting from scratch")
        return LoadedState()
    iteration, path = located
    release = iteration == "release"
    checkpoint = config.checkpoint
    info = state.get("checkpoint_info") or {}
    provenance = {key: info[key] for key in PROVENANCE_KEYS if key in info}
    if release or checkpoint.finetune:
        optimizer.reload_model_params()
        log(f" > loaded model weights from {path} (iteration 0: "
            f"{'release' if release else '--finetune'})")
        return LoadedState(provenance=provenance)
    loaded = LoadedState(iteration=int(state["iteration"]),
                         consumed_train_samples=int(state.get("consumed_train_samples", 0)),
                         consumed_valid_samples=int(state.get("consumed_valid_samples", 0)),
                         provenance=provenance)
    if checkpoint.no_load_optim or "optimizer" not in state:
        optimizer.reload_model_params()
    else:
        try:
            optimizer.load_state_dict(state["optimizer"], parameter_names(model_chunks))
            scheduler.load_state_dict(state.get("opt_param_scheduler",
                                                state.get("lr_scheduler", {})))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: optimizer state does not fit: {error}") from error
    if not checkpoint.no_load_rng and "torch_rng_state" in state:
        set_rng_state(state)
    log(f" > loaded checkpoint {path} at iteration {loaded.iteration} "
        f"({loaded.consumed_train_samples} samples consumed)")
    return loaded


def checkpoint_args(root: str) -> dict:
    """The `args` of the checkpoint the tracker under `root` names (for --use-checkpoint-args)."""
    iteration = read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"--use-checkpoint-args: no {TRACKER_FILENAME} in {root}")
    iteration_dir = os.path.join(root, iteration_dir_name(iteration))
    ranks = rank_dirs(iteration_dir)
    if not ranks:
        raise CheckpointError(f"{iteration_dir}: no mp_rank_* directories")
    path = os.path.join(iteration_dir, ranks[0], RANK_FILENAME)
    saved = read_checkpoint_file(path, mmap=True).get("args")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: no 'args' entry to take the model flags from")
    return saved


# The flags --use-checkpoint-args takes from the checkpoint (argparse destinations).
CHECKPOINT_MODEL_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                         "max_position_embeddings", "layernorm_epsilon", "embed_layernorm")


def apply_checkpoint_args(args) -> list[str]:
    """Overwrite the model-shape flags in `args` with the checkpoint's; what changed, for the log."""
    saved = checkpoint_args(args.load)
    changed = []
    for name in CHECKPOINT_MODEL_ARGS:
        if name in saved and getattr(args, name, None) != saved[name]:
            changed.append(f"--{name.replace('_', '-')}: {getattr(args, name, None)} -> {saved[name]}")
            setattr(args, name, saved[name])
    return changed
