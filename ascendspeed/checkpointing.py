"""Checkpoints in Megatron-LM's layout, written so that a crash never costs the previous one.

    {save}/latest_checkpointed_iteration.txt          the iteration number (or "release")
    {save}/iter_{N:07d}/mp_rank_{TT:02d}[_{PPP:03d}]/model_optim_rng.pt

One file per model-parallel rank (TP rank TT, pipeline rank PPP when PP > 1), written by its
data-parallel rank 0. Contents, all plain data (tensors, numbers, strings, lists, dicts), so
loading uses `torch.load(weights_only=True)` and never runs pickled code:

- `model` (`model0`, `model1`, ... with virtual pipeline chunks) in Megatron's nesting:
  language_model.embedding.word_embeddings.{weight, norm.weight, norm.bias},
  language_model.encoder.{layers.<i local to the chunk>.*, final_layernorm.*},
  word_embeddings_for_head.weight (last stage, PP > 1);
- `optimizer`: the layout-independent state of ascendspeed.optimizer (per parameter name: full
  fp32 masters and AdamW moments, ZeRO-1 shards gathered), `opt_param_scheduler`;
- `iteration`, `consumed_train_samples`, `consumed_valid_samples`, `checkpoint_version` 3.0,
  `checkpoint_info` (padded / original vocab size), `args` (the run's model and parallel sizes);
- RNG states: python, numpy, torch, device, and the tensor-parallel tracker's.

Crash safety: every rank writes into `iter_N.tmp/`; once all ranks are done, rank 0 renames it to
`iter_N/` and only then rewrites the tracker (through a temporary file and a rename). A kill at any
moment leaves the tracker naming a complete checkpoint.
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
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.tensor_parallel import get_rng_tracker
from ascendspeed.errors import CheckpointError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
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


# ------------------------------------------------------------------------------------- paths
def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_file(iteration_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    rank = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(iteration_dir, rank, "model_optim_rng.pt")


def _this_rank_file(iteration_dir: str) -> str:
    return rank_file(iteration_dir, ps.get_tensor_model_parallel_rank(),
                     ps.get_pipeline_model_parallel_rank(),
                     ps.get_pipeline_model_parallel_world_size())


def read_tracker(root: str) -> int | str | None:
    """The iteration the tracker names ("release" for released weights); None without one."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found "
                              f"{text[:40]!r}") from None


def write_atomically(path: str, text: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


# ------------------------------------------------------------------------------- model state
def _megatron_key(chunk, name: str) -> tuple[str, ...]:
    """Our parameter name -> its path in Megatron's nested model state dict."""
    if name == "word_embeddings.weight":
        if chunk.pre_process:
            return ("language_model", "embedding", "word_embeddings", "weight")
        return ("word_embeddings_for_head", "weight")
    if name.startswith("embedding_layernorm."):
        return ("language_model", "embedding", "word_embeddings",
                "norm." + name.split(".", 1)[1])
    return ("language_model", "encoder", name)  # layers.<i>.*, final_layernorm.*


def model_state_dict(chunk) -> dict:
    nested: dict = {}
    for name, tensor in chunk.state_dict().items():
        *path, leaf = _megatron_key(chunk, name)
        node = nested
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = tensor.detach().clone()  # under ZeRO-1 a view of one flat buffer: save just it
    return nested


def load_model_state_dict(chunk, nested: dict, where: str) -> None:
    """Copy a Megatron-nested state into `chunk` in place (parameter storage is kept: the
    optimizer's buffers may be views of it); every tensor must be present with its shape."""
    own = chunk.state_dict()
    values = {}
    for name, tensor in own.items():
        node = nested
        path = _megatron_key(chunk, name)
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


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (a collective; `flag` itself with one process)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([float(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


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
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a crashed attempt at this iteration
        os.makedirs(staging)
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
        if len(model_chunks) == 1:
            state["model"] = model_state_dict(model_chunks[0])
        else:
            for i, chunk in enumerate(model_chunks):
                state[f"model{i}"] = model_state_dict(chunk)
        if optimizer_state is not None:
            state["optimizer"] = optimizer_state
            state["opt_param_scheduler"] = scheduler.state_dict()
        if not config.checkpoint.no_save_rng:
            state.update(rng_state())
        path = _this_rank_file(staging)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    _barrier()
    if rank == 0:
        if os.path.isdir(final):  # saving the same iteration again: replace it
            shutil.rmtree(final)
        os.replace(staging, final)
        write_atomically(os.path.join(root, TRACKER_FILENAME), str(iteration))
    _barrier()
    return final


# -------------------------------------------------------------------------------------- load
def _saved_layout(directory: str) -> str:
    ranks = sorted(d for d in os.listdir(directory) if d.startswith("mp_rank_")) \
        if os.path.isdir(directory) else []
    return ", ".join(ranks) if ranks else "no mp_rank_* directories"


def read_checkpoint_file(path: str, mmap: bool = False) -> dict:
    """`path`'s contents, without running pickled code; `mmap` maps the tensors instead of
    reading them (for a look at `args` without loading a rank's weights)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # missing, truncated, corrupt, or holding pickled code
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(error).__name__}: "
                              f"{(str(error).splitlines() or [''])[0][:200]})") from error
    if not isinstance(state, dict) or not any(k.startswith("model") for k in state):
        raise CheckpointError(f"{path}: not a model checkpoint (no 'model' entry)")
    return state


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
                    padded_vocab_size: int, log=print) -> LoadedState:
    """Load the tracker's checkpoint into the model (and, unless --no-load-optim/--finetune,
    optimizer, LR schedule, loss scale and data position; unless --no-load-rng/--finetune, RNG
    states). Without a tracker (or without the directory), start from scratch with a warning:
    the first run of a job that saves to and loads from the same directory."""
    located, state, failure = None, None, None
    try:  # every rank checks its own file; then all agree, so that none waits for a failed peer
        located = locate_checkpoint(root)
        if located is not None:
            state = read_checkpoint_file(located[1])
            check_args(state.get("args", {}), run_args(config, padded_vocab_size), located[1])
            for i, chunk in enumerate(model_chunks):
                key = "model" if len(model_chunks) == 1 else f"model{i}"
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
    ranks = sorted(d for d in os.listdir(iteration_dir) if d.startswith("mp_rank_")) \
        if os.path.isdir(iteration_dir) else []
    if not ranks:
        raise CheckpointError(f"{iteration_dir}: no mp_rank_* directories")
    path = os.path.join(iteration_dir, ranks[0], "model_optim_rng.pt")
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
