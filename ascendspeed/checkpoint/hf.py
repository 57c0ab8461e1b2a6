"""Hugging Face BloomForCausalLM <-> our checkpoints (save_load.py's, in layout.py's layout:
`DIR/{release,iter_N}/mp_rank_TT[_PPP]/model_optim_rng.pt`); names and TP splits from tensors.py.

HF -> ours reads from a tensor source (hf_source.py: a HF directory, or megatron_deepspeed.py's
Megatron-DeepSpeed reader). Target rank files are written one at a time, each built from the
tensors it needs (read as slices when the source can), as iteration "release" (Megatron's
convention for converted weights: loading starts at iteration 0 with a fresh optimizer).
`checkpoint_info` records the HF row count (`hf_vocab_size`) and config (`hf_config`), so the way
back is exact.

Ours -> HF merges one pipeline stage's TP files at a time (reshard.py's helpers) and writes one
safetensors shard per stage, the index, and config.json; the tied head is not stored.

Both directions write into `OUTPUT.tmp` and rename it when complete: nothing half-written
appears under the output name. `shard_from_hf` cuts one TP rank's state dict of a whole
BloomModel from an HF state dict in memory (tests, benchmarks).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ascendspeed.checkpoint.hf_source import Reader, TensorSource
from ascendspeed.checkpoint.io import (fresh_staging, publish, save_atomically, write_atomically,
                                       write_tracker)
from ascendspeed.checkpoint.layout import CHECKPOINT_VERSION, iteration_dir_name, rank_file
from ascendspeed.checkpoint.reshard import (check_divisible, chunk_layout, merge_stage_model,
                                            open_checkpoint, read_rank_file)
from ascendspeed.checkpoint.tensors import (EMBED, FINAL_LAYERNORM, HEAD_COPY, HF_PREFIX,
                                            WORD_EMBEDDINGS, Chunk, TensorSpec, chunk_tensors,
                                            nest_model, parse_hf, whole_model)
from ascendspeed.core.pipeline_parallel.partition import validate_pipeline
from ascendspeed.data.tokenizer import vocab_size_with_padding
from ascendspeed.errors import ConvertError, PipelinePartitionError
from ascendspeed.progress import NoProgress

LM_HEAD = "lm_head.weight"
DEFAULT_SEQ_LENGTH = 2048  # ALiBi has no position limit; a run's --seq-length may differ
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


# --------------------------------------------------------------------------------- names
def hf_names(num_layers: int) -> dict[str, str]:
    """Whole-model key (tensors.py's) -> HF name without the prefix, in the model's order."""
    return {c.key: c.tensor.hf_name(c.number) for c in whole_model(num_layers)}


def _expected_shape(hf_name: str, hidden: int, vocab: int) -> tuple[int, ...]:
    return parse_hf(hf_name)[0].full_shape(vocab, hidden, 4 * hidden)  # HF BLOOM's MLP is 4 h


# ------------------------------------------------------------------------------------ output
def _into_staging(output: str, force: bool, write) -> str:
    """Refuse a non-empty `output` (unless `force`); run `write(staging)` in a fresh temporary
    directory beside it and rename that to `output` if it succeeds, else remove it."""
    output = os.path.normpath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)) and not force:
        raise ConvertError(f"{output} exists and is not empty (give --force to replace it)")
    staging = fresh_staging(output)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, output)
    return output


def _describe(chunk: Chunk) -> str:
    first, last = chunk.layers[0], chunk.layers[-1]
    parts = [f"layers {first}-{last}" if last != first else f"layer {first}"]
    parts += ["embedding"] if chunk.pre_process else []
    parts += ["final LayerNorm, head"] if chunk.post_process else []
    return ", ".join(parts)


# ------------------------------------------------------------------------------- HF -> ours
def _hf_bloom_config(config: dict, where: str):
    from transformers import BloomConfig

    try:
        hf = BloomConfig(**{k: v for k, v in config.items() if k != "model_type"})
    except (TypeError, ValueError) as error:
        raise ConvertError(f"{where}: not a BLOOM config ({error})") from None
    if config.get("model_type", "bloom") != "bloom":
        raise ConvertError(f"{where}: model_type {config['model_type']!r}, expected 'bloom'")
    if hf.apply_residual_connection_post_layernorm:
        raise ConvertError(f"{where}: apply_residual_connection_post_layernorm is true; our BLOOM "
                           f"takes residuals before the LayerNorm (as every BLOOM checkpoint)")
    if hf.hidden_size % hf.n_head:
        raise ConvertError(f"{where}: hidden_size {hf.hidden_size} is not divisible by n_head "
                           f"{hf.n_head}")
    return hf


def _rank_tensor(reader: Reader, hf_name: str, spec: TensorSpec, tp: int, tp_rank: int,
                 rows: int, dtype: torch.dtype) -> torch.Tensor:
    """This TP rank's slice of one HF tensor (the vocabulary zero-padded to `rows`)."""
    dim = spec.split_dim
    full = reader.shape(hf_name)
    if dim is None:
        tensor = reader.narrow(hf_name, 0, 0, full[0])
    else:
        size = rows if spec.shape[dim] == "V" else full[dim]
        start, stop = tp_rank * size // tp, (tp_rank + 1) * size // tp
        real = min(stop, full[dim])  # rows past the HF vocabulary are padding: zeros
        tensor = reader.narrow(hf_name, dim, start, real) if real > start else \
            torch.empty((0,) + full[1:], dtype=dtype)
        if real < stop:
            pad = torch.zeros((stop - max(real, start),) + full[1:], dtype=tensor.dtype)
            tensor = torch.cat([tensor, pad])
    # a copy of its own: torch.save would write a view's whole (maybe memory-mapped) storage
    return tensor.to(dtype=dtype, copy=True).contiguous()


def _check_source(reader: Reader, names: dict[str, str], keys: set[str], hidden: int,
                  vocab: int) -> None:
    for hf_name in names.values():
        if hf_name not in keys:
            raise ConvertError(f"{reader.where_is(hf_name)}: no tensor {hf_name} (nor "
                               f"{HF_PREFIX}{hf_name}); a BLOOM checkpoint needs it")
    if not hasattr(reader.source, "shape"):
        return  # shapes are checked as each tensor is read
    for hf_name in names.values():
        _check_shape(reader, hf_name, hidden, vocab)


def _check_shape(reader: Reader, hf_name: str, hidden: int, vocab: int) -> None:
    expected, found = _expected_shape(hf_name, hidden, vocab), reader.shape(hf_name)
    if expected != found:
        raise ConvertError(f"{reader.where_is(hf_name)}: tensor {hf_name} has shape {found}, the "
                           f"config (hidden_size {hidden}, vocab_size {vocab}) needs {expected}")


def _check_tied_head(reader: Reader, keys: set[str], log) -> None:
    """BLOOM ties the head to the embedding: an lm_head.weight is ignored, with a warning if it
    differs (compared in blocks of rows, so that two full embeddings are never held)."""
    if LM_HEAD not in keys:
        return
    embedding = WORD_EMBEDDINGS.hf
    head_shape, shape = reader.shape(LM_HEAD), reader.shape(embedding)
    if head_shape != shape:
        log(f"WARNING: {LM_HEAD} has shape {head_shape}, {embedding} {shape}; BLOOM "
            f"ties them, so {LM_HEAD} is ignored")
        return
    step = 1024 if hasattr(reader.source, "narrow") else shape[0]
    diff = 0.0
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        head = reader.narrow(LM_HEAD, 0, start, stop)
        rows = reader.narrow(embedding, 0, start, stop)
        diff = max(diff, (head.double() - rows.double()).abs().max().item())
    if diff:
        log(f"WARNING: {LM_HEAD} differs from {embedding} (max abs difference "
            f"{diff:.3g}); BLOOM ties them, so {LM_HEAD} is ignored")


def hf_to_megatron(source: TensorSource, output: str, target_tp: int = 1, target_pp: int = 1,
                   make_vocab_size_divisible_by: int = 128, pad_vocab_size_to: int | None = None,
                   params_dtype: str | None = None, original_vocab_size: int | None = None,
                   force: bool = False, where: str = "the source", log=print,
                   progress=NoProgress) -> str:
    """Write `source` as our checkpoint (iteration "release") at TP=`target_tp`, PP=`target_pp`
    under `output`; returns `output`. `progress` (a factory, ascendspeed.progress) is shown the
    tensors converted."""
    if target_tp < 1 or target_pp < 1:
        raise ConvertError(f"target sizes must be >= 1 (TP {target_tp}, PP {target_pp})")
    config = source.hf_config()
    hf = _hf_bloom_config(config, where)
    hf_rows, hidden, layers = hf.vocab_size, hf.hidden_size, hf.n_layer
    keys = set(source.keys())
    reader = Reader(source, where)
    names = hf_names(layers)
    _check_source(reader, names, keys, hidden, hf_rows)
    if params_dtype is None:
        params_dtype = str(source.get(FINAL_LAYERNORM[0].hf).dtype).replace("torch.", "")
    dtype_name = DTYPES.get(params_dtype)
    if dtype_name is None:
        raise ConvertError(f"params dtype {params_dtype!r}: expected fp32, bf16 or fp16")
    seq_length = int(config.get("seq_length") or DEFAULT_SEQ_LENGTH)
    args = {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": hf.n_head,
            "ffn_hidden_size": 4 * hidden, "seq_length": seq_length,
            "max_position_embeddings": seq_length, "layernorm_epsilon": hf.layer_norm_epsilon,
            "embed_layernorm": True, "position_embedding_type": "alibi",
            "padded_vocab_size": None, "tensor_model_parallel_size": target_tp,
            "pipeline_model_parallel_size": target_pp, "virtual_pipeline_chunks": 1,
            "pp_partition_method": None, "params_dtype": dtype_name}
    check_divisible(args, target_tp)
    try:
        validate_pipeline(layers, target_pp, half_precision=dtype_name != "float32")
    except PipelinePartitionError as error:
        raise ConvertError(f"cannot split the {layers} layers on --target-pp {target_pp}: "
                           f"{error}") from None
    padded = vocab_size_with_padding(hf_rows, make_vocab_size_divisible_by, target_tp,
                                     pad_vocab_size_to)
    args["padded_vocab_size"] = padded
    source_info = dict(getattr(source, "info", None) or {})  # a Megatron source's vocab sizes
    info = {"padded_vocab_size": padded,
            "original_vocab_size": (original_vocab_size or source_info.get("original_vocab_size")
                                    or hf_rows), "hf_vocab_size": hf_rows,
            "hf_config": json.loads(json.dumps(config, default=str))}  # plain data only
    _check_tied_head(reader, keys, log)
    log(f"converting {where} ({layers} layers, hidden {hidden}, {hf.n_head} heads, vocab "
        f"{hf_rows} padded to {padded}, {dtype_name}) -> TP={target_tp}, PP={target_pp}")
    dtype = getattr(torch, dtype_name)
    final_dir = os.path.normpath(output)

    chunks = [chunk_layout(args, target_pp, p, 1)[0] for p in range(target_pp)]
    total = target_tp * sum(len(chunk_tensors(chunk)) for chunk in chunks)

    def write(staging: str) -> None:
        with progress(total, "convert", "tensors") as bar:
            write_files(staging, bar)

    def write_files(staging: str, bar) -> None:
        iteration_dir = os.path.join(staging, iteration_dir_name("release"))
        for p in range(target_pp):
            (chunk,) = chunk_layout(args, target_pp, p, 1)
            for t in range(target_tp):
                flat = []
                for c in chunk_tensors(chunk):
                    hf_name = c.tensor.hf_name(c.number)  # the head copy: the tied embedding
                    if not hasattr(source, "shape"):
                        _check_shape(reader, hf_name, hidden, hf_rows)
                    flat.append((c.local, _rank_tensor(reader, hf_name, c.tensor, target_tp, t,
                                                       padded, dtype)))
                    bar.update(1)
                state = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                         "consumed_train_samples": 0, "consumed_valid_samples": 0, "tokens": 0,
                         "args": args, "checkpoint_info": info,
                         "model": nest_model(flat, chunk.pre_process)}
                path = rank_file(iteration_dir, t, p, target_pp)
                save_atomically(state, path)
                del state, flat
                bar.clear()
                log(f"wrote {os.path.join(final_dir, os.path.relpath(path, staging))} "
                    f"({_describe(chunk)})")
                bar.update(0, detail=f"{p * target_tp + t + 1}/{target_tp * target_pp} rank files")
        write_tracker(staging, "release")  # tracker last

    final = _into_staging(output, force, write)
    log(f"done: {final} (tracker -> release; load with pretrain_bloom.py --load {final} "
        f"--use-checkpoint-args)")
    return final


