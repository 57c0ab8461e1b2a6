"""Convert between Hugging Face `BloomForCausalLM` directories and our checkpoint layout
(ascendspeed.checkpointing: Megatron's `DIR/{release,iter_N}/mp_rank_TT[_PPP]/model_optim_rng.pt`).

HF -> ours reads from a *tensor source*: anything with `hf_config()` (HF BloomConfig fields),
`keys()` (HF names without the `transformer.` prefix) and `get(name)` (the full tensor).
`HFDirectorySource` reads a HF directory lazily (safetensors or .bin, single or sharded);
ascendspeed.checkpoint_megatron_deepspeed.MegatronDeepSpeedSource reads a Megatron-DeepSpeed
checkpoint. A source may also offer `shape(name)` and `narrow(name, dim, start, stop)`; then
each rank file reads only its slices. Target rank files are written one at a time, each built
from the tensors it needs, as iteration "release" (Megatron's convention for converted weights:
loading starts at iteration 0 with a fresh optimizer). `checkpoint_info` records the HF row count
(`hf_vocab_size`) and config (`hf_config`), so the way back is exact.

Ours -> HF merges one pipeline stage's TP files at a time (checkpoint_reshard's helpers) and
writes one safetensors shard per stage, the index, and config.json; the tied head is not stored.

Both directions write into `OUTPUT.tmp` and rename it when complete: nothing half-written
appears under the output name.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Protocol

import torch

from ascendspeed.checkpoint_reshard import (EMBED, HEAD, Chunk, check_divisible, chunk_layout,
                                            merge_stage_model, nest_model, open_checkpoint,
                                            read_rank_file, split_dim, target_names, to_global)
from ascendspeed.checkpointing import (CHECKPOINT_VERSION, TRACKER_FILENAME, iteration_dir_name,
                                       rank_file, write_atomically)
from ascendspeed.core.pipeline_parallel.partition import validate_pipeline
from ascendspeed.data.tokenizer import vocab_size_with_padding
from ascendspeed.errors import ConvertError, PipelinePartitionError
from ascendspeed.model import hf_bloom
from ascendspeed.model.bloom import BloomConfig as OurBloomConfig

HF_PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
DEFAULT_SEQ_LENGTH = 2048  # ALiBi has no position limit; a run's --seq-length may differ
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


class TensorSource(Protocol):
    def hf_config(self) -> dict: ...

    def keys(self) -> Iterable[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


# ------------------------------------------------------------------------ HF directory source
class HFDirectorySource:
    """A BloomForCausalLM directory: config.json plus model.safetensors, sharded safetensors
    (model.safetensors.index.json), pytorch_model.bin or sharded .bin. Tensors are read on
    demand (safetensors slices; .bin files memory-mapped)."""

    def __init__(self, path: str):
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ConvertError(f"{config_path} does not exist (not a Hugging Face model directory)")
        try:
            with open(config_path, encoding="utf-8") as f:
                self._config = json.load(f)
        except (OSError, ValueError) as error:
            raise ConvertError(f"{config_path}: cannot be read as JSON ({error})") from None
        self._handles: dict[str, object] = {}
        self._where: dict[str, tuple[str, str]] = {}  # name -> (file, key stored in it)
        self.listing = self._discover()

    def _discover(self) -> str:
        """Fill the name -> (file, key) map; the file that lists the names (for messages)."""
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = os.path.join(self.path, index_name)
            if os.path.isfile(index):
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (OSError, ValueError, KeyError) as error:
                    raise ConvertError(f"{index}: not a weight index ({error!r})") from None
                for key, file in weight_map.items():
                    path = os.path.join(self.path, file)
                    if not os.path.isfile(path):
                        raise ConvertError(f"{path} is missing ({index} names it for {key})")
                    self._add(key, path)
                return index
            path = os.path.join(self.path, single)
            if os.path.isfile(path):
                for key in self._open(path).keys():
                    self._add(key, path)
                return path
        raise ConvertError(f"{self.path}: no model.safetensors, model.safetensors.index.json, "
                           f"pytorch_model.bin or pytorch_model.bin.index.json")

    def _add(self, key: str, path: str) -> None:
        name = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        self._where[name] = (path, key)

    def _open(self, path: str):
        if path not in self._handles:
            try:
                if path.endswith(".safetensors"):
                    from safetensors import safe_open
                    self._handles[path] = safe_open(path, framework="pt", device="cpu")
                else:
                    self._handles[path] = _load_bin(path)
            except Exception as error:  # truncated, corrupt, or holding pickled code
                raise ConvertError(f"{path}: cannot be read ({type(error).__name__}: "
                                   f"{_first_line(error)})") from None
            if not hasattr(self._handles[path], "keys"):
                raise ConvertError(f"{path}: holds no state dict")
        return self._handles[path]

    def hf_config(self) -> dict:
        return dict(self._config)

    def keys(self) -> list[str]:
        return list(self._where)

    def where(self, name: str) -> str:
        return self._where[name][0] if name in self._where else self.listing

    def _tensor(self, name: str):
        """The stored tensor (.bin: memory-mapped) or safetensors slice of `name`."""
        if name not in self._where:
            raise ConvertError(f"{self.listing}: no tensor {HF_PREFIX}{name}")
        path, key = self._where[name]
        handle = self._open(path)
        try:
            if path.endswith(".safetensors"):
                return handle.get_slice(key)
            return handle[key]
        except Exception as error:
            raise ConvertError(f"{path}: cannot read tensor {key} ({type(error).__name__}: "
                               f"{_first_line(error)})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self._tensor(name)
        return tuple(stored.shape) if torch.is_tensor(stored) else tuple(stored.get_shape())

    def narrow(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        stored = self._tensor(name)
        try:
            if torch.is_tensor(stored):
                return stored.narrow(dim, start, stop - start)
            return stored[start:stop] if dim == 0 else stored[:, start:stop]
        except Exception as error:
            raise ConvertError(f"{self.where(name)}: cannot read tensor {name} "
                               f"({type(error).__name__}: {_first_line(error)})") from None

    def get(self, name: str) -> torch.Tensor:
        return self.narrow(name, 0, 0, self.shape(name)[0])


def _load_bin(path: str) -> dict:
    """A .bin state dict, memory-mapped (tensors are read when touched); files written before
    torch's zip format cannot be mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _first_line(error: Exception) -> str:
    text = str(error)
    return text.splitlines()[0][:200] if text else ""


