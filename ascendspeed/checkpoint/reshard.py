"""Reshard a checkpoint (save_load.py's, in layout.py's layout) to another tensor- and pipeline-
parallel size, model and optimizer state alike, so that training resumes at the new layout.

The source's TP shards are merged per pipeline stage (split tensors concatenated on their split
dim, replicated ones checked equal across TP ranks), chunk-local layer indices are mapped to the
global 1-based layer numbers (`stage_layout`), and the merged state is re-split for the target:

- each tensor is split as tensors.py's table says (split_dim);
- the padded vocabulary is recomputed for the target TP (`vocab_size_with_padding`): embedding
  rows (and their optimizer moments and masters) are cut or zero-padded;
- the optimizer state (layout independent, by `parameter_names()` names "chunk{i}.{name}") is
  renamed to the target's chunk-local names, its tensors split like the parameters;
- the target has one model chunk per stage (a virtual pipeline is dropped); the pipeline
  partition is even unless the source used --pp-partition-method, which is kept;
- RNG states are dropped (per rank, they cannot be resharded; the loader then keeps its seeds).

Memory: one source pipeline stage's TP files at a time are merged into the full model state; the
target files are then cut from it one at a time (each written and freed before the next).

The reading and merging helpers (open_checkpoint, chunk_layout, merge_stage_model) are shared
with hf.py's ours -> HF direction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ascendspeed.checkpoint.io import (fresh_staging, publish, read_checkpoint_file, read_tracker,
                                       save_atomically, write_tracker)
from ascendspeed.checkpoint.layout import (RANK_FILENAME, RNG_KEYS, TRACKER_FILENAME,
                                           iteration_dir_name, model_key, rank_dirs, rank_file)
from ascendspeed.checkpoint.tensors import (EMBED, HEAD, Chunk, flatten_model, nest_model,
                                            split_dim, target_names, to_global)
from ascendspeed.core.pipeline_parallel.partition import stage_layout, validate_pipeline
from ascendspeed.data.tokenizer import vocab_size_with_padding
from ascendspeed.errors import CheckpointError, ConfigError, PipelinePartitionError, ReshardError
from ascendspeed.progress import NoProgress


def chunk_layout(args: dict, pp: int, pp_rank: int, chunks: int) -> list[Chunk]:
    num_layers = args["num_layers"]
    per_virtual = num_layers // (pp * chunks) if chunks > 1 else None
    layout = stage_layout(num_layers, pp, pp_rank, per_virtual,
                          None if chunks > 1 else args.get("pp_partition_method"),
                          half_precision=args.get("params_dtype", "float32") != "float32")
    last = len(layout.chunks) - 1
    return [Chunk(tuple(layers), layout.pre_process and i == 0, layout.post_process and i == last)
            for i, layers in enumerate(layout.chunks)]


# ------------------------------------------------------------------------------------ merging
def merge_tensor(name: str, shards: list[torch.Tensor], where: str, warn) -> torch.Tensor:
    dim = split_dim(name)
    if dim is not None:
        return torch.cat(shards, dim=dim) if len(shards) > 1 else shards[0]
    first = shards[0]
    for rank, other in enumerate(shards[1:], start=1):
        if other.shape != first.shape:
            raise ReshardError(f"{where}: replicated tensor {name} has shape {tuple(first.shape)} "
                               f"on TP rank 0 but {tuple(other.shape)} on TP rank {rank}")
        if not torch.equal(other, first):
            diff = (other.double() - first.double()).abs().max().item()
            warn(f"WARNING: {where}: replicated tensor {name} differs between TP rank 0 and TP "
                 f"rank {rank} (max abs difference {diff:.3g}); taking TP rank 0's")
    return first


def _resize_vocab(tensor: torch.Tensor, rows: int, original: int, where: str) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    if rows < original:
        raise ReshardError(f"{where}: the target padded vocabulary {rows} is smaller than the "
                           f"original vocabulary {original}")
    if rows < tensor.shape[0]:
        return tensor[:rows].clone()
    pad = torch.zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=0)


def shard_tensor(tensor: torch.Tensor, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    dim = split_dim(name)
    if dim is None or tp == 1:
        return tensor.clone()  # a copy: torch.save would write a view's whole storage
    return tensor.chunk(tp, dim=dim)[tp_rank].clone()


# ------------------------------------------------------------------------------ the source
@dataclass
class SourceCheckpoint:
    """A checkpoint to read: its iteration dir, `args`, `checkpoint_info` and rank files."""
    iteration: int | str
    directory: str
    args: dict
    info: dict
    files: dict[tuple[int, int], str]  # (tp rank, pp rank) -> model_optim_rng.pt

    @property
    def tp(self) -> int:
        return self.args["tensor_model_parallel_size"]

    @property
    def pp(self) -> int:
        return self.args["pipeline_model_parallel_size"]

    @property
    def chunks(self) -> int:
        return int(self.args.get("virtual_pipeline_chunks", 1) or 1)


def open_checkpoint(input_folder: str, iteration: int | str | None = None) -> SourceCheckpoint:
    """The checkpoint the tracker under `input_folder` names (or `iteration`), its layout read
    from one rank file's args and every rank file checked present."""
    if iteration is None:
        iteration = read_tracker(input_folder)
        if iteration is None:
            raise ReshardError(f"{os.path.join(input_folder, TRACKER_FILENAME)} does not exist "
                               f"(no checkpoint; give --iteration to pick one)")
    source_dir = os.path.join(input_folder, iteration_dir_name(iteration))
    if not os.path.isdir(source_dir):
        raise ReshardError(f"{source_dir} does not exist (iteration {iteration})")
    first_file = None
    for name in rank_dirs(source_dir):
        candidate = os.path.join(source_dir, name, RANK_FILENAME)
        if os.path.isfile(candidate):
            first_file = candidate
            break
    if first_file is None:
        raise ReshardError(f"{source_dir}: no mp_rank_*/model_optim_rng.pt files")
    header = read_rank_file(first_file)
    args = dict(header.get("args") or {})
    for key in ("num_layers", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if key not in args:
            raise ReshardError(f"{first_file}: 'args' lacks {key!r}")
    info = dict(header.get("checkpoint_info") or {})
    if info.get("original_vocab_size") is None:
        raise ReshardError(f"{first_file}: checkpoint_info lacks original_vocab_size")
    del header
    source = SourceCheckpoint(iteration, source_dir, args, info, {})
    source.files = {(t, p): rank_file(source_dir, t, p, source.pp)
                    for p in range(source.pp) for t in range(source.tp)}
    for path in source.files.values():
        if not os.path.isfile(path):
            raise ReshardError(f"{path} is missing (the checkpoint's args say TP={source.tp}, "
                               f"PP={source.pp})")
    return source


def merge_stage_model(layout: list[Chunk], states: list[dict], paths: list[str], where: str,
                      log) -> dict[str, torch.Tensor]:
    """One pipeline stage's TP rank states (their model entries are popped) -> {global key:
    merged tensor}: split tensors concatenated, replicated ones checked equal (rank 0's kept)."""
    merged = {}
    for c, chunk in enumerate(layout):
        key = model_key(c, len(layout))
        flats = []
        for state, path in zip(states, paths):
            if key not in state:
                raise ReshardError(f"{path}: no {key!r} entry")
            flats.append(flatten_model(state.pop(key), path))
        for local in list(flats[0]):
            shards = []
            for flat, path in zip(flats, paths):
                if local not in flat:
                    raise ReshardError(f"{path}: no {local} (TP rank 0 has it)")
                shards.append(flat.pop(local))
            merged[to_global(local, chunk)] = merge_tensor(local, shards, f"{where} chunk {c}", log)
    return merged


# -------------------------------------------------------------------------------------- reshard
def check_divisible(args: dict, tp: int) -> None:
    for key, flag in (("num_attention_heads", "--num-attention-heads"),
                      ("hidden_size", "--hidden-size"), ("ffn_hidden_size", "--ffn-hidden-size")):
        value = args.get(key)
        if value is not None and value % tp:
            raise ReshardError(f"{flag} {value} (from the checkpoint's args) is not divisible by "
                               f"the target tensor-parallel size {tp}")


def reshard(input_folder: str, output_folder: str, target_tp: int, target_pp: int = 1,
            iteration: int | str | None = None, make_vocab_size_divisible_by: int = 128,
            pad_vocab_size_to: int | None = None, log=print, progress=NoProgress) -> str:
    """Write `input_folder`'s checkpoint (the tracker's, or `iteration`) resharded to
    TP=`target_tp`, PP=`target_pp` under `output_folder`; returns the written iteration dir.
    `progress` (a factory, ascendspeed.progress) is shown the rank files read and written."""
    with progress(None, "reshard", "files") as bar:  # its total once the source is known
        def note(message):  # a line of its own, not on the bar's
            bar.clear()
            log(message)

        return _reshard(input_folder, output_folder, target_tp, target_pp, iteration,
                        make_vocab_size_divisible_by, pad_vocab_size_to, note, bar)


def _reshard(input_folder: str, output_folder: str, target_tp: int, target_pp: int,
             iteration: int | str | None, make_vocab_size_divisible_by: int,
             pad_vocab_size_to: int | None, log, bar) -> str:
    if target_tp < 1 or target_pp < 1:
        raise ReshardError(f"target sizes must be >= 1 (TP {target_tp}, PP {target_pp})")
    if os.path.abspath(input_folder) == os.path.abspath(output_folder):
        raise ReshardError(f"--output-folder must differ from --input-folder ({input_folder})")
    source = open_checkpoint(input_folder, iteration)
    iteration, source_dir, args, info, files = (source.iteration, source.directory, source.args,
                                                source.info, source.files)
    source_tp, source_pp, chunks = source.tp, source.pp, source.chunks
    source_padded = info.get("padded_vocab_size", args.get("padded_vocab_size"))
    original_vocab = info["original_vocab_size"]
    bar.total = source_tp * source_pp + target_tp * target_pp  # read, then written

    # Target checks, before any work.
    check_divisible(args, target_tp)
    try:
        target_padded = vocab_size_with_padding(original_vocab, make_vocab_size_divisible_by,
                                                target_tp, pad_vocab_size_to)
    except ConfigError as error:
        raise ReshardError(str(error)) from None
    if target_padded < original_vocab:
        raise ReshardError(f"target padded vocabulary {target_padded} < original {original_vocab}")
    hf_rows = info.get("hf_vocab_size")
    if hf_rows and target_padded < hf_rows:  # e.g. BLOOM: 250,680 tokens, 250,880 HF rows
        log(f"WARNING: the checkpoint came from a Hugging Face model with {hf_rows} vocabulary "
            f"rows; the target keeps {target_padded} (pass --pad-vocab-size-to {hf_rows} to keep "
            f"them all, as the BLOOM launch scripts do)")
    method = args.get("pp_partition_method")
    try:
        validate_pipeline(args["num_layers"], target_pp, None, method,
                          half_precision=args.get("params_dtype", "float32") != "float32")
    except PipelinePartitionError as error:
        raise ReshardError(f"cannot split the checkpoint's {args['num_layers']} layers on target "
                           f"PP={target_pp}: {error}") from None
    if chunks > 1:
        log(f"note: the source has a virtual pipeline ({chunks} chunks per stage); the target is "
            f"written with 1 chunk per stage (run it without "
            f"--num-layers-per-virtual-pipeline-stage)")
    log(f"resharding {source_dir} (TP={source_tp}, PP={source_pp}, padded vocab "
        f"{source_padded}) -> TP={target_tp}, PP={target_pp}, padded vocab {target_padded} "
        f"(original {original_vocab})")

    # Merge: one source stage (its TP files) at a time.
    merged: dict[str, torch.Tensor] = {}
    opt_merged: dict[str, dict] = {}   # global key -> {exp_avg: full, ..., step: float}
    groups_of: dict[str, int] = {}      # global key -> index of its source param group
    common: dict | None = None
    for p in range(source_pp):
        layout = chunk_layout(args, source_pp, p, chunks)
        states = []
        for t in range(source_tp):
            states.append(read_rank_file(files[(t, p)]))
            bar.update(1, detail=f"reading pipeline stage {p}")
        if common is None:
            common = {k: v for k, v in states[0].items()
                      if not k.startswith("model") and k not in RNG_KEYS}
            optimizer = common.get("optimizer")
            if optimizer is not None:
                common["optimizer"] = {k: v for k, v in optimizer.items() if k != "state"}
        where = os.path.join(source_dir, os.path.basename(os.path.dirname(files[(0, p)])))
        merged.update(merge_stage_model(layout, states, [files[(t, p)] for t in range(source_tp)],
                                        where, log))
        for c, chunk in enumerate(layout):
            # optimizer state of this chunk
            if all("optimizer" in s for s in states):
                opt_states = [s["optimizer"]["state"] for s in states]
                prefix = f"chunk{c}."
                for local in [n[len(prefix):] for n in opt_states[0] if n.startswith(prefix)]:
                    entries = [o.pop(prefix + local, None) for o in opt_states]
                    if any(e is None for e in entries):
                        raise ReshardError(f"{where}: optimizer state of {prefix + local} is "
                                           f"missing on some TP rank")
                    entry = {}
                    for k, value in entries[0].items():
                        if torch.is_tensor(value) and value.dim() > 0:
                            entry[k] = merge_tensor(local, [e[k] for e in entries],
                                                    f"{where} optimizer {k}", log)
                        else:
                            entry[k] = value
                    opt_merged[to_global(local, chunk)] = entry
                for index, group in enumerate(states[0]["optimizer"]["param_groups"]):
                    for n in group["params"]:
                        if n.startswith(prefix):
                            groups_of[to_global(n[len(prefix):], chunk)] = index
        del states
    assert common is not None

    # The head's copy of the embedding (PP > 1) is the embedding itself once merged.
    if HEAD in merged:
        if EMBED in merged and not torch.equal(merged[HEAD], merged[EMBED]):
            diff = (merged[HEAD].double() - merged[EMBED].double()).abs().max().item()
            log(f"WARNING: the last stage's copy of the word embeddings differs from the first "
                f"stage's (max abs difference {diff:.3g}); the first stage's is kept")
        embed_missing = EMBED not in merged
        merged[EMBED] = merged[EMBED] if not embed_missing else merged[HEAD]
        del merged[HEAD]
        if HEAD in opt_merged:
            opt_merged.setdefault(EMBED, opt_merged[HEAD])
            del opt_merged[HEAD]
        if HEAD in groups_of:
            groups_of.setdefault(EMBED, groups_of.pop(HEAD))
    if EMBED not in merged:
        raise ReshardError(f"{source_dir}: no word embeddings in any rank file")
    merged[EMBED] = _resize_vocab(merged[EMBED], target_padded, original_vocab, source_dir)
    if EMBED in opt_merged:
        opt_merged[EMBED] = {k: (_resize_vocab(v, target_padded, original_vocab, source_dir)
                                 if torch.is_tensor(v) and v.dim() > 0 else v)
                             for k, v in opt_merged[EMBED].items()}
    for name, tensor in merged.items():
        dim = split_dim(name)
        if dim is not None and tensor.shape[dim] % target_tp:
            raise ReshardError(f"{name} has {tensor.shape[dim]} rows/columns on its split dim "
                               f"{dim}, not divisible by the target TP {target_tp}")

    # Write the target, one rank file at a time, into iter_N.tmp.
    final = os.path.join(output_folder, iteration_dir_name(iteration))
    staging = fresh_staging(final)
    new_args = dict(args, tensor_model_parallel_size=target_tp,
                    pipeline_model_parallel_size=target_pp, padded_vocab_size=target_padded,
                    virtual_pipeline_chunks=1)
    new_info = dict(info, padded_vocab_size=target_padded, original_vocab_size=original_vocab)
    source_groups = (common.get("optimizer") or {}).get("param_groups", [])
    for p in range(target_pp):
        (chunk,) = chunk_layout(new_args, target_pp, p, 1)
        names = target_names(chunk, merged)
        for t in range(target_tp):
            state = {k: v for k, v in common.items() if k != "optimizer"}
            state["args"] = new_args
            state["checkpoint_info"] = new_info
            key_of = {local: (EMBED if key == HEAD else key) for local, key in names}
            state["model"] = nest_model([(local, shard_tensor(merged[key_of[local]], local,
                                                              target_tp, t))
                                         for local, _ in names], chunk.pre_process)
            if "optimizer" in common:
                opt_state = {}
                for local, _ in names:
                    entry = opt_merged.get(key_of[local])
                    if entry is None:
                        continue
                    opt_state["chunk0." + local] = {
                        k: (shard_tensor(v, local, target_tp, t)
                            if torch.is_tensor(v) and v.dim() > 0 else v)
                        for k, v in entry.items()}
                groups = []
                for index, group in enumerate(source_groups):
                    params = [f"chunk0.{local}" for local, _ in names
                              if groups_of.get(key_of[local]) == index]
                    if params:
                        groups.append(dict({k: v for k, v in group.items() if k != "params"},
                                           params=params))
                grouped = {n for g in groups for n in g["params"]}
                lost = [f"chunk0.{local}" for local, _ in names
                        if f"chunk0.{local}" not in grouped]
                if lost:
                    raise ReshardError(f"{source_dir}: the optimizer's param_groups do not name "
                                       f"the parameters {lost[:3]}")
                state["optimizer"] = dict(common["optimizer"], param_groups=groups,
                                          state=opt_state)
            path = rank_file(staging, t, p, target_pp)
            save_atomically(state, path)
            log(f"wrote {rank_file(final, t, p, target_pp)} (layers {chunk.layers[0]}-"
                f"{chunk.layers[-1]}{', embedding' if chunk.pre_process else ''}"
                f"{', head' if chunk.post_process else ''})")
            bar.update(1, detail=f"wrote pipeline stage {p}")
            del state
    publish(staging, final)
    write_tracker(output_folder, iteration)
    log(f"done: {final} (tracker {os.path.join(output_folder, TRACKER_FILENAME)} -> {iteration}); "
        f"RNG states were dropped (a resumed run keeps its seeded RNG)")
    return final


def read_rank_file(path: str) -> dict:
    """io.read_checkpoint_file, its error as a ReshardError."""
    try:
        return read_checkpoint_file(path)
    except CheckpointError as error:
        raise ReshardError(str(error)) from None