# ------------------------------------------------------------------------------- ours -> HF
def _vocab_rows(mode: str, info: dict, padded: int, tokenizer_vocab_size: int | None,
                where: str, log=print) -> int:
    if mode == "padded":
        rows = padded
    elif mode == "tokenizer":
        rows = tokenizer_vocab_size or info.get("original_vocab_size") or padded
    elif mode == "hf":
        rows = info.get("hf_vocab_size") or padded
        if rows > padded:  # a reshard cut the rows past the tokenizer's vocabulary
            log(f"WARNING: {where}: the Hugging Face model had {rows} vocabulary rows, this "
                f"checkpoint keeps {padded}; writing {padded}")
            rows = padded
    else:
        raise ConvertError(f"--vocab-rows {mode!r}: expected hf, tokenizer or padded")
    if not 0 < rows <= padded:
        raise ConvertError(f"{where}: cannot keep {rows} vocabulary rows (--vocab-rows {mode}); "
                           f"the checkpoint has {padded}")
    return rows


def _hf_config_out(args: dict, info: dict, rows: int, dtype_name: str, where: str):
    from transformers import BloomConfig

    if args.get("ffn_hidden_size", 4 * args["hidden_size"]) != 4 * args["hidden_size"]:
        raise ConvertError(f"{where}: ffn_hidden_size {args['ffn_hidden_size']} is not 4 x "
                           f"hidden_size {args['hidden_size']}; HF BLOOM has no such field")
    if not args.get("embed_layernorm", True):
        raise ConvertError(f"{where}: trained without --embed-layernorm; HF BLOOM always has it")
    recorded = info.get("hf_config")
    config = BloomConfig.from_dict(dict(recorded)) if recorded else BloomConfig()
    config.vocab_size, config.hidden_size = rows, args["hidden_size"]
    config.n_layer, config.n_head = args["num_layers"], args["num_attention_heads"]
    config.layer_norm_epsilon = args.get("layernorm_epsilon", config.layer_norm_epsilon)
    config.architectures, config.tie_word_embeddings = ["BloomForCausalLM"], True
    config.dtype = dtype_name
    return config