class _Reader:
    """shape/narrow over any tensor source: native when it has them, else from get() (the last
    tensor kept, so that a rank's slices of one tensor load it once). Errors name the source."""

    def __init__(self, source: TensorSource, where: str):
        self.source, self.where = source, where
        self._last: tuple[str, torch.Tensor] | None = None

    def _full(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous tensor before reading the next
            try:
                self._last = (name, self.source.get(name))
            except ConvertError:
                raise
            except Exception as error:
                raise ConvertError(f"{self.where}: cannot read tensor {name} "
                                   f"({type(error).__name__}: {_first_line(error)})") from None
        return self._last[1]

    def shape(self, name: str) -> tuple[int, ...]:
        if hasattr(self.source, "shape"):
            return tuple(self.source.shape(name))
        return tuple(self._full(name).shape)

    def narrow(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if hasattr(self.source, "narrow"):
            return self.source.narrow(name, dim, start, stop)
        return self._full(name).narrow(dim, start, stop - start)

    def where_is(self, name: str) -> str:
        return self.source.where(name) if hasattr(self.source, "where") else self.where


# --------------------------------------------------------------------------------- name maps
def hf_names(num_layers: int) -> dict[str, str]:
    """Global parameter key (checkpoint_reshard's) -> HF name without the prefix."""
    ours = OurBloomConfig(vocab_size=1, hidden_size=1, num_layers=num_layers,
                          num_attention_heads=1, embed_layernorm=True)
    whole = Chunk(tuple(range(1, num_layers + 1)), True, True)  # global layer numbers are 1-based
    return {to_global(local, whole): hf[len(HF_PREFIX):]
            for local, (hf, _) in hf_bloom.name_map(ours).items()}


def _expected_shape(hf_name: str, hidden: int, vocab: int) -> tuple[int, ...]:
    ffn = 4 * hidden  # HF BLOOM's MLP is always 4 h
    shapes = {"word_embeddings.weight": (vocab, hidden),
              "self_attention.query_key_value.weight": (3 * hidden, hidden),
              "self_attention.query_key_value.bias": (3 * hidden,),
              "self_attention.dense.weight": (hidden, hidden),
              "mlp.dense_h_to_4h.weight": (ffn, hidden), "mlp.dense_h_to_4h.bias": (ffn,),
              "mlp.dense_4h_to_h.weight": (hidden, ffn)}
    for suffix, shape in shapes.items():
        if hf_name == suffix or hf_name.endswith("." + suffix):
            return shape
    return (hidden,)  # LayerNorms and row-parallel biases


# ------------------------------------------------------------------------------------ output
def _staging(output: str, force: bool) -> str:
    """Refuse a non-empty output (unless `force`); a fresh temporary directory beside it."""
    output = os.path.normpath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)) and not force:
        raise ConvertError(f"{output} exists and is not empty (give --force to replace it)")
    staging = output + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier attempt
    os.makedirs(staging)
    return staging


