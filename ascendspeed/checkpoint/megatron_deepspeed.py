"""Read a Megatron-DeepSpeed BLOOM pipeline checkpoint (the BigScience BLOOM layout) as full,
TP-merged tensors under Hugging Face BloomModel names (no `transformer.` prefix).

Layout (as Megatron-DeepSpeed writes a BLOOM pipeline model):

    DIR/latest                                   text: the tag, e.g. "global_step95000"
    DIR/global_stepN/layer_01-model_TT-model_states.pt      embedding: word_embeddings.weight
                                                            [V/TP, H], word_embeddings.norm.{weight,bias}
    DIR/global_stepN/layer_{i+3}-model_TT-model_states.pt   block i (TP-sharded as checkpoint/tensors.py says)
    DIR/global_stepN/layer_{L+4}-model_TT-model_states.pt   final LayerNorm: bare weight, bias
    DIR/global_stepN/mp_rank_MM_model_states.pt             args (argparse.Namespace), iteration,
                                                            checkpoint_info, ... (optional here)

`TT` is the TP rank; optimizer files are ignored. Which file and key hold each tensor, and its
TP split, are tensors.py's table (its deepspeed and split_dim columns). Split tensors are
concatenated on their split dim; replicated ones are taken from rank 0 when all ranks are bitwise
equal, else averaged in fp32 (BLOOM's TP copies drifted, §2.4) with a warning.

Memory: `get` loads (memory-mapped) only the TP files of the layer its tensor lives in and keeps
only the most recently loaded layer, so a 176B checkpoint is read one layer at a time.
Every file is read with weights_only=True; the only non-tensor globals allowed are
argparse.Namespace, numpy's array/dtype rebuilders (np_rng_state) and Megatron enums (loaded as
inert placeholders); anything else is refused with the file and global named.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from typing import Any, Callable

import torch

from ascendspeed.checkpoint.tensors import (DEEPSPEED_EMBEDDING_LAYER, DEEPSPEED_FINAL_OFFSET,
                                            WORD_EMBEDDINGS, hf_split_dim, parse_hf, whole_model)
from ascendspeed.errors import MegatronDeepSpeedError

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
MP_RANK_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
MEGATRON_ENUM_MODULE = re.compile(r"^megatron(\.\w+)*\.enums$")


class MegatronEnum:
    """Inert stand-in for a pickled Megatron enum member (e.g. args.position_embedding_type):
    megatron is not importable here, and nothing from the checkpoint is ever executed."""

    qualname = "megatron.enums.?"

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"{self.qualname}({self.value!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, MegatronEnum) and other.qualname == self.qualname
                and other.value == self.value)

    def __hash__(self) -> int:
        return hash((self.qualname, self.value))


def concat_dim(name: str) -> int | None:
    """The TP concat dim of an HF-named tensor (§2.1), None for replicated tensors."""
    return hf_split_dim(name)


def _numpy_globals() -> list[Any]:
    """numpy's array rebuilders under both module names (numpy 1.x pickles numpy.core)."""
    try:
        import numpy as np
    except ImportError:
        return []
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else \
        np.core.multiarray._reconstruct
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFD"}
    return [np.ndarray, np.dtype, *dtype_classes, reconstruct,
            (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct")]


def _unsafe_globals(path: str) -> list[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: the load error itself is reported
        return []


def _enum_stubs(globals_in_file: list[str]) -> list[tuple[type, str]]:
    stubs = []
    for qualname in globals_in_file:
        module, _, name = qualname.rpartition(".")
        if MEGATRON_ENUM_MODULE.match(module):
            stubs.append((type(name, (MegatronEnum,), {"qualname": qualname}), qualname))
    return stubs


def load_file(path: str, allow_objects: bool = False) -> dict[str, Any]:
    """torch.load(weights_only=True), memory-mapped when the file is a zip checkpoint; with
    `allow_objects` also the few harmless globals of an mp_rank file (module docstring)."""
    mmap = zipfile.is_zipfile(path)  # legacy (pre-1.6) files cannot be memory-mapped
    allowed: list[Any] = []
    if allow_objects:
        allowed = [argparse.Namespace, *_numpy_globals(), *_enum_stubs(_unsafe_globals(path))]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        allowed_names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                         for g in allowed}
        refused = [g for g in _unsafe_globals(path) if g not in allowed_names]
        what = f"refused global(s) {', '.join(refused)}" if refused else str(exc).splitlines()[0]
        raise MegatronDeepSpeedError(f"{path}: cannot load with weights_only=True: {what} (not "
                                     "unpickled: that could run arbitrary code)") from exc
    except FileNotFoundError as exc:
        raise MegatronDeepSpeedError(f"{path}: file not found") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise MegatronDeepSpeedError(f"{path}: unreadable or truncated checkpoint file: "
                                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                     ) from exc
    if not isinstance(state, dict):
        raise MegatronDeepSpeedError(f"{path}: expected a dict, found {type(state).__name__}")
    return state


def resolve_step_dir(path: str, tag: str | None) -> str:
    """DIR + tag, DIR + the tag in DIR/latest, or DIR itself when it holds layer files."""
    if not os.path.isdir(path):
        raise MegatronDeepSpeedError(f"{path}: no such checkpoint directory")
    if tag is None:
        latest = os.path.join(path, "latest")
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as f:
                tag = f.read().strip()
            if not tag:
                raise MegatronDeepSpeedError(f"{latest}: empty tag")
        elif any(LAYER_FILE.match(n) for n in os.listdir(path)):
            return path
        else:
            raise MegatronDeepSpeedError(f"{latest}: missing (and no tag given, and {path} holds "
                                         "no layer_*-model_*-model_states.pt files)")
    step_dir = os.path.join(path, tag)
    if not os.path.isdir(step_dir):
        raise MegatronDeepSpeedError(f"{step_dir}: tag directory missing (tag {tag!r})")
    return step_dir


def layer_file_name(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


class MegatronDeepSpeedSource:
    """A Megatron-DeepSpeed BLOOM checkpoint as a tensor source: keys(), get(name), hf_config()."""

    def __init__(self, path: str, tag: str | None = None, log: Callable[[str], Any] = print,
                 num_attention_heads: int | None = None) -> None:
        self.log = log
        self.step_dir = resolve_step_dir(path, tag)
        self.tag = os.path.basename(os.path.normpath(self.step_dir))
        self._num_attention_heads = num_attention_heads
        state, self.mp_rank_file = self._read_mp_rank()
        self.args: dict[str, Any] = dict(vars(state["args"])) if isinstance(
            state.get("args"), argparse.Namespace) else dict(state.get("args") or {})
        self.iteration: int = self._iteration(state)
        self.info: dict[str, Any] = self._info(state)
        self.tp, self.num_layers, self._files = self._layout()
        self._cache: tuple[int, list[dict[str, torch.Tensor]]] | None = None

    # -- metadata -------------------------------------------------------------------------------
    def _read_mp_rank(self) -> tuple[dict[str, Any], str | None]:
        """The lowest-numbered mp_rank file (all hold the same args); ({}, None) when absent."""
        ranks = sorted((int(m.group(1)), n) for n in os.listdir(self.step_dir)
                       if (m := MP_RANK_FILE.match(n)))
        if not ranks:
            return {}, None
        path = os.path.join(self.step_dir, ranks[0][1])
        return load_file(path, allow_objects=True), path

    def _iteration(self, state: dict[str, Any]) -> int:
        for key in ("iteration", "global_steps", "total_iters"):
            if isinstance(state.get(key), int):
                return state[key]
        match = re.fullmatch(r"global_step(\d+)", self.tag)
        return int(match.group(1)) if match else 0

    def _info(self, state: dict[str, Any]) -> dict[str, Any]:
        info = dict(state.get("checkpoint_info") or {})
        samples = self.args.get("consumed_train_samples", state.get("global_samples"))
        tokens = state.get("tokens", self.args.get("consumed_train_tokens"))
        if samples is not None:
            info["consumed_train_samples"] = samples
        if tokens is not None:
            info["consumed_train_tokens"] = tokens
        return info

    def _layout(self) -> tuple[int, int, dict[tuple[int, int], str]]:
        """(TP, L) from the layer files present, cross-checked with args; every expected file
        must exist."""
        present: dict[tuple[int, int], str] = {}  # (layer, TP rank) -> file name as found
        for name in os.listdir(self.step_dir):
            if m := LAYER_FILE.match(name):
                present[int(m.group(1)), int(m.group(2))] = name
        if not present:
            raise MegatronDeepSpeedError(f"{self.step_dir}: no layer_*-model_*-model_states.pt files")
        final = max(layer for layer, _ in present)
        # Older Megatron args spell the TP size model_parallel_size (§3b).
        tp = self._checked("tensor_model_parallel_size", max(r for _, r in present) + 1,
                           self.args.get("tensor_model_parallel_size",
                                         self.args.get("model_parallel_size")))
        num_layers = self._checked("num_layers", final - DEEPSPEED_FINAL_OFFSET,
                                   self.args.get("num_layers"))
        if num_layers < 1:
            raise MegatronDeepSpeedError(f"{self.step_dir}: highest layer file is layer_{final:02d}; "
                                         "expected the final LayerNorm in layer_{L+4} with L >= 1")
        layers = sorted({c.tensor.deepspeed_layer(c.number, num_layers)
                         for c in whole_model(num_layers)})
        for layer in layers:
            for rank in range(tp):
                if (layer, rank) not in present:
                    raise MegatronDeepSpeedError(
                        f"{os.path.join(self.step_dir, layer_file_name(layer, rank))}: missing "
                        f"(layer {layer}, TP rank {rank} of {tp})")
        extra = sorted(layer for layer, _ in present if layer not in layers)
        if extra:
            raise MegatronDeepSpeedError(f"{self.step_dir}: unexpected layer file(s) layer_{extra[0]:02d}"
                                         f" for L={num_layers} (expected layer_{layers[0]:02d}, "
                                         f"layer_{layers[1]:02d}..layer_{layers[-2]:02d}, "
                                         f"layer_{layers[-1]:02d})")
        return tp, num_layers, present

    def _checked(self, field: str, from_files: int, expected: int | None) -> int:
        """A size seen in the files, cross-checked with args: a larger args value wins (the
        missing files are then reported by name), a smaller one is an error."""
        if expected is None or expected == from_files:
            return from_files
        if expected > from_files:
            return expected
        raise MegatronDeepSpeedError(f"{self.step_dir}: layer files show {field}={from_files} "
                                     f"but {self.mp_rank_file} says {expected}")

    def hf_config(self) -> dict[str, Any]:
        """transformers BloomConfig fields; sizes from the tensors, the rest from args."""
        # Shapes from the rank shards: no need to concatenate the (7 GB for 176B) embedding.
        shards = self._parts(DEEPSPEED_EMBEDDING_LAYER, WORD_EMBEDDINGS.deepspeed)
        vocab, hidden = sum(s.shape[0] for s in shards), shards[0].shape[1]
        for field, value in (("padded_vocab_size", vocab), ("hidden_size", hidden)):
            if self.args.get(field, value) != value:
                raise MegatronDeepSpeedError(f"{self.mp_rank_file}: args.{field}={self.args[field]}"
                                             f" but the word embeddings give {value}")
        heads = self._num_attention_heads or self.args.get("num_attention_heads")
        if heads is None:
            raise MegatronDeepSpeedError(
                f"{self.step_dir}: number of attention heads unknown (no mp_rank file with "
                "args.num_attention_heads); pass num_attention_heads (--num-attention-heads)")
        if hidden % heads:
            raise MegatronDeepSpeedError(f"{self.step_dir}: hidden size {hidden} is not divisible "
                                         f"by {heads} attention heads")
        config: dict[str, Any] = {
            "model_type": "bloom", "architectures": ["BloomForCausalLM"],
            "vocab_size": vocab, "hidden_size": hidden, "n_layer": self.num_layers,
            "n_head": heads,
            "layer_norm_epsilon": self.args.get("layernorm_epsilon", 1e-5),
            "apply_residual_connection_post_layernorm": False,
            "pretraining_tp": self.tp, "slow_but_exact": False,
            "torch_dtype": str(shards[0].dtype).removeprefix("torch."),
        }
        for key, default in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 3)):
            config[key] = self.args.get(key, default)
        for key in ("hidden_dropout", "attention_dropout"):
            if key in self.args:
                config[key] = self.args[key]
        return config

    # -- tensors --------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """HF BloomModel names (no `transformer.` prefix), in model order."""
        return [c.tensor.hf_name(c.number) for c in whole_model(self.num_layers)]

    def _locate(self, name: str) -> tuple[int, str]:
        """(layer file index, key within that file) of an HF name."""
        try:
            tensor, number = parse_hf(name)
        except KeyError:
            tensor, number = None, None
        if tensor is None or tensor.deepspeed is None or (number or 0) > self.num_layers:
            raise KeyError(f"{name}: not a tensor of this checkpoint (see keys())")
        return tensor.deepspeed_layer(number, self.num_layers), tensor.deepspeed

    def _path(self, layer: int, tp_rank: int) -> str:
        return os.path.join(self.step_dir, self._files[layer, tp_rank])

    def _shards(self, layer: int) -> list[dict[str, torch.Tensor]]:
        """All TP ranks' files of one layer; only the latest layer stays cached."""
        if self._cache is None or self._cache[0] != layer:
            self._cache = None  # drop the previous layer before loading the next
            shards = [load_file(self._path(layer, r)) for r in range(self.tp)]
            self._cache = (layer, shards)
        return self._cache[1]

    def _parts(self, layer: int, key: str) -> list[torch.Tensor]:
        """`key` from every TP rank's file of `layer`, checked present and alike."""
        files = [self._path(layer, r) for r in range(self.tp)]
        parts = []
        for path, shard in zip(files, self._shards(layer)):
            if key not in shard:
                raise MegatronDeepSpeedError(f"{path}: missing key {key!r}")
            parts.append(shard[key])
        for path, part in zip(files[1:], parts[1:]):
            if part.shape != parts[0].shape or part.dtype != parts[0].dtype:
                raise MegatronDeepSpeedError(
                    f"{path}: {key} is {part.dtype} {tuple(part.shape)} but TP rank 0 "
                    f"({os.path.basename(files[0])}) has {parts[0].dtype} {tuple(parts[0].shape)}")
        return parts

    def get(self, name: str) -> torch.Tensor:
        """The full tensor `name`, merged across TP ranks."""
        parts = self._parts(*self._locate(name))
        dim = concat_dim(name)
        if len(parts) == 1:
            return parts[0]
        if dim is not None:
            return torch.cat(parts, dim=dim)
        return self._replicated(name, parts)

    def _replicated(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """Rank 0 when all copies are bitwise equal (averaging equal copies can change the last
        ulp, §3c), else the fp32 average cast back, with a warning."""
        if all(torch.equal(parts[0], p) for p in parts[1:]):
            return parts[0]
        stacked = torch.stack([p.float() for p in parts])
        difference = (stacked - stacked[0]).abs().max().item()
        self.log(f"WARNING: {name}: the {len(parts)} TP copies differ (max abs difference "
                 f"{difference:.3g}); using their fp32 average")
        return stacked.mean(dim=0).to(parts[0].dtype)