def _without_head_copy(state: dict) -> dict:
    """Drop the last stage's copy of the tied embedding (PP > 1) before merging: HF stores the
    embedding once, and merging the copy would cost a full embedding of memory."""
    for key, model in state.items():
        if key.startswith("model") and isinstance(model, dict):
            model.pop(HEAD_COPY.megatron[0], None)  # word_embeddings_for_head
    return state


def _shard_name(p: int, pp: int) -> str:
    return "model.safetensors" if pp == 1 else f"model-{p + 1:05d}-of-{pp:05d}.safetensors"


def megatron_to_hf(input_folder: str, output: str, iteration: int | str | None = None,
                   vocab_rows: str = "hf", tokenizer_vocab_size: int | None = None,
                   dtype: str | None = None, force: bool = False, log=print,
                   progress=NoProgress) -> str:
    """Write our checkpoint under `input_folder` (the tracker's, or `iteration`) as a HF
    BloomForCausalLM directory `output` (one safetensors shard per pipeline stage). `progress`
    (a factory, ascendspeed.progress) is shown the rank files read and the shards written."""
    from safetensors.torch import save_file  # writes from the tensors' memory, no copy

    source = open_checkpoint(input_folder, iteration)
    args, info, where = source.args, source.info, source.directory
    padded = info.get("padded_vocab_size", args.get("padded_vocab_size"))
    rows = _vocab_rows(vocab_rows, info, padded, tokenizer_vocab_size, where, log)
    dtype_name = DTYPES.get(dtype or args.get("params_dtype", "float32"))
    if dtype_name is None:
        raise ConvertError(f"--dtype {dtype!r}: expected fp32, bf16 or fp16")
    config = _hf_config_out(args, info, rows, dtype_name, where)
    names = hf_names(args["num_layers"])
    final_dir = os.path.normpath(output)
    log(f"converting {where} (TP={source.tp}, PP={source.pp}, {source.chunks} chunk(s) per "
        f"stage, padded vocab {padded}) -> {rows} vocabulary rows, {dtype_name}")

    def write(staging: str) -> None:
        with progress(source.tp * source.pp + source.pp, "convert", "files") as bar:
            write_files(staging, bar)

    def write_files(staging: str, bar) -> None:
        def note(message):  # a line of its own, not on the bar's
            bar.clear()
            log(message)

        weight_map, total, written = {}, 0, set()
        for p in range(source.pp):
            paths = [source.files[(t, p)] for t in range(source.tp)]
            states = []
            for path in paths:
                states.append(_without_head_copy(read_rank_file(path)))
                bar.update(1, detail=f"reading pipeline stage {p}")
            layout = chunk_layout(args, source.pp, p, source.chunks)
            stage_where = os.path.dirname(paths[0])
            merged = merge_stage_model(layout, states, paths, stage_where, note)
            del states
            tensors = {}
            for key, tensor in merged.items():
                if key not in names:
                    raise ConvertError(f"{stage_where}: unexpected parameter {key}")
                tensor = tensor.to(getattr(torch, dtype_name)).contiguous()
                if key == EMBED:
                    tensor = tensor[:rows].clone()  # its own storage: safetensors saves views whole
                tensors[HF_PREFIX + names[key]] = tensor
            del merged
            file = _shard_name(p, source.pp)
            save_file(tensors, os.path.join(staging, file), metadata={"format": "pt"})
            for name, tensor in tensors.items():
                weight_map[name] = file
                total += tensor.numel() * tensor.element_size()
            written |= set(tensors)
            del tensors
            chunks = ", ".join(_describe(chunk) for chunk in layout)
            note(f"wrote {os.path.join(final_dir, file)} (pipeline stage {p}: {chunks})")
            bar.update(1, detail=f"wrote pipeline stage {p}")
        missing = sorted(set(HF_PREFIX + n for n in names.values()) - written)
        if missing:
            raise ConvertError(f"{where}: no {missing[0]} in any rank file")
        if source.pp > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            write_atomically(os.path.join(staging, "model.safetensors.index.json"),
                             json.dumps(index, indent=2) + "\n")
        config.save_pretrained(staging)  # config.json last

    final = _into_staging(output, force, write)
    log(f"done: {final} (BloomForCausalLM.from_pretrained({final!r}))")
    return final


# --------------------------------------------------------------------------- in memory
def shard_from_hf(hf_state_dict: dict[str, torch.Tensor], config, tp_rank: int,
                  tp_size: int) -> dict[str, torch.Tensor]:
    """Our TP rank's state dict of a whole BloomModel (`config`: its BloomConfig) from a full HF
    BloomForCausalLM state dict (the vocabulary padded with zero rows)."""
    out = {}
    for c in whole_model(config.num_layers, config.embed_layernorm):
        hf = HF_PREFIX + c.tensor.hf_name(c.number)
        if hf not in hf_state_dict:
            raise KeyError(f"Hugging Face checkpoint has no {hf} (needed for {c.local})")
        tensor = hf_state_dict[hf]
        if c.tensor is WORD_EMBEDDINGS and tensor.shape[0] < config.vocab_size:
            padding = tensor.new_zeros(config.vocab_size - tensor.shape[0], tensor.shape[1])
            tensor = torch.cat([tensor, padding])
        if c.tensor.split_dim is not None:
            tensor = tensor.chunk(tp_size, dim=c.tensor.split_dim)[tp_rank]
        out[c.local] = tensor.clone().contiguous()
    return out