def _publish(staging: str, output: str) -> None:
    output = os.path.normpath(output)
    if os.path.isdir(output):
        shutil.rmtree(output)
    elif os.path.exists(output):
        os.remove(output)
    os.replace(staging, output)


def _into_staging(output: str, force: bool, write) -> str:
    """Run `write(staging)`; rename the staging dir to `output` if it succeeds, else remove it."""
    staging = _staging(output, force)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, output)
    return os.path.normpath(output)


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


def _rank_tensor(reader: _Reader, hf_name: str, local: str, tp: int, tp_rank: int, rows: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """This TP rank's slice of one HF tensor (the vocabulary zero-padded to `rows`)."""
    dim = split_dim(local)
    full = reader.shape(hf_name)
    if dim is None:
        tensor = reader.narrow(hf_name, 0, 0, full[0])
    else:
        size = rows if local == "word_embeddings.weight" else full[dim]
        start, stop = tp_rank * size // tp, (tp_rank + 1) * size // tp
        real = min(stop, full[dim])  # rows past the HF vocabulary are padding: zeros
        tensor = reader.narrow(hf_name, dim, start, real) if real > start else \
            torch.empty((0,) + full[1:], dtype=dtype)
        if real < stop:
            pad = torch.zeros((stop - max(real, start),) + full[1:], dtype=tensor.dtype)
            tensor = torch.cat([tensor, pad])
    # a copy of its own: torch.save would write a view's whole (maybe memory-mapped) storage
    return tensor.to(dtype=dtype, copy=True).contiguous()


def _check_source(reader: _Reader, names: dict[str, str], keys: set[str], hidden: int,
                  vocab: int) -> None:
    for hf_name in names.values():
        if hf_name not in keys:
            raise ConvertError(f"{reader.where_is(hf_name)}: no tensor {hf_name} (nor "
                               f"{HF_PREFIX}{hf_name}); a BLOOM checkpoint needs it")
    if not hasattr(reader.source, "shape"):
        return  # shapes are checked as each tensor is read
    for hf_name in names.values():
        _check_shape(reader, hf_name, hidden, vocab)


def _check_shape(reader: _Reader, hf_name: str, hidden: int, vocab: int) -> None:
    expected, found = _expected_shape(hf_name, hidden, vocab), reader.shape(hf_name)
    if expected != found:
        raise ConvertError(f"{reader.where_is(hf_name)}: tensor {hf_name} has shape {found}, the "
                           f"config (hidden_size {hidden}, vocab_size {vocab}) needs {expected}")


def _check_tied_head(reader: _Reader, keys: set[str], log) -> None:
    """BLOOM ties the head to the embedding: an lm_head.weight is ignored, with a warning if it
    differs (compared in blocks of rows, so that two full embeddings are never held)."""
    if LM_HEAD not in keys:
        return
    embedding = "word_embeddings.weight"
    head_shape, shape = reader.shape(LM_HEAD), reader.shape(embedding)
    if head_shape != shape:
        log(f"WARNING: {LM_HEAD} has shape {head_shape}, word_embeddings.weight {shape}; BLOOM "
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
        log(f"WARNING: {LM_HEAD} differs from word_embeddings.weight (max abs difference "
            f"{diff:.3g}); BLOOM ties them, so {LM_HEAD} is ignored")


def hf_to_megatron(source: TensorSource, output: str, target_tp: int = 1, target_pp: int = 1,
                   make_vocab_size_divisible_by: int = 128, pad_vocab_size_to: int | None = None,
                   params_dtype: str | None = None, original_vocab_size: int | None = None,
                   force: bool = False, where: str = "the source", log=print) -> str:
    """Write `source` as our checkpoint (iteration "release") at TP=`target_tp`, PP=`target_pp`
    under `output`; returns `output`."""
    if target_tp < 1 or target_pp < 1:
        raise ConvertError(f"target sizes must be >= 1 (TP {target_tp}, PP {target_pp})")
    config = source.hf_config()
    hf = _hf_bloom_config(config, where)
    hf_rows, hidden, layers = hf.vocab_size, hf.hidden_size, hf.n_layer
    keys = set(source.keys())
    reader = _Reader(source, where)
    names = hf_names(layers)
    _check_source(reader, names, keys, hidden, hf_rows)
    if params_dtype is None:
        params_dtype = str(source.get("ln_f.weight").dtype).replace("torch.", "")
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

    def write(staging: str) -> None:
        iteration_dir = os.path.join(staging, iteration_dir_name("release"))
        for p in range(target_pp):
            (chunk,) = chunk_layout(args, target_pp, p, 1)
            for t in range(target_tp):
                flat = []
                for local, key in target_names(chunk, names):
                    hf_name = names[EMBED if key == HEAD else key]
                    if not hasattr(source, "shape"):
                        _check_shape(reader, hf_name, hidden, hf_rows)
                    flat.append((local, _rank_tensor(reader, hf_name, local, target_tp, t,
                                                     padded, dtype)))
                state = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                         "consumed_train_samples": 0, "consumed_valid_samples": 0, "tokens": 0,
                         "args": args, "checkpoint_info": info,
                         "model": nest_model(flat, chunk.pre_process)}
                path = rank_file(iteration_dir, t, p, target_pp)
                os.makedirs(os.path.dirname(path))
                torch.save(state, path)
                del state, flat
                log(f"wrote {os.path.join(final_dir, os.path.relpath(path, staging))} "
                    f"({_describe(chunk)})")
        write_atomically(os.path.join(staging, TRACKER_FILENAME), "release")  # tracker last

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
            model.pop("word_embeddings_for_head", None)
    return state


def _shard_name(p: int, pp: int) -> str:
    return "model.safetensors" if pp == 1 else f"model-{p + 1:05d}-of-{pp:05d}.safetensors"


def megatron_to_hf(input_folder: str, output: str, iteration: int | str | None = None,
                   vocab_rows: str = "hf", tokenizer_vocab_size: int | None = None,
                   dtype: str | None = None, force: bool = False, log=print) -> str:
    """Write our checkpoint under `input_folder` (the tracker's, or `iteration`) as a HF
    BloomForCausalLM directory `output` (one safetensors shard per pipeline stage)."""
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
        weight_map, total, written = {}, 0, set()
        for p in range(source.pp):
            paths = [source.files[(t, p)] for t in range(source.tp)]
            states = [_without_head_copy(read_rank_file(path)) for path in paths]
            layout = chunk_layout(args, source.pp, p, source.chunks)
            stage_where = os.path.dirname(paths[0])
            merged = merge_stage_model(layout, states, paths, stage_where, log)
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
            log(f"wrote {os.path.join(final_dir, file)} (pipeline stage {p}: {chunks})")
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
